"""Where documents come from: the synthetic corpus, the Python standard library, the user's files.

A source is an indexable list of documents per epoch: ``len(source)`` documents, and
``source.document(index, epoch)`` returns one as ``str`` (UTF-8 text), ``bytes`` (already byte
tokens) or, for SFT, a ``(ids, loss_mask)`` pair. The loader owns the order (a seeded shuffle per
epoch) and the packing; a source only has to be able to hand out document ``i`` at any time,
which is what makes an exact resume cheap.

``make_source(spec, split)`` understands:

- ``"synthetic"``: the built-in reasoning corpus; ``split="val"`` is its held-out split.
- ``"stdlib"``: the ``.py`` files of this Python's standard library (``sysconfig`` "stdlib"
  path, site-packages excluded), sorted by path; a file belongs to ``val`` when the hash of its
  relative path falls in the first ``val_percent`` buckets.
- a path: a text file (documents = blank-line separated paragraphs), a JSONL file (one document
  per line, in the ``text_field`` field), a ``.json`` array of such records, a Parquet file (the ``text_field`` column), a directory
  written by Hugging Face ``datasets``' ``save_to_disk`` (its ``.arrow`` files, read with pyarrow),
  or any other directory (every such file below it, sorted). User documents go to ``val`` by
  a hash of their text, so a duplicate never sits on both sides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sysconfig
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

from gonogo.data import synthetic
from gonogo.errors import UserError

log = logging.getLogger(__name__)

Document = Union[str, bytes, tuple]
SPLITS = ("train", "val")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


class Source(Protocol):
    name: str

    def __len__(self) -> int: ...

    def document(self, index: int, epoch: int) -> Document: ...


class ListSource:
    """Documents held in memory (user corpora, tests)."""

    def __init__(self, documents: Sequence[Document], name: str = "list") -> None:
        if not documents:
            raise UserError(f"{name}: the corpus is empty (no documents)")
        self.documents = list(documents)
        self.name = name

    def __len__(self) -> int:
        return len(self.documents)

    def document(self, index: int, epoch: int) -> Document:
        return self.documents[index]


class FileSource:
    """One document per file, read as raw bytes when asked (the byte tokenizer needs no decoding)."""

    def __init__(self, paths: Sequence[Path], name: str) -> None:
        if not paths:
            raise UserError(f"{name}: no files")
        self.paths = list(paths)
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def document(self, index: int, epoch: int) -> bytes:
        return self.paths[index].read_bytes()


def _bucket(key: bytes) -> float:
    """A stable number in [0, 100) from a hash: the split decision for one document."""
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 10_000 / 100.0


def _in_split(key: bytes, split: str, val_percent: float) -> bool:
    return (_bucket(key) < val_percent) == (split == "val")


def stdlib_files(split: str = "train", val_percent: float = 5.0) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, files in os.walk(root):
        # installed packages are not the standard library (and can be gigabytes to walk)
        subfolders[:] = [name for name in subfolders if name not in ("site-packages", "dist-packages", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                if _in_split(path.relative_to(root).as_posix().encode(), split, val_percent):
                    paths.append(path)
    return sorted(paths)


# --- user files ---------------------------------------------------------------------------------


def _paragraphs(text: str) -> list[str]:
    return [block.strip("\n") for block in re.split(r"\n\s*\n", text) if block.strip()]


def _read_text(path: Path) -> list[str]:
    try:
        return _paragraphs(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                bad.append((number, f"not JSON ({error.msg})"))
                continue
            if not isinstance(record, dict) or text_field not in record:
                bad.append((number, f"no {text_field!r} field"))
            elif not isinstance(record[text_field], str):
                bad.append((number, f"{text_field!r} is {type(record[text_field]).__name__}, not a string"))
            else:
                documents.append(record[text_field])
    for number, reason in bad[:10]:
        log.warning("%s:%d: skipped: %s", path, number, reason)
    if bad:
        log.warning("%s: skipped %d of %d lines", path, len(bad), len(bad) + len(documents))
    if not documents and bad:
        raise UserError(f"{path}:{bad[0][0]}: {bad[0][1]} (and no line had a usable {text_field!r} string; "
                        f"set the text field to the right key)")
    return documents


def _read_json_array(path: Path, text_field: str) -> list[str]:
    """A ``.json`` file: one array of records (or of strings), or else JSON lines."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _read_jsonl(path, text_field)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON array of records with a {text_field!r} field (or a JSONL file)")
    documents = [record if isinstance(record, str) else record.get(text_field) if isinstance(record, dict) else None
                 for record in records]
    bad = [number for number, document in enumerate(documents) if not isinstance(document, str)]
    if bad:
        log.warning("%s: skipped %d of %d records without a %r string (first: record %d)", path, len(bad),
                    len(documents), text_field, bad[0])
    return [document for document in documents if isinstance(document, str)]


