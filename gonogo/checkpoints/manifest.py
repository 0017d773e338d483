"""The on-disk contract of a checkpoint directory: names, durable writes, manifest, verification.

A checkpoint is trusted only when three things hold: a ``COMMITTED`` file exists (it is written
last, so a crash at any earlier moment leaves none), it holds the sha256 of ``manifest.json``,
and every file the manifest lists has its recorded size and digest. The manifest names its hash
algorithm: new ones use XXH3-128 (``{"format": 2, "algorithm": "xxh3-128"}``), computed while each
file is written (``HashingWriter``), so a save never reads its own bytes back; BLAKE3 manifests
(before 3 December 2026) and older ones without the field (sha256) still verify. Also here: finding the newest good checkpoint of
a run, and the JSON encoding of the per-rank state files. Importing this module does not import
torch, so the CLI, the plan runner and the drills stay fast.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

MANIFEST_NAME = "manifest.json"
COMMITTED_NAME = "COMMITTED"
META_NAME = "meta.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2          # 1: sha256, no "algorithm" field; 2: "algorithm" names the hash
# what new manifests use: XXH3-128 hashes at several times a fast disk's speed on one core (the
# manifest guards against accidents, not attackers: docs/checkpoint.md, "Trust"), where BLAKE3
# needed every core of a 2-core machine to keep up with its disk and took them from the read
ALGORITHM = "xxh3-128"
ALGORITHMS = ("xxh3-128", "blake3", "sha256")

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_HASH_CHUNK = 8 << 20


def step_dir_name(step: int) -> str:
    assert step >= 0, step
    return f"step-{step:08d}"


def temporary_dir_name(step: int) -> str:
    return f".tmp-{step_dir_name(step)}"


def parse_step(path: Path) -> int | None:
    """The step of a ``step-NNNNNNNN`` directory name, else None."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory under ``root`` (committed or not), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = parse_step(child)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def is_committed(path: Path) -> bool:
    return (path / COMMITTED_NAME).is_file()


def looks_like_checkpoint(path: Path) -> bool:
    """Has the files only gonogo writes into a checkpoint (used before deleting anything)."""
    return path.is_dir() and (path / META_NAME).is_file() and (path / MANIFEST_NAME).is_file()


# -- durable writes ------------------------------------------------------------------------

def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable, not just the files' data."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CorruptShard(Exception):
    """A checkpoint's shard file whose digest, computed while a load read it, does not match the
    manifest (``gonogo.checkpoints.dcp_filesystem.VerifyingReader``). The tensors it was being read
    into hold some of its bytes: the caller must not use them."""


def mismatch(relative: str, algorithm: str) -> str:
    """What a load or a verification says of a file whose digest is not the manifest's."""
    return f"{relative}: {algorithm} does not match the manifest (corrupted)"


class HashingWriter:
    """A file opened for writing that hashes every byte as it is written and is fsync'd on close.

    ``entry`` (after close): the file's manifest entry, ``{"size", <algorithm>: hex digest}``.
    Used for every file gonogo itself writes into a checkpoint (safetensors, JSON) and, through
    ``gonogo.checkpoints.writers.hashing_storage_writer``, for DCP's shard files: the digest costs no second read.
    """

    def __init__(self, path: Path, algorithm: str = ALGORITHM):
        self.path = Path(path)
        self.algorithm = algorithm
        self._hash = new_hash(algorithm)
        self._handle = open(self.path, "wb")
        self.size = 0
        self.entry: Optional[dict[str, Any]] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        written = self._handle.write(view)
        self.size += len(view)
        return written

    def close(self) -> dict[str, Any]:
        if self.entry is None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self.entry = {"size": self.size, self.algorithm: self._hash.hexdigest()}
        return self.entry

    def abort(self) -> None:
        self._handle.close()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_durable(path: Path, data: bytes) -> dict[str, Any]:
    """Write and fsync ``data``; returns its manifest entry (hashed from memory, not re-read)."""
    with HashingWriter(path) as writer:
        writer.write(data)
    assert writer.entry is not None
    return writer.entry


