"""The files a command writes and reads: outputs checked before the work, results written atomically,
unreadable inputs turned into one line.

Every command that writes results checks its output paths with :func:`check_output_dir` /
:func:`check_output_file` before it starts (a load test or a quantization is not done only to be
lost at the end), and writes each result with :func:`write_atomic`, so a reader never sees half a
file and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Union

from gonogo.errors import UserError

log = logging.getLogger(__name__)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a dangling link counts as existing)."""
    current = path
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def _probe(directory: Path) -> None:
    """Create and remove a file in ``directory``: the only test that also holds for root, a
    read-only mount or a full disk (``os.access`` answers yes for root on a read-only mount)."""
    probe = directory / f".gonogo-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: Union[str, Path], flag: str = "--out") -> None:
    """UserError unless ``path`` is a directory this process can write in, or can create.

    Nothing is created: the nearest existing ancestor is where the directory would be made, so
    that is the one tested.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{_named(path, flag)}: is a file, not a directory; {_fix(flag)}")
    _check_creatable(path, flag, path)


def check_output_file(path: Union[str, Path], flag: str = "--json") -> None:
    """UserError unless a file can be written (atomically) at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{_named(path, flag)}: is a directory; give a file name, such as {path / 'result.json'}")
    if path.name in ("", ".", ".."):
        raise UserError(f"{_named(path, flag)}: not a file name; give one such as result.json")
    _check_creatable(path.parent, flag, path)


def _named(path: Path, flag: str) -> str:
    return f"{flag} {path}" if flag else str(path)


def _fix(flag: str) -> str:
    return f"choose another {flag}" if flag else "choose another path"


def _check_creatable(directory: Path, flag: str, named: Path) -> None:
    """UserError unless ``directory`` exists or can be made, and a file can be created in it."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        what = "a broken link" if existing.is_symlink() and not existing.exists() else "a file"
        raise UserError(f"{_named(named, flag)}: cannot be written because {existing} is {what}, "
                        f"not a directory; {_fix(flag)}")
    try:
        _probe(existing)
    except OSError as error:
        raise UserError(f"{_named(named, flag)}: cannot write in {existing} ({error.strerror or error}); "
                        f"{_fix(flag)}") from None


def write_atomic(path: Union[str, Path], data: Union[bytes, str], mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so a reader never sees half a file: a temporary file in the
    same directory, fsync, rename. On any failure the temporary file is removed and the old
    ``path`` (if any) is left as it was; an OSError becomes a UserError naming the path."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        created = True
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        if isinstance(error, OSError):
            raise UserError(f"{path}: could not be written ({error.strerror or error}); "
                            f"check the disk and the folder's permissions") from None
        raise


@contextlib.contextmanager
def new_directory(final: Union[str, Path]) -> Iterator[Path]:
    """A directory made whole or not at all: the block fills a hidden sibling (``.tmp-<name>``),
    which becomes ``final`` when the block ends and is removed when it fails or is interrupted."""
    import shutil

    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UserError(f"{final}: already exists and is not empty; choose another --out")
    temporary = final.with_name(f".tmp-{final.name}")
    if temporary.exists():  # left by a process that was killed outright
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        if final.exists():
            final.rmdir()  # empty (checked above)
        temporary.rename(final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: Union[str, Path], data: Any) -> None:
    """JSON (indented, one trailing newline) written with :func:`write_atomic`.

    Serialised before any file is opened, so a value that is not JSON leaves nothing behind.
    """
    text = json.dumps(data, indent=2, sort_keys=False, default=json_default) + "\n"
    write_atomic(path, text)


def read_json_file(path: Union[str, Path], fix: str) -> Any:
    """The JSON in ``path``; a damaged file (torn, not JSON, not UTF-8) is a UserError ending in ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        detail = " ".join(str(error).split())[:200]
        raise UserError(f"{path}: cannot be read ({type(error).__name__}: {detail}); {fix}") from None


# errors that reading a damaged or foreign file raises from json, safetensors, torch and our own
# parsers (a missing key, a list where an object belongs, a tensor of the wrong shape)
_UNREADABLE: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError, AttributeError,
                                                IndexError, RuntimeError)


def _safetensors_error() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return ()
    return (SafetensorError,)


@contextlib.contextmanager
def unreadable_input(source: Union[str, Path], what: str = "a model") -> Iterator[None]:
    """Inside: a damaged input file (truncated safetensors, broken config.json) is a UserError
    naming ``source``, not a traceback. The original error is logged at debug level (``-v``)."""
    try:
        yield
    except UserError:
        raise
    except _UNREADABLE + _safetensors_error() as error:
        if "OutOfMemory" in type(error).__name__:  # torch's OOM is a RuntimeError, and not the file's fault
            raise
        log.debug("reading %s failed", source, exc_info=True)
        detail = " ".join(str(error).split())  # torch's state-dict errors span lines
        raise UserError(f"{source}: cannot be read as {what} ({type(error).__name__}"
                        f"{': ' + detail[:200] if detail else ''}); it may be damaged or incomplete, "
                        f"export or copy it again") from None
