"""How fast the checkpoint directory really writes and reads, and how much room it has.

A checkpoint is only safe once it is on the device, so the write is timed up to and including
``fsync``. The data is random and never repeats (every 8 MB chunk is drawn fresh, before the
clock starts), so neither a compressing nor a deduplicating file system can make the numbers look
better than a checkpoint would.

The read must come from the device too, not from the page cache that the write just filled.
It uses ``O_DIRECT`` where the file system allows it (the page cache is bypassed). Where it does
not (tmpfs, some network and overlay file systems), the file's cached pages are dropped with
``posix_fadvise(DONTNEED)`` and the probe then *checks* with ``mincore`` how many pages are still
resident: ``page_cache_dropped`` is True only when the read is known to come from the device,
False when pages were seen still cached, and None (unknown) when it could not be checked;
``read_method`` and ``read_note`` say which case it was. A file system with a cache of its own
(ZFS's ARC) can still serve an ``O_DIRECT`` read from memory; the kernel cannot tell. The probe
file is always removed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from gonogo.errors import UserError

log = logging.getLogger(__name__)

MB = 1_000_000
GB = 1_000_000_000
CHUNK_BYTES = 8 * 1024 * 1024  # a multiple of every block size O_DIRECT needs alignment to
# leave this much room on the device beyond the probe itself: never fill a disk to measure it
FREE_SPACE_MARGIN_BYTES = 1 * GB


def _random_data(size_bytes: int, seed: Optional[int] = None) -> memoryview:
    """``size_bytes`` of fresh random bytes: nothing repeats, nothing compresses."""
    import numpy as np

    generator = np.random.SFC64(seed)  # raw 64-bit outputs: the cheapest good random bytes numpy has
    words = generator.random_raw((size_bytes + 7) // 8)
    return words.view(np.uint8).data[:size_bytes]


def _available_memory_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo; None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _drop_page_cache(fd: int) -> bool:
    """Ask the kernel to forget the file's cached pages; False where the OS has no such call."""
    if not hasattr(os, "posix_fadvise"):  # macOS, Windows
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def resident_fraction(fd: int, size_bytes: int) -> tuple[Optional[float], str]:
    """(share of the file's pages in the page cache, "") by ``mincore``; (None, why) when unknown."""
    if not sys.platform.startswith("linux"):
        return None, f"mincore is not used on {sys.platform}"
    if size_bytes == 0:
        return None, "empty file"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError) as error:
        return None, f"mincore is not available ({error})"
    # mapping a file does not read it: mincore then reports which pages the page cache holds
    address = libc.mmap(None, size_bytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return None, f"mmap failed ({os.strerror(ctypes.get_errno())})"
    try:
        pages = (size_bytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), size_bytes, vector) != 0:
            return None, f"mincore failed ({os.strerror(ctypes.get_errno())})"
        return sum(byte & 1 for byte in vector) / pages, ""
    finally:
        libc.munmap(ctypes.c_void_p(address), size_bytes)


