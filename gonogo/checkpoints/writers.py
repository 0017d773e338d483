"""Writing a checkpoint's data files with their digests computed as the bytes go out.

- ``write_safetensors``: a safetensors file written tensor by tensor through a
  ``manifest.HashingWriter`` (no serialised copy of the weights in memory, no read-back hash).
  The layout is the safetensors format itself (8-byte header length, JSON header, raw
  little-endian tensor bytes), so ``safetensors.torch.load_file`` and Hugging Face read it.
- ``HashingFileSystemWriter``: DCP's ``FileSystemWriter`` whose streams hash what DCP writes;
  after ``dcp.save`` its ``entries`` are the manifest entries of the files it wrote.

torch is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any, Optional

from gonogo.checkpoints import manifest

_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
           "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
           "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32",
           "uint64": "U64"}


def write_safetensors(path: Path, weights: dict, metadata: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Write ``weights`` (name -> CPU tensor) as a safetensors file; its manifest entry.

    Tensors are laid out in name order (the file is byte-identical for identical weights); tied
    weights are simply written twice, as safetensors' own ``save_file`` does after a clone.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    tensors, offset = [], 0
    for name in sorted(weights):
        tensor = weights[name].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        tensors.append(tensor)
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with manifest.HashingWriter(path) as writer:
        writer.write(struct.pack("<Q", len(encoded)))
        writer.write(encoded)
        for tensor in tensors:
            if tensor.numel():
                writer.write(tensor.reshape(-1).view(torch.uint8).numpy())
    path.chmod(0o644)
    assert writer.entry is not None
    return writer.entry


class _HashingStream(io.RawIOBase):
    """A binary file stream that hashes what is written; a seek makes its digest unusable."""

    def __init__(self, path: Path):
        super().__init__()
        self._writer = manifest.HashingWriter(path)
        self.sequential = True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._writer.write(data)

    def tell(self) -> int:
        return self._writer.size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if (whence, offset) in ((os.SEEK_CUR, 0), (os.SEEK_END, 0)) or (whence == os.SEEK_SET and offset == self.tell()):
            return self.tell()
        self.sequential = False  # the bytes are no longer written in order: hash the file afterwards
        return self._writer._handle.seek(offset, whence)

    def fileno(self) -> int:
        return self._writer._handle.fileno()

    def flush(self) -> None:
        if not self._writer._handle.closed:
            self._writer._handle.flush()

    def close(self) -> None:
        if not self.closed:
            self._writer.close()
        super().close()

    @property
    def entry(self) -> Optional[dict[str, Any]]:
        return self._writer.entry if self.sequential else None


def hashing_storage_writer(directory: Path):
    """A DCP ``FileSystemWriter`` for ``directory`` that records each written file's manifest
    entry in ``.entries`` ({name relative to ``directory``: entry})."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    from gonogo.checkpoints.dcp_filesystem import without_zip_crc32

    root = Path(directory)

    class HashingFileSystem(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.entries: dict[str, dict[str, Any]] = {}
            self._lock = threading.Lock()

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            stream = _HashingStream(Path(path))
            try:
                with without_zip_crc32():  # the manifest's digest covers every byte
                    yield stream
            finally:
                stream.close()
                entry = stream.entry
                with self._lock:
                    if entry is not None:
                        self.entries[Path(path).relative_to(root).as_posix()] = entry

        def rename(self, path, new_path) -> None:
            super().rename(path, new_path)
            with self._lock:
                entry = self.entries.pop(Path(path).relative_to(root).as_posix(), None)
                if entry is not None:
                    self.entries[Path(new_path).relative_to(root).as_posix()] = entry

    writer = FileSystemWriter(str(root))
    writer.fs = HashingFileSystem()
    return writer
