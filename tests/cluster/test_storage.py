import os
from collections import namedtuple

import pytest

from gonogo.cluster import storage
from gonogo.cluster.storage import MB, probe_storage
from gonogo.errors import UserError


def test_probe_writes_and_reads_back_real_bytes_then_removes_its_file(tmp_path, monkeypatch):
    target = tmp_path / "run" / "checkpoints"  # created on demand, like a fresh run's folder
    sizes_at_fsync = []
    real_fsync = os.fsync

    def spying_fsync(fd):
        sizes_at_fsync.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    result = probe_storage(target, size_MB=12)  # not a multiple of the 8 MB chunk: a partial last one

    assert sizes_at_fsync == [12 * MB]
    assert result["read_back_ok"] is True
    assert result["size_MB"] == 12
    assert result["write_GBps"] > 0 and result["read_GBps"] > 0
    assert result["write_seconds"] > 0
    assert 0 < result["disk_free_GB"] <= result["disk_total_GB"]
    # which method depends on the file system; what the probe claims must match the method
    assert result["read_method"] in ("o_direct", "fadvise_dontneed")
    if result["read_method"] == "o_direct":
        assert result["page_cache_dropped"] is True and "O_DIRECT" in result["read_note"]
    else:
        assert result["page_cache_dropped"] is (result["page_cache_resident_fraction"] == 0.0)
    assert list(target.iterdir()) == []


def test_written_data_never_repeats_and_does_not_compress(tmp_path, monkeypatch):
    import zlib

    written = []
    real_write = os.write

    def recording_write(fd, data):
        written.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    probe_storage(tmp_path, size_MB=20)
    stream = b"".join(written)
    assert len(stream) == 20 * MB
    blocks = [stream[i:i + 4096] for i in range(0, len(stream) - 4096, 4096)]
    assert len(set(blocks)) == len(blocks)  # no 4 KiB block twice: nothing for deduplication
    assert len(zlib.compress(stream[:4 * MB], 1)) > 0.99 * 4 * MB  # nothing for compression


def _no_direct(monkeypatch):
    """Stand in for a file system that refuses O_DIRECT (tmpfs answers EINVAL at open)."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_without_o_direct_the_cache_drop_is_checked_not_assumed(tmp_path, monkeypatch):
    _no_direct(monkeypatch)
    dropped = probe_storage(tmp_path, size_MB=4)
    assert dropped["read_method"] == "fadvise_dontneed" and "O_DIRECT not available" in dropped["read_note"]
    assert dropped["page_cache_resident_fraction"] == 0.0 and dropped["page_cache_dropped"] is True
    # a kernel that ignores the request: the probe sees the pages still cached and says so
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: None)
    ignored = probe_storage(tmp_path, size_MB=4)
    assert ignored["read_method"] == "fadvise_dontneed" and ignored["page_cache_dropped"] is False
    assert ignored["page_cache_resident_fraction"] > 0.5 and "partly the cache's" in ignored["read_note"]
    # and where residency cannot be checked at all, the answer is unknown, not "dropped"
    monkeypatch.setattr(storage, "resident_fraction", lambda fd, size: (None, "mincore failed (test)"))
    unknown = probe_storage(tmp_path, size_MB=4)
    assert unknown["page_cache_dropped"] is None and "effect unknown: mincore failed (test)" in unknown["read_note"]
    assert list(tmp_path.iterdir()) == []


def test_corrupted_read_back_is_reported(tmp_path, monkeypatch):
    real_read = storage._read_full

    def corrupting_read(fd, buffer):
        count = real_read(fd, buffer)
        if count:
            buffer[0] ^= 0xFF
        return count

    monkeypatch.setattr(storage, "_read_full", corrupting_read)
    assert probe_storage(tmp_path, size_MB=2)["read_back_ok"] is False
    assert list(tmp_path.iterdir()) == []


def test_probe_file_is_removed_when_the_read_fails(tmp_path, monkeypatch):
    def failing_read(fd, buffer):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage, "_read_full", failing_read)
    with pytest.raises(OSError):
        probe_storage(tmp_path, size_MB=1)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_is_a_user_error_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # root ignores permission bits, so use a path whose parent is a file: no one can create it
    target = blocker / "checkpoints"
    with pytest.raises(UserError, match=str(target)):
        probe_storage(target, size_MB=1)
    with pytest.raises(UserError, match="not a directory"):
        probe_storage(blocker, size_MB=1)


def test_refuses_to_fill_the_disk(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: Usage(10**10, 10**10 - 5 * MB, 5 * MB))
    with pytest.raises(UserError, match="size-MB"):
        probe_storage(tmp_path, size_MB=4)
    assert list(tmp_path.iterdir()) == []


def test_size_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="at least 1 MB"):
        probe_storage(tmp_path, size_MB=0)


def test_directory_without_write_permission_is_a_user_error(tmp_path, monkeypatch):
    # root may write anywhere, so stand in for a read-only directory at the one call that creates the file
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(UserError, match=f"cannot write in {tmp_path}.*Permission denied"):
        probe_storage(tmp_path, size_MB=1)