def _open_direct(path: Path) -> Optional[int]:
    """A read descriptor with O_DIRECT, or None where the OS or the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # e.g. tmpfs
            return None
        raise


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


def _read_timed(fd: int, data: memoryview, buffer) -> tuple[int, bool, float]:
    """Read the whole file through ``buffer``; (bytes, whether they differ from ``data``, seconds)."""
    total, mismatched = 0, False
    start = time.perf_counter()
    while True:
        count = _read_full(fd, buffer)
        if count == 0:
            break
        # a memcmp per chunk: far faster than the device, so it barely moves the timing
        if memoryview(buffer)[:count] != data[total:total + count]:
            mismatched = True
        total += count
    return total, mismatched, time.perf_counter() - start


def _read_back(probe_file: Path, data: memoryview) -> dict[str, Any]:
    """Time reading the probe file back from the device: O_DIRECT, else a checked cache drop."""
    size_bytes = len(data)
    fd = _open_direct(probe_file)
    if fd is not None:
        buffer = mmap.mmap(-1, CHUNK_BYTES)  # page-aligned, as O_DIRECT needs
        try:
            total, mismatched, seconds = _read_timed(fd, data, buffer)
            return {"bytes": total, "mismatched": mismatched, "seconds": seconds, "method": "o_direct",
                    "page_cache_dropped": True, "resident_fraction": None,
                    "note": "read with O_DIRECT: the page cache is bypassed"}
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: the file system opens O_DIRECT but cannot read it
                raise
            direct_refused = f"O_DIRECT read refused ({error.strerror})"
        finally:
            os.close(fd)
            buffer.close()
    else:
        direct_refused = "O_DIRECT not available on this file system" if hasattr(os, "O_DIRECT") else \
            f"no O_DIRECT on {sys.platform}"

    fd = os.open(probe_file, os.O_RDONLY)
    try:
        requested = _drop_page_cache(fd)
        fraction, why = resident_fraction(fd, size_bytes)
        if not requested:
            method, dropped = "cached", False
            note = f"{direct_refused}; no posix_fadvise either: the read speed is the page cache's"
        elif fraction is None:
            method, dropped = "fadvise_dontneed", None
            note = f"{direct_refused}; posix_fadvise(DONTNEED) requested, its effect unknown: {why}"
        else:
            method, dropped = "fadvise_dontneed", fraction == 0.0
            note = (f"{direct_refused}; posix_fadvise(DONTNEED), checked with mincore: "
                    f"{fraction:.1%} of the file's pages still cached"
                    + ("" if dropped else " (the read speed is partly the cache's)"))
        total, mismatched, seconds = _read_timed(fd, data, bytearray(CHUNK_BYTES))
    finally:
        os.close(fd)
    return {"bytes": total, "mismatched": mismatched, "seconds": seconds, "method": method,
            "page_cache_dropped": dropped, "resident_fraction": fraction, "note": note}


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
    """Write ``size_MB`` megabytes (1e6 bytes) of fresh random data with fsync, read them back
    from the device (O_DIRECT, else a cache drop that is checked), and compare.

    Returns write/read speed in GB/s (1e9 bytes per second), how the read avoided the page cache,
    and the free and total space of the file system. A directory that cannot be written is a
    ``UserError`` naming it. The data is held in memory while the probe runs.
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

    available = _available_memory_bytes()
    if available is not None and available < 2 * size_bytes:
        raise UserError(f"storage probe: a {size_MB} MB probe holds its data in memory and only "
                        f"{available / GB:.1f} GB is available; lower --size-MB / storage_size_MB")
    data = _random_data(size_bytes)  # drawn before the clock starts: the write times the device only
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
                written += os.write(fd, data[written:written + CHUNK_BYTES])
            os.fsync(fd)
            write_seconds = time.perf_counter() - start
            _drop_page_cache(fd)  # clean pages after the fsync: whatever the read method, start cold
        finally:
            os.close(fd)
        read = _read_back(probe_file, data)
    finally:
        try:
            probe_file.unlink()
        except FileNotFoundError:
            pass
    read_total, mismatched, read_seconds = read["bytes"], read["mismatched"], read["seconds"]

    read_back_ok = read_total == size_bytes and not mismatched
    result = {
        "path": str(path.resolve()),
        "size_MB": size_MB,
        "write_seconds": round(write_seconds, 4),
        "read_seconds": round(read_seconds, 4),
        "write_GBps": round(size_bytes / write_seconds / GB, 3),
        "read_GBps": round(size_bytes / max(read_seconds, 1e-9) / GB, 3),
        "read_back_ok": read_back_ok,
        # True only when the read is known to come from the device (see the module doc)
        "page_cache_dropped": read["page_cache_dropped"],
        "read_method": read["method"],
        "page_cache_resident_fraction": read["resident_fraction"],
        "read_note": read["note"],
        "disk_free_GB": round(usage.free / GB, 2),
        "disk_total_GB": round(usage.total / GB, 2),
    }
    log.debug("storage probe: %s", result)
    return result