def write_json_durable(path: Path, value: Any) -> dict[str, Any]:
    return write_durable(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


# -- manifest ------------------------------------------------------------------------------

def new_hash(algorithm: str = ALGORITHM):
    if algorithm == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "blake3":
        import blake3

        # more than one thread only pays on large updates; small ones stay on this thread
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


def hash_file(path: Path, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file: BLAKE3 maps it and hashes on every core; the others read in chunks."""
    digest = new_hash(algorithm)
    if algorithm == "blake3":
        if Path(path).stat().st_size:
            digest.update_mmap(str(path))
        return digest.hexdigest()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(path, "sha256")


def _hash_all(paths: list[Path], algorithm: str = ALGORITHM) -> list[str]:
    if algorithm == "blake3":  # already parallel inside one file
        return [hash_file(path, algorithm) for path in paths]
    # hashlib and xxhash release the GIL on large buffers, so a few threads hash files side by side
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(paths)))) as pool:
        return list(pool.map(lambda path: hash_file(path, algorithm), paths))


def _files_under(directory: Path) -> Iterable[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path


def hash_files(directory: Path, relatives: Iterable[str], algorithm: str = ALGORITHM) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", algorithm}} of the given files under ``directory`` (read back)."""
    relatives = sorted(relatives)
    digests = _hash_all([directory / relative for relative in relatives], algorithm)
    return {relative: {"size": (directory / relative).stat().st_size, algorithm: digest}
            for relative, digest in zip(relatives, digests)}


def build_manifest(directory: Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every file under ``directory`` (but the manifest and the marker): size and digest.

    ``known``: entries hashed while the files were written (``HashingWriter``); only the other
    files are read back and hashed here.
    """
    known = {name: entry for name, entry in (known or {}).items() if ALGORITHM in entry}
    relatives = [p.relative_to(directory).as_posix() for p in _files_under(directory)]
    relatives = [r for r in relatives if r not in (MANIFEST_NAME, COMMITTED_NAME)]
    files = hash_files(directory, [r for r in relatives if r not in known])
    for relative in relatives:
        if relative in known:
            assert known[relative]["size"] == (directory / relative).stat().st_size, f"{relative} changed after hashing"
            files[relative] = {"size": known[relative]["size"], ALGORITHM: known[relative][ALGORITHM]}
    return {"format": FORMAT_VERSION, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))}


def commit(directory: Path, known: dict[str, dict[str, Any]] | None = None) -> None:
    """Write manifest.json, then COMMITTED (holding the manifest's hash), each made durable.

    Every file under ``directory`` must already be complete; all subdirectories are fsync'd
    so that their entries survive a power cut before the marker exists.
    """
    manifest = build_manifest(directory, known)
    manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    write_durable(directory / MANIFEST_NAME, manifest_bytes)
    for sub in sorted({directory / rel for rel in manifest["files"]}, key=str):
        fsync_dir(sub.parent)
    marker = {"format": FORMAT_VERSION, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    write_json_durable(directory / COMMITTED_NAME, marker)
    fsync_dir(directory)


def read_manifest(path: Path) -> tuple[Optional[dict[str, Any]], str]:
    """(manifest, "ok") when COMMITTED exists and vouches for manifest.json, else (None, why)."""
    if not is_committed(path):
        return None, "not committed (no COMMITTED marker: the save did not finish)"
    try:
        marker = json.loads((path / COMMITTED_NAME).read_text(encoding="utf-8"))
        manifest_bytes = (path / MANIFEST_NAME).read_bytes()
        manifest = json.loads(manifest_bytes)
        files = manifest["files"]
        expected_manifest_hash = marker["manifest_sha256"]
        algorithm = manifest.get("algorithm", "sha256")
        if not isinstance(files, dict):
            raise TypeError("files")
    except FileNotFoundError:
        return None, "manifest.json is missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, "COMMITTED or manifest.json is not valid"
    if hashlib.sha256(manifest_bytes).hexdigest() != expected_manifest_hash:
        return None, "manifest.json does not match the hash recorded in COMMITTED"
    if algorithm not in ALGORITHMS:
        return None, f"manifest.json uses an unknown hash algorithm {algorithm!r}"
    manifest["algorithm"] = algorithm
    return manifest, "ok"


def verify_checkpoint(path: Path, *, hashes: bool = True,
                      hashed_by_reader: Optional[Callable[[str], bool]] = None) -> tuple[bool, str]:
    """(True, "ok") for a committed checkpoint whose files match its manifest, else (False, why).

    ``hashes=False`` checks presence and sizes only (cheap; catches truncation, not bit flips).
    ``hashed_by_reader(relative)``: files whose digest a loader checks as it reads them
    (``gonogo.checkpoints.dcp_filesystem.VerifyingReader``); here only their presence and size.
    This always reads and hashes; ``gonogo.checkpoints.reference.verify`` remembers a success.
    """
    path = Path(path)
    if not path.is_dir():
        return False, "not a directory"
    manifest, reason = read_manifest(path)
    if manifest is None:
        return False, reason
    files, algorithm = manifest["files"], manifest["algorithm"]
    if META_NAME not in files:
        return False, "meta.json is not listed in the manifest"
    for relative, entry in files.items():
        file = path / relative
        if not file.is_file():
            return False, f"{relative} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return False, f"{relative} has {size} bytes, the manifest says {entry['size']}"
    if hashes:
        names = sorted(name for name in files if hashed_by_reader is None or not hashed_by_reader(name))
        for relative, digest in zip(names, _hash_all([path / name for name in names], algorithm)):
            if digest != files[relative].get(algorithm):
                return False, mismatch(relative, algorithm)
    return True, "ok"


# -- finding checkpoints -----------------------------------------------------------------------

def newest_verified(root: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest ``step-*`` under ``root`` that verifies, and the newer ones skipped, with why."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(step_dirs(Path(root))):
        ok, reason = verify_checkpoint(path)
        if ok:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def is_hf_export(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / WEIGHTS_NAME).is_file() or (path / f"{WEIGHTS_NAME}.index.json").is_file())


def checkpoint_roots(path: Path) -> list[Path]:
    """Folders holding ``step-*`` dirs: ``path`` itself, or a run dir's ``checkpoints/`` and its
    per-stage subfolders (every training stage of a plan keeps its own, ``checkpoints/<stage>/``)."""
    if step_dirs(path):
        return [path]
    base = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    roots = [base] if step_dirs(base) else []
    if base.is_dir():
        roots += [child for child in sorted(base.iterdir()) if child.is_dir() and step_dirs(child)]
    return roots


# -- plain-data encoding of per-rank state (tensors, arrays, bytes and tuples round-trip) ----

def encode_state(value: Any, where: str) -> Any:
    """``value`` as JSON-ready data; ``decode_state`` gives it back with the same types."""
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"__tensor__": base64.b64encode(raw).decode("ascii"),
                "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii"),
                "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(item, where) for item in value]}
    if isinstance(value, list):
        return [encode_state(item, where) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: encode_state(item, f"{where}.{key}") for key, item in value.items()}
        return {"__items__": [[encode_state(key, where), encode_state(item, where)] for key, item in value.items()]}
    raise TypeError(f"checkpoint: {where} holds a {type(value).__name__}; per-rank and extra state "
                    "must be numbers, strings, lists, dicts, tuples, bytes, tensors or numpy arrays")


def decode_state(value: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(value, list):
        return [decode_state(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        dtype = getattr(torch, value["dtype"])
        raw = base64.b64decode(value["__tensor__"])
        if not raw:
            return torch.empty(value["shape"], dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(value["shape"]).clone()
    if "__ndarray__" in value:
        raw = base64.b64decode(value["__ndarray__"])
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if "__tuple__" in value:
        return tuple(decode_state(item) for item in value["__tuple__"])
    if "__items__" in value:
        return {decode_state(key): decode_state(item) for key, item in value["__items__"]}
    return {key: decode_state(item) for key, item in value.items()}
