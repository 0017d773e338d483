"""DCP's file system with ``torch.save``'s zip CRC-32 left out of a checkpoint's shard files.

DCP writes every tensor with ``torch.save``, whose zip records carry a CRC-32 of their bytes; it
took 45% of a sync save here (bench/checkpoint.py: 0.22 -> 0.12 s for 151 MB on a Xeon). A gonogo
checkpoint's manifest holds the BLAKE3 of every file, checked before any load, so the CRC adds
nothing. ``torch.load`` reads records without one (it does not check it).

``CrcFreeFileSystem`` is a module-level class so that DCP's process-based async save can pickle it
into its background process; the synchronous save's hashing file system (``writers``) uses the same
``without_zip_crc32``.

``DirectReader`` reads a tensor's bytes straight into the tensor it is loaded into. DCP's own reader
``torch.load``s every item into a fresh tensor (new memory, its page faults and a copy) and then
copies that into the target; on the AVX2 EPYC of bench/results/checkpoint-epyc-avx2.md that made
``dcp.load`` alone 40% of a raw read, below the 60% issue 21 asks of a load that also verifies.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import IO, Any, Iterator, Optional, cast

import torch
import torch.serialization as serialization
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.utils import _create_file_view
from torch.futures import Future
from typing_extensions import Buffer


@contextlib.contextmanager
def without_zip_crc32() -> Iterator[None]:
    """``torch.save`` without the CRC-32 while inside; the option is process-wide, so a
    ``torch.save`` of another thread meanwhile also goes without it (harmless: it is optional)."""
    if not hasattr(serialization, "set_crc32_options"):  # an older torch: CRC as before
        yield
        return
    previous = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(previous)


class CrcFreeFileSystem(FileSystem):
    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" in mode:
                with without_zip_crc32():
                    yield stream
            else:
                yield stream


def crc_free_storage_writer(directory: Path) -> FileSystemWriter:
    """DCP's ``FileSystemWriter`` for ``directory`` writing without zip CRC-32s (the async save's)."""
    writer = FileSystemWriter(str(directory))
    writer.fs = CrcFreeFileSystem()
    return writer


class DirectReader(FileSystemReader):
    """DCP's ``FileSystemReader``, reading each whole tensor with one ``preadv`` into the memory of the
    tensor it is loaded into.

    An item takes this path when it is a tensor record stored as it is (no stream transform), its
    target is a contiguous CPU tensor of the same dtype and shape, and the read asks for the whole
    stored tensor (no resharding slice). Its record's layout comes from ``torch.load`` with
    ``map_location="meta"``, which reads the record's pickle and not its data and says where the data
    begins. Every other item (bytes, a slice of a resharded tensor, another dtype, a strided or
    big-endian record, a big-endian host) is read by DCP's own code, unchanged.
    """

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        rest: list[ReadItem] = []
        if sys.byteorder != "little" or not hasattr(os, "preadv"):  # a big-endian host; no preadv (macOS)
            rest = list(plan.items)
        else:
            per_file: dict[str, list[ReadItem]] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for relative_path, items in per_file.items():
                path = self.fs.concat_path(self.path, relative_path)
                with open(path, "rb") as handle:  # buffered for the records' small reads; data by preadv
                    for item in items:
                        if not self._read_in_place(handle, item, planner):
                            rest.append(item)
        if rest:
            return super().read_data(LoadPlan(rest, plan.storage_data, plan.planner_data), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_in_place(self, handle: Any, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read ``item`` into its target tensor; False (nothing changed) where it is not a plain whole
        tensor record, for DCP's reader to do."""
        stored = self.storage_data[item.storage_index]
        if item.type != LoadItemType.TENSOR or stored.transform_descriptors:
            return False
        target = planner.resolve_tensor(item).detach()
        if target.device.type != "cpu" or not target.is_contiguous():
            return False
        # a record's zip directory is at its end, after the data: read first, that jump would look
        # random to the kernel's readahead, so it is told the whole record is wanted
        if hasattr(os, "posix_fadvise"):  # not on macOS
            os.posix_fadvise(handle.fileno(), stored.offset, stored.length, os.POSIX_FADV_WILLNEED)
        layout = _record_layout(handle, stored.offset, stored.length)
        if layout is None:
            return False
        shape, dtype, data_offset = layout
        whole = all(start == 0 for start in item.storage_offsets) and tuple(item.lengths) == shape
        if not whole or tuple(target.shape) != shape or target.dtype != dtype:
            return False
        _read_exactly(handle.fileno(), target, stored.offset + data_offset)
        planner.commit_tensor(item, target)
        return True


def _record_layout(handle: Any, offset: int, length: int) -> Optional[tuple[tuple[int, ...], torch.dtype, int]]:
    """(shape, dtype, offset of the data within the record) of a ``torch.save``d contiguous tensor
    record at ``offset`` of ``handle``'s file, or None where it is anything else."""
    view = cast(IO[bytes], _create_file_view(handle, offset, length))  # positioned at the record's start
    archive = torch._C.PyTorchFileReader(view)
    order = next((name for name in archive.get_all_records() if name.endswith("byteorder")), None)
    if order is None or archive.get_record(order) != b"little":  # torch.load would swap the bytes
        return None
    view.seek(0)
    meta = torch.load(view, map_location="meta", weights_only=True)
    if not isinstance(meta, torch.Tensor) or not meta.is_contiguous():
        return None
    begins = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
    if begins is None:  # an older torch that does not say where the data is
        return None
    return tuple(meta.shape), meta.dtype, int(begins) + int(meta.storage_offset()) * meta.element_size()


def _read_exactly(fd: int, target: torch.Tensor, position: int) -> None:
    """The file's bytes from ``position`` into ``target``'s memory, all of them or an error."""
    view = memoryview(cast(Buffer, target.reshape(-1).view(torch.uint8).numpy()))
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], position + done)
        if count == 0:
            raise OSError(f"checkpoint file ends {len(view) - done} bytes short of a tensor's data")
        done += count
