"""DCP's file system with ``torch.save``'s zip CRC-32 left out of a checkpoint's shard files.

DCP writes every tensor with ``torch.save``, whose zip records carry a CRC-32 of their bytes; it
took 45% of a sync save here (bench/checkpoint.py: 0.22 -> 0.12 s for 151 MB on a Xeon). A gonogo
checkpoint's manifest holds the digest of every file, checked by every load, so the CRC adds
nothing. ``torch.load`` reads records without one (it does not check it).

``CrcFreeFileSystem`` is a module-level class so that DCP's process-based async save can pickle it
into its background process; the synchronous save's hashing file system (``writers``) uses the same
``without_zip_crc32``.

``DirectReader`` reads a tensor's bytes straight into the tensor it is loaded into. DCP's own reader
``torch.load``s every item into a fresh tensor (new memory, its page faults and a copy) and then
copies that into the target; on the AVX2 EPYC of bench/results/checkpoint-epyc-avx2.md that made
``dcp.load`` alone 40% of a raw read, below the 60% issue 21 asks of a load that also verifies.
``VerifyingReader`` is ``DirectReader`` checking each shard's manifest digest in the same pass
(a training restore's reader: hashing first and reading after read every byte twice).
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union, cast

import torch
import torch.serialization as serialization
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.utils import _create_file_view
from torch.futures import Future
from typing_extensions import Buffer

from gonogo.checkpoints.manifest import CorruptShard, hash_file, mismatch, new_hash


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
    stored tensor (no resharding slice). Its record's layout comes from the record's first bytes
    (see ``_layout``). Every other item (bytes, a slice of a resharded tensor, another dtype, a strided or
    big-endian record, a big-endian host) is read by DCP's own code, unchanged.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        super().__init__(path)
        # (pickle, byteorder) of a record -> (shape, dtype, where its data begins after its data entry)
        self._layouts: dict[tuple[bytes, bytes], tuple[tuple[int, ...], torch.dtype, int]] = {}

    def _layout(self, handle: Any, fd: int, offset: int, length: int
                ) -> Optional[tuple[tuple[int, ...], torch.dtype, int]]:
        """(shape, dtype, offset of the data in the record) of the tensor record at ``offset``.

        The record's zip directory is at its end, after the data; reading it first would wait for
        the data to come off the disk. So the record's first bytes are read (the sequential read's
        next bytes anyway) and its zip entries walked forward to its data; a record whose pickle
        and byte order were seen before in this load has the same shape, dtype and layout (the
        pickle holds them all), and only a new one is read with ``torch.load(map_location="meta")``.
        """
        walked = _walk_to_data(os.pread(fd, min(_PREFIX, length), offset))
        if walked is None:
            return _record_layout(handle, offset, length)
        pickled, order, entry = walked
        known = self._layouts.get((pickled, order))
        if known is None:
            layout = _record_layout(handle, offset, length)
            if layout is None or layout[2] < entry:
                return layout
            known = self._layouts[(pickled, order)] = (layout[0], layout[1], layout[2] - entry)
        shape, dtype, past_entry = known
        return shape, dtype, entry + past_entry

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
        # a record's zip directory is at its end, after the data: where it has to be read (a pickle
        # not seen before), that jump would look random to the kernel's readahead, so it is told
        # the whole record is wanted
        if hasattr(os, "posix_fadvise"):  # not on macOS
            os.posix_fadvise(handle.fileno(), stored.offset, stored.length, os.POSIX_FADV_WILLNEED)
        found = self._whole_tensor(handle, handle.fileno(), item, planner)
        if found is None:
            return False
        target, data_offset = found
        _read_exactly(handle.fileno(), target, stored.offset + data_offset)
        planner.commit_tensor(item, target)
        return True

    def _whole_tensor(self, handle: Any, fd: int, item: ReadItem, planner: LoadPlanner, *,
                      unverified: bool = False) -> Optional[tuple[torch.Tensor, int]]:
        """(target, offset of the data in its record) where ``item`` is a whole tensor record stored as
        it is and its target a contiguous CPU tensor of its dtype and shape; None where DCP's reader
        is to read it. ``unverified``: the record's digest is not known yet, so one that does not
        parse is left to that digest to report (None), not an error here."""
        stored = self.storage_data[item.storage_index]
        if item.type != LoadItemType.TENSOR or stored.transform_descriptors:
            return None
        target = planner.resolve_tensor(item).detach()
        if target.device.type != "cpu" or not target.is_contiguous():
            return None
        try:
            layout = self._layout(handle, fd, stored.offset, stored.length)
        except Exception:
            if not unverified:
                raise
            return None
        if layout is None:
            return None
        shape, dtype, data_offset = layout
        whole = all(start == 0 for start in item.storage_offsets) and tuple(item.lengths) == shape
        if (not whole or tuple(target.shape) != shape or target.dtype != dtype
                or data_offset + target.numel() * target.element_size() > stored.length):
            return None
        return target, data_offset


_CHUNK = 8 << 20  # bytes per read, and per hash update, of a shard file


class VerifyingReader(DirectReader):
    """``DirectReader`` that also checks each shard file against its manifest digest while reading
    it, in one pass: every byte of the file is read once, in order, tensor data straight into the
    target tensors, and hashed (on another thread) as it lands. The digest is known only at the end
    of a file, so a corrupt file has already written into the targets when it is found:
    ``CorruptShard`` says so and the loader treats the model's and optimizer's tensors as garbage
    (``Checkpointer`` goes on to an older checkpoint, which overwrites them all, or stops).

    What is parsed before its digest is known: each record's zip headers and its pickle, with
    ``torch.load(weights_only=True)`` (the restricted unpickler, made for untrusted files). What is
    never parsed before: DCP's ``.metadata`` (a full pickle; the caller hashed it first) and any
    item DCP's own reader reads (bytes items are unpickled with ``weights_only=False``), which are
    read only after their file's digest matched, whether this rank or another one read it.

    ``digests``: {file name relative to the DCP directory: manifest entry}, ``algorithm`` the
    manifest's hash. Under torch.distributed, every rank first reads and checks the files it has
    whole tensors in, then the ranks exchange which files they checked (and any mismatch); a file
    a rank needs that no rank checked is hashed whole by that rank before its items are read.
    """

    def __init__(self, path: Union[str, os.PathLike], digests: dict[str, dict[str, Any]], algorithm: str):
        super().__init__(path)
        self.digests, self.algorithm = digests, algorithm
        self.checked: set[str] = set()  # files this rank hashed (tests read it)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        rest: list[ReadItem] = []
        failure: Optional[BaseException] = None
        direct_capable = sys.byteorder == "little" and hasattr(os, "preadv")
        for relative_path, items in per_file.items():
            if direct_capable and any(item.type == LoadItemType.TENSOR for item in items):
                try:
                    rest += self._read_and_check(relative_path, items, planner)
                except BaseException as error:  # told to the other ranks first, then raised
                    failure = error
                    break
            else:
                rest += items
        checked_anywhere, problem = _exchange(self.checked, failure)
        if failure is not None and not isinstance(failure, CorruptShard):
            raise failure
        if problem is None:
            for relative_path in sorted({self.storage_data[item.storage_index].relative_path for item in rest}):
                if relative_path not in checked_anywhere:
                    self._check_whole(relative_path)
        elif isinstance(problem, CorruptShard):
            raise problem
        else:
            raise RuntimeError(problem)
        if rest:  # from files whose digest matched: DCP's own reader (a second read, from the page cache)
            return FileSystemReader.read_data(self, LoadPlan(rest, plan.storage_data, plan.planner_data), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _expected(self, relative_path: str) -> dict[str, Any]:
        entry = self.digests.get(relative_path)
        if entry is None or self.algorithm not in entry:
            raise CorruptShard(f"dcp/{relative_path} has no {self.algorithm} digest in the manifest")
        return entry

    def _check_whole(self, relative_path: str) -> None:
        self._compare(relative_path, hash_file(Path(self.fs.concat_path(self.path, relative_path)), self.algorithm))

    def _compare(self, relative_path: str, digest: str) -> None:
        """``CorruptShard`` unless ``digest`` is the manifest's; else the file counts as checked."""
        if digest != self._expected(relative_path)[self.algorithm]:
            raise CorruptShard(mismatch(f"dcp/{relative_path}", self.algorithm))
        self.checked.add(relative_path)

    def _read_and_check(self, relative_path: str, items: list[ReadItem], planner: LoadPlanner) -> list[ReadItem]:
        """Read the whole file once, in order: the items' whole tensors into their targets, every
        other byte into memory to be hashed; raise ``CorruptShard`` unless the digest matches. The
        items left for DCP's reader."""
        self._expected(relative_path)  # a file without a digest fails here, before any byte reaches a tensor
        wanted: dict[tuple[int, int], list[ReadItem]] = {}
        records: set[tuple[int, int]] = set()
        for stored in self.storage_data.values():
            if stored.relative_path == relative_path:
                records.add((stored.offset, stored.length))
        for item in items:
            stored = self.storage_data[item.storage_index]
            wanted.setdefault((stored.offset, stored.length), []).append(item)
        path = self.fs.concat_path(self.path, relative_path)
        hasher = _Hasher(new_hash(self.algorithm))
        rest: list[ReadItem] = []
        done: list[tuple[ReadItem, torch.Tensor]] = []
        position = 0
        try:
            # two opens, so two readahead states: one reads the file front to back, the other the
            # records' zip directories (at each record's end, before its data is read)
            with open(path, "rb", buffering=0) as sequential, open(path, "rb") as handle:
                fd = sequential.fileno()
                size = os.fstat(fd).st_size
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for offset, length in sorted(records):
                    if offset < position or offset + length > size:
                        raise CorruptShard(f"dcp/{relative_path}: its records overlap or run past its end")
                    _hash_range(fd, position, offset, hasher)
                    record_items = wanted.get((offset, length), [])
                    placed = self._place(handle, fd, offset, length, record_items, planner, hasher)
                    if placed is None:
                        _hash_range(fd, offset, offset + length, hasher)
                        rest += record_items
                    else:
                        done.append(placed)
                    position = offset + length
                _hash_range(fd, position, size, hasher)
        finally:
            digest = hasher.finish()
        self._compare(relative_path, digest)
        for item, target in done:
            planner.commit_tensor(item, target)
        return rest

    def _place(self, handle: Any, fd: int, offset: int, length: int, items: list[ReadItem], planner: LoadPlanner,
               hasher: "_Hasher") -> Optional[tuple[ReadItem, torch.Tensor]]:
        """The record at ``offset`` read and hashed with its tensor data in its one item's target;
        None (nothing read) where it is not a plain whole tensor for one target."""
        if len(items) != 1:
            return None
        found = self._whole_tensor(handle, fd, items[0], planner, unverified=True)
        if found is None:
            return None
        target, data_offset = found
        data_bytes = target.numel() * target.element_size()
        _hash_range(fd, offset, offset + data_offset, hasher)
        view = memoryview(cast(Buffer, target.reshape(-1).view(torch.uint8).numpy()))
        start = 0
        while start < data_bytes:
            chunk = view[start:start + _CHUNK]
            _read_exactly_into(fd, chunk, offset + data_offset + start)
            hasher.put(chunk)
            start += len(chunk)
        _hash_range(fd, offset + data_offset + data_bytes, offset + length, hasher)
        return items[0], target


