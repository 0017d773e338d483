"""How fast the checkpoint directory really writes and reads, and how much room it has.

A checkpoint is only safe once it is on the device, so the write is timed up to and including
``fsync``. The read must come from the device too, not from the page cache that the write just
filled, so the file's cached pages are dropped (``posix_fadvise(DONTNEED)``, which works once the
pages are clean, i.e. after the fsync) before it is read back. The data is random so that a
compressing or deduplicating file system cannot make the numbers look better than a checkpoint
would. The probe file is always removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from gonogo.errors import UserError

log = logging.getLogger(__name__)

MB = 1_000_000
GB = 1_000_000_000
CHUNK_BYTES = 8 * MB
# leave this much room on the device beyond the probe itself: never fill a disk to measure it
FREE_SPACE_MARGIN_BYTES = 1 * GB


def _drop_page_cache(fd: int) -> bool:
    """Ask the kernel to forget the file's cached pages; False where the OS has no such call."""
    if not hasattr(os, "posix_fadvise"):  # macOS, Windows
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def _read_full(fd: int, buffer: bytearray) -> int:
    """Fill ``buffer`` from ``fd`` (the OS may return less per call); the count, short only at EOF."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        count = os.readv(fd, [view[filled:]])
        if count == 0:
            break
        filled += count
    return filled


def _prepare_directory(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"storage probe: {path} is not a directory; give a writable directory "
                        f"with --path / storage_path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"storage probe: cannot create directory {path} ({error.strerror or error}); "
                        f"give a writable directory with --path / storage_path") from None


def probe_storage(path: Path, size_MB: int = 256) -> dict[str, Any]:
    """Write ``size_MB`` megabytes (1e6 bytes) with fsync, drop them from the cache, read them back.

    Returns write/read speed in GB/s (1e9 bytes per second) and the free and total space of the
    file system. A directory that cannot be written is a ``UserError`` naming it.
    """
    if size_MB < 1:
        raise UserError(f"storage probe: size must be at least 1 MB, got {size_MB}")
    path = Path(path)
    _prepare_directory(path)
    usage = shutil.disk_usage(path)
    size_bytes = size_MB * MB
    if usage.free < size_bytes + FREE_SPACE_MARGIN_BYTES:
        raise UserError(
            f"storage probe: {path} has {usage.free / GB:.2f} GB free, too little for a {size_MB} MB "
            f"probe plus a {FREE_SPACE_MARGIN_BYTES / GB:.0f} GB margin; lower --size-MB / storage_size_MB")

    # one random chunk written over and over: incompressible, and cheap to check on read-back
    pattern = os.urandom(min(CHUNK_BYTES, size_bytes))
    probe_file = path / f".gonogo-storage-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            fd = os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise UserError(f"storage probe: cannot write in {path} ({error.strerror or error}); "
                            f"give a writable directory with --path / storage_path") from None
        try:
            start = time.perf_counter()
            written = 0
            while written < size_bytes:
                view = memoryview(pattern)[: size_bytes - written]
                while view:
                    count = os.write(fd, view)
                    view = view[count:]
                    written += count
            os.fsync(fd)
            write_seconds = time.perf_counter() - start
            cache_dropped = _drop_page_cache(fd)
        finally:
            os.close(fd)

        fd = os.open(probe_file, os.O_RDONLY)
        try:
            _drop_page_cache(fd)
            buffer = bytearray(len(pattern))
            read_total = 0
            mismatched = False
            start = time.perf_counter()
            while True:
                count = _read_full(fd, buffer)
                if count == 0:
                    break
                # a memcmp per chunk: far faster than the device, so it barely moves the timing
                if memoryview(buffer)[:count] != memoryview(pattern)[:count]:
                    mismatched = True
                read_total += count
            read_seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        try:
            probe_file.unlink()
        except FileNotFoundError:
            pass

    read_back_ok = read_total == size_bytes and not mismatched
    result = {
        "path": str(path.resolve()),
        "size_MB": size_MB,
        "write_seconds": round(write_seconds, 4),
        "read_seconds": round(read_seconds, 4),
        "write_GBps": round(size_bytes / write_seconds / GB, 3),
        "read_GBps": round(size_bytes / max(read_seconds, 1e-9) / GB, 3),
        "read_back_ok": read_back_ok,
        "page_cache_dropped": cache_dropped,
        "disk_free_GB": round(usage.free / GB, 2),
        "disk_total_GB": round(usage.total / GB, 2),
    }
    log.debug("storage probe: %s", result)
    return result
