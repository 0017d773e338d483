"""DCP's file system with ``torch.save``'s zip CRC-32 left out of a checkpoint's shard files.

DCP writes every tensor with ``torch.save``, whose zip records carry a CRC-32 of their bytes; it
took 45% of a sync save here (bench/checkpoint.py: 0.22 -> 0.12 s for 151 MB on a Xeon). A gonogo
checkpoint's manifest holds the BLAKE3 of every file, checked before any load, so the CRC adds
nothing. ``torch.load`` reads records without one (it does not check it).

``CrcFreeFileSystem`` is a module-level class so that DCP's process-based async save can pickle it
into its background process; the synchronous save's hashing file system (``writers``) uses the same
``without_zip_crc32``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch.serialization as serialization
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem


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