class _Hasher:
    """Hash updates on a thread of their own, in the order they are put (xxhash, blake3 and hashlib
    let go of the GIL while hashing a large buffer, so the reads go on meanwhile)."""

    def __init__(self, digest: Any):
        self.digest = digest
        self.error: Optional[BaseException] = None
        self.pieces: "queue.Queue[Any]" = queue.Queue(maxsize=8)  # bounds the bytes read ahead of the hash
        self.thread = threading.Thread(target=self._run, name="gonogo-shard-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (piece := self.pieces.get()) is not None:
            if self.error is None:
                try:
                    self.digest.update(piece)
                except BaseException as error:  # reported by finish()
                    self.error = error

    def put(self, piece: Any) -> None:
        self.pieces.put(piece)

    def finish(self) -> str:
        self.pieces.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()


def _hash_range(fd: int, start: int, end: int, hasher: _Hasher) -> None:
    """The file's bytes [start, end) read in chunks and handed to ``hasher``."""
    while start < end:
        piece = os.pread(fd, min(_CHUNK, end - start), start)
        if not piece:
            raise CorruptShard(f"a checkpoint file ends {end - start} bytes early")
        hasher.put(piece)
        start += len(piece)


_PREFIX = 4096  # bytes of a record read to walk its zip entries up to its data
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIGNATURE, _DESCRIPTOR_SIGNATURE = 0x04034B50, b"PK\x07\x08"


def _walk_to_data(prefix: bytes) -> Optional[tuple[bytes, bytes, int]]:
    """(pickle, byte order, where the storage's data begins) of a ``torch.save`` record from its
    first bytes, walking its zip entries' local headers forward; None where the walk does not
    reach a ``data/`` entry within ``prefix``. ``torch.save`` streams its entries, so a local
    header carries no sizes: each small entry's size comes from the data descriptor after it,
    accepted only where the descriptor's size is the distance to it."""
    entries: dict[str, bytes] = {}
    position = 0
    while position + _LOCAL_HEADER.size <= len(prefix):
        (signature, _version, flags, method, _time, _date, _crc, compressed, _size, name_length,
         extra_length) = _LOCAL_HEADER.unpack_from(prefix, position)
        if signature != _LOCAL_SIGNATURE or method != 0:  # not a stored (uncompressed) entry
            return None
        name = prefix[position + 30:position + 30 + name_length].decode("utf-8", "replace")
        start = position + 30 + name_length + extra_length
        inner = name.split("/", 1)[1] if "/" in name else name
        if inner.startswith("data/"):
            pickled, order = entries.get("data.pkl"), entries.get("byteorder", b"")
            return (pickled, order, start) if pickled is not None else None
        if not flags & 0x08:  # sizes in the header
            end = start + compressed
            after = end
        else:
            found = _descriptor_after(prefix, start)
            if found is None:
                return None
            end, after = found
        entries[inner] = prefix[start:end]
        position = after
    return None


def _descriptor_after(prefix: bytes, start: int) -> Optional[tuple[int, int]]:
    """(end of the entry's data, end of its data descriptor) for the entry whose data begins at
    ``start``: the first descriptor whose compressed size is its distance from ``start``."""
    search = start
    while (at := prefix.find(_DESCRIPTOR_SIGNATURE, search)) >= 0:
        size = at - start
        if at + 16 <= len(prefix) and struct.unpack_from("<I", prefix, at + 8)[0] == size:
            return at, at + 16
        if at + 24 <= len(prefix) and struct.unpack_from("<Q", prefix, at + 8)[0] == size:  # zip64 sizes
            return at, at + 24
        search = at + 1
    return None


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
    _read_exactly_into(fd, memoryview(cast(Buffer, target.reshape(-1).view(torch.uint8).numpy())), position)


def _exchange(checked: set[str], failure: Optional[BaseException]) -> tuple[set[str], Optional[Any]]:
    """(the files any rank checked, the first failing rank's problem or None): this rank's own
    without torch.distributed; under it every rank calls this once per load, failed or not, so
    none waits for another forever. A problem is a ``CorruptShard``, or text for any other error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return set(checked), failure
    mine = None if failure is None else (str(failure), isinstance(failure, CorruptShard))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sorted(checked), mine))
    everywhere = {name for names, _ in gathered for name in names}
    for rank, (_, reported) in enumerate(gathered):
        if reported is not None:
            text, corrupt = reported
            text = text if rank == dist.get_rank() else f"{text} (read by rank {rank})"
            return everywhere, CorruptShard(text) if corrupt else f"rank {rank} could not read the checkpoint: {text}"
    return everywhere, None


def _read_exactly_into(fd: int, view: memoryview, position: int) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], position + done)
        if count == 0:
            raise OSError(f"checkpoint file ends {len(view) - done} bytes short of a tensor's data")
        done += count