def _column(table, path: Path, text_field: str) -> list[str]:
    if text_field not in table.column_names:
        raise UserError(f"{path}: no column {text_field!r}; columns are: {', '.join(table.column_names)} "
                        f"(choose one as the text field)")
    values = table.column(text_field).to_pylist()
    return [value for value in values if isinstance(value, str)]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as parquet

    try:
        schema = parquet.read_schema(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None
    if text_field not in schema.names:
        raise UserError(f"{path}: no column {text_field!r}; columns are: {', '.join(schema.names)} "
                        f"(choose one as the text field)")
    return _column(parquet.read_table(path, columns=[text_field]), path, text_field)


def _read_arrow_dataset(directory: Path, text_field: str) -> list[str]:
    """One split written by ``datasets``' save_to_disk: ``state.json`` lists its Arrow stream files."""
    import pyarrow as arrow

    state = json.loads((directory / "state.json").read_text())
    names = [entry["filename"] for entry in state.get("_data_files", [])] or sorted(p.name for p in directory.glob("*.arrow"))
    documents: list[str] = []
    for name in names:
        with arrow.memory_map(str(directory / name)) as stream:
            documents.extend(_column(arrow.ipc.open_stream(stream).read_all(), directory / name, text_field))
    return documents


def _hf_dataset_split(directory: Path, split: str) -> tuple[Path, bool]:
    """The split directory of a saved dataset, and whether it is already the split we want."""
    if (directory / "state.json").is_file():
        return directory, False
    splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
    wanted = ("train",) if split == "train" else ("validation", "valid", "val", "test")
    for name in wanted:
        if name in splits:
            return directory / name, True
    if "train" in splits:  # no held-out split saved: split the train split by hash
        return directory / "train", False
    raise UserError(f"{directory}: saved dataset has splits {splits}; none of them is {' or '.join(wanted)}")


def _read_path(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    if suffix == ".json":
        return _read_json_array(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, text_field)
    return _read_text(path)


def user_documents(path: Path, split: str, text_field: str = "text", val_percent: float = 5.0) -> list[str]:
    """The documents of a user's file or directory that belong to ``split``."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory (give a text, JSONL or Parquet file, or a saved dataset)")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        split_dir, exact = _hf_dataset_split(path, split)
        documents = _read_arrow_dataset(split_dir, text_field)
        if not exact:
            documents = [doc for doc in documents if _in_split(doc.encode("utf-8"), split, val_percent)]
    else:
        if path.is_dir():
            suffixes = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES | {".json"}
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not files:
                raise UserError(f"{path}: no .txt, .md, .json, .jsonl or .parquet files in this directory")
        else:
            files = [path]
        documents = [doc for file in files for doc in _read_path(file, text_field)]
        if not documents:
            raise UserError(f"{path}: the corpus is empty (no non-blank documents)")
        documents = [doc for doc in documents if _in_split(doc.encode("utf-8"), split, val_percent)]
    if not documents:
        raise UserError(f"{path}: no documents in the {split!r} split ({val_percent:g}% go to validation); "
                        f"add more data or change the validation percentage")
    return documents


def make_source(spec: str | Path, split: str = "train", *, seed: int = 0, text_field: str = "text",
                val_percent: float = 5.0, families: Optional[Sequence[str]] = None) -> Source:
    """A source from a word (``synthetic``, ``stdlib``) or a path; ``split`` is ``train`` or ``val``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not 0 < val_percent < 100:
        raise UserError(f"validation percentage {val_percent} must be between 0 and 100")
    if str(spec) == "synthetic":
        try:
            return synthetic.SyntheticSource(split, seed=seed, families=families)
        except ValueError as error:
            raise UserError(str(error)) from None
    if str(spec) == "stdlib":
        return FileSource(stdlib_files(split, val_percent), name=f"stdlib:{split}")
    path = Path(spec).expanduser()
    return ListSource(user_documents(path, split, text_field, val_percent), name=f"{path}:{split}")
