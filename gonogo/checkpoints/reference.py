"""A reference to a model on disk, resolved and verified once: ``resolve(path) -> CheckpointRef``.

``path`` may be a checkpoint dir (``step-N``), a run dir (its newest checkpoint that verifies,
under ``checkpoints/`` or a stage's ``checkpoints/<stage>/``; in a run without any, the newest
model a stage recorded, such as ``gonogo quantize``'s quantized checkpoint), a checkpoints dir, a
quantized checkpoint, or a Hugging Face directory (``config.json`` + safetensors). The reference
carries the directory, its format (``gonogo``, ``quantized`` or ``hf``), its metadata
(``meta.json``, or the HF ``config.json``) and its verified manifest, so a command resolves once
and hands the reference on; loaders (``gonogo.checkpoints.loaders``) take it without hashing again.

Verifying a checkpoint reads and hashes every byte it holds. ``verify`` remembers each success
for the life of the process, keyed by the directory and the size, mtime and inode of every file
its manifest lists, so a later resolve of the same, unchanged checkpoint (a command that resolves
in its parent check and again in its loader) is a cache hit; a file rewritten since misses and is
hashed again. ``STATS`` counts both (tests read it) and each real verification logs one line:
``verified checkpoint DIR: N files, M bytes in S s (xxh3-128)``.

Importing this module, and resolving, never imports torch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from gonogo.checkpoints import manifest
from gonogo.errors import UserError

log = logging.getLogger(__name__)

TRAIN_STATE_NAME = "train_state.json"
QUANTIZATION_NAME = "quantization.json"  # written by gonogo.checkpoints.quantized
FORMATS = ("gonogo", "quantized", "hf")


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved model directory. ``verified``: every file was hashed against a committed
    manifest in this process (a Hugging Face directory has no manifest: False)."""

    path: Path
    format: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    manifest: Optional[dict[str, Any]] = field(default=None, compare=False, repr=False)
    verified: bool = False

    @property
    def step(self) -> Optional[int]:
        if self.format == "hf":
            return (self.meta.get("gonogo") or {}).get("step")
        return self.meta.get("step")

    @property
    def model_config(self) -> Optional[dict[str, Any]]:
        """The saved ModelConfig fields (gonogo and quantized; None for an HF directory)."""
        return self.meta.get("model") if self.format != "hf" else None

    @property
    def tokenizer(self) -> Optional[str]:
        return self.meta.get("tokenizer") if self.format != "hf" else None

    @property
    def has_consolidated_weights(self) -> bool:
        return (self.path / manifest.WEIGHTS_NAME).is_file()

    def __fspath__(self) -> str:  # open(ref), Path(ref), subprocess args: the directory
        return str(self.path)


@dataclass
class VerifyStats:
    verifications: int = 0   # checkpoints hashed in full
    cache_hits: int = 0      # verifications skipped: unchanged since this process verified them
    bytes_hashed: int = 0

    def reset(self) -> None:
        self.verifications = self.cache_hits = self.bytes_hashed = 0


STATS = VerifyStats()
_VERIFIED: dict[Path, tuple[tuple, dict[str, Any]]] = {}


def _signature(path: Path, listed: dict[str, Any]) -> Optional[tuple]:
    """What must be unchanged for a remembered verification to hold (None: a file is gone)."""
    parts = []
    for relative in (manifest.COMMITTED_NAME, manifest.MANIFEST_NAME, *sorted(listed)):
        try:
            stat = (path / relative).stat()
        except OSError:
            return None
        parts.append((relative, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(parts)


def _look_up(path: Path) -> tuple[Optional[dict[str, Any]], str, Optional[tuple], bool]:
    """(committed manifest or None, why not, the files' signature, whether a verification of the
    whole checkpoint in this process still holds)."""
    listed, reason = manifest.read_manifest(path) if path.is_dir() else (None, "not a directory")
    if listed is None:
        return None, reason, None, False
    signature = _signature(path, listed["files"])
    remembered = _VERIFIED.get(path)
    return listed, reason, signature, signature is not None and remembered is not None and remembered[0] == signature


def _check_files(path: Path, listed: dict[str, Any],
                 hashed_by_reader: Optional[Callable[[str], bool]] = None) -> tuple[bool, str]:
    """``manifest.verify_checkpoint`` and the rule that every file a load reads is listed."""
    ok, reason = manifest.verify_checkpoint(path, hashed_by_reader=hashed_by_reader)
    if ok:
        unlisted = unlisted_file(path, listed)
        if unlisted is not None:
            ok, reason = False, f"{unlisted} is not listed in the manifest (an unverified file is never loaded)"
    return ok, reason


def verify(path: Path) -> tuple[bool, str, Optional[dict[str, Any]]]:
    """(ok, reason, manifest) for a checkpoint dir: ``manifest.verify_checkpoint`` plus the rule
    that every file a load reads is listed (DCP's ``.metadata`` is a pickle: an unlisted file was
    never hashed, so it is never unpickled). A success is remembered (see the module doc)."""
    path = Path(path).resolve()
    listed, reason, signature, remembered = _look_up(path)
    if listed is None:
        return False, reason, None
    if remembered:
        STATS.cache_hits += 1
        log.debug("checkpoint %s: verified earlier in this process, unchanged", path)
        return True, "ok", _VERIFIED[path][1]
    started = time.perf_counter()
    ok, reason = _check_files(path, listed)
    total = sum(int(entry["size"]) for entry in listed["files"].values())
    STATS.verifications += 1
    STATS.bytes_hashed += total
    if not ok:
        _VERIFIED.pop(path, None)
        return False, reason, None
    log.info("verified checkpoint %s: %d files, %d bytes in %.2f s (%s)", path, len(listed["files"]), total,
             time.perf_counter() - started, listed["algorithm"])
    if signature is not None:
        _VERIFIED[path] = (signature, listed)
    return True, "ok", listed


def is_shard_file(relative: str) -> bool:
    """A DCP shard file of a checkpoint (``dcp/__<rank>_<n>.distcp``): tensor data, the bulk of its bytes."""
    return relative.startswith("dcp/") and relative.endswith(".distcp")


def check_before_restore(path: Path) -> tuple[bool, str, Optional[dict[str, Any]]]:
    """(ok, reason, shard digests) for a training restore that hashes the shard files as it reads
    them (``VerifyingReader``): the checks of ``verify``, with every other file the restore reads
    hashed here, before anything is parsed (DCP's ``.metadata`` is a pickle), the shard files
    checked for size only and their manifest entries returned ({name under dcp/: entry},
    "algorithm"), and model.safetensors, which the restore does not read, for size only. The
    digests are None where a remembered verification of the whole checkpoint still holds."""
    path = Path(path).resolve()
    listed, reason, _, remembered = _look_up(path)
    if listed is None:
        return False, reason, None
    if remembered:
        STATS.cache_hits += 1
        return True, "ok", None
    ok, reason = _check_files(path, listed,
                              lambda relative: is_shard_file(relative) or relative == manifest.WEIGHTS_NAME)
    if not ok:
        return False, reason, None
    shards = {relative[len("dcp/"):]: entry for relative, entry in listed["files"].items() if is_shard_file(relative)}
    return True, "ok", {"algorithm": listed["algorithm"], "files": shards}


def unlisted_file(path: Path, listed: dict[str, Any]) -> Optional[str]:
    """The first file a load would read that the (verified) manifest does not list, or None."""
    names = set(listed["files"])
    readable = [file for folder in ("dcp", "ranks") if (path / folder).is_dir()
                for file in sorted((path / folder).rglob("*")) if file.is_file()]
    readable += [path / name for name in (TRAIN_STATE_NAME, manifest.WEIGHTS_NAME) if (path / name).is_file()]
    for file in readable:
        relative = file.relative_to(path).as_posix()
        if relative not in names:
            return relative
    return None


def newest_verified(root: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest ``step-*`` under ``root`` that verifies, and the newer ones skipped, with why."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(manifest.step_dirs(Path(root))):
        ok, reason, _ = verify(path)
        if ok:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _checkpoint_ref(path: Path, listed: dict[str, Any]) -> CheckpointRef:
    kind = "quantized" if (path / QUANTIZATION_NAME).is_file() else "gonogo"
    return CheckpointRef(path, kind, _read_json(path / manifest.META_NAME), listed, verified=True)


def _hf_ref(path: Path) -> CheckpointRef:
    try:
        config = _read_json(path / "config.json")
    except ValueError as error:
        raise UserError(f"{path / 'config.json'}: not valid JSON ({error})") from None
    return CheckpointRef(path, "hf", config if isinstance(config, dict) else {}, None, verified=False)


def resolve(path: "str | Path | CheckpointRef") -> CheckpointRef:
    """A checkpoint dir, a run dir (its newest verified checkpoint under checkpoints/), a
    checkpoints dir, or a Hugging Face directory (config.json + model.safetensors) -> its reference.

    UserError when it is none of these, or when the checkpoint does not verify. A reference
    given back in is returned as it is (it was verified when it was made).
    """
    if isinstance(path, CheckpointRef):
        return path
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory (give a checkpoint, run or Hugging Face export directory)")
    if manifest.is_committed(path) or (path / manifest.META_NAME).is_file():
        ok, reason, listed = verify(path)
        if not ok or listed is None:
            raise UserError(f"{path}: checkpoint cannot be used: {reason}")
        return _checkpoint_ref(path, listed)
    if manifest.is_hf_export(path):
        return _hf_ref(path)
    roots = manifest.checkpoint_roots(path)
    recorded = [] if roots else recorded_models(path)
    if not roots and not recorded and (path / "checkpoints").is_dir():
        raise UserError(f"{path}: no committed checkpoint under {path / 'checkpoints'} (none saved yet)")
    if not roots and not recorded:
        raise UserError(f"{path}: not a checkpoint, run or Hugging Face export directory "
                        "(expected COMMITTED + meta.json, checkpoints/step-*/, or config.json + model.safetensors)")
    # the run's newest model: the last checkpoint committed by any of its training stages, else
    # by any stage that recorded one (a run of `gonogo quantize` has no training checkpoint)
    choice, skipped = newest_verified_across(roots) if roots else newest_that_verifies(recorded)
    if choice is None:
        why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped) or "none saved yet"
        raise UserError(f"{path}: no committed checkpoint that verifies under {path} ({why})")
    for skipped_path, reason in skipped:
        log.warning("skipping %s: %s", skipped_path, reason)
    ok, reason, listed = verify(choice)  # verified just above: a cache hit
    if not ok or listed is None:
        raise UserError(f"{choice}: checkpoint cannot be used: {reason}")
    return _checkpoint_ref(choice, listed)


def newest_verified_across(roots: "list[Path]") -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The last committed ``step-*`` under any of ``roots`` that verifies, and the newer ones
    skipped, with why. Tried newest first (a torn one by its folder's time), so when the newest
    is good it is the only one hashed: a run of several training stages is not verified stage by
    stage to pick one."""
    return newest_that_verifies([step_path for root in roots for _, step_path in manifest.step_dirs(root)])


def newest_that_verifies(candidates: "list[Path]") -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest of ``candidates`` that verifies, and the newer ones skipped, with why."""
    skipped: list[tuple[Path, str]] = []
    for candidate in sorted(candidates, key=_written_at, reverse=True):
        ok, reason, _ = verify(candidate)
        if ok:
            return candidate, skipped
        skipped.append((candidate, reason))
    return None, skipped


def recorded_models(run: Path) -> list[Path]:
    """The models the stages of run directory ``run`` recorded as theirs (``stages/<name>/`` and
    its outputs file, written by ``StageContext.record_output``), those still on disk."""
    from gonogo.files import read_json_file
    from gonogo.stages.base import OUTPUTS_FILE

    models = []
    for outputs in sorted((run / "stages").glob(f"*/{OUTPUTS_FILE}")):
        produced = read_json_file(outputs, "the run directory is damaged; give the model's own directory")
        if isinstance(produced, dict) and produced.get("checkpoint") and Path(produced["checkpoint"]).is_dir():
            models.append(Path(produced["checkpoint"]))
    return models


def served_model(run: Path) -> Optional[Path]:
    """The model run directory ``run``'s serve stage served (the newest such stage's
    ``server.json``), when it is a checkpoint or Hugging Face directory still on disk; else None.

    ``gonogo serve --checkpoint RUN_DIR`` serves that: the plan's product (the laptop plan serves
    its finetune), not whichever training stage committed last (there, the soak's short run).
    Training and the other readers keep ``resolve``'s rule.
    """
    from gonogo.files import read_json_file

    candidates = []
    for server_file in Path(run).glob("stages/*/server.json"):
        served = read_json_file(server_file, "the run directory is damaged; give the model's own directory")
        checkpoint = Path(served["checkpoint"]) if isinstance(served, dict) and served.get("checkpoint") else None
        if checkpoint is None or not checkpoint.is_dir():
            continue
        if manifest.is_committed(checkpoint) or (checkpoint / manifest.META_NAME).is_file() \
                or manifest.is_hf_export(checkpoint):  # a model directory, not the run itself
            candidates.append((server_file.stat().st_mtime, str(checkpoint)))
    return Path(max(candidates)[1]) if candidates else None


def _written_at(path: Path) -> float:
    """When a checkpoint was committed (its COMMITTED file), else when its folder last changed."""
    for candidate in (path / manifest.COMMITTED_NAME, path):
        try:
            return candidate.stat().st_mtime
        except OSError:
            continue
    return 0.0


def resolve_path(path: "str | Path | CheckpointRef") -> Path:
    """``resolve(path).path``."""
    return resolve(path).path


def training_checkpoint(path: "str | Path | CheckpointRef") -> CheckpointRef:
    """A checkpoint to resume training from (an HF export has no optimizer state)."""
    ref = resolve(path)
    if ref.format != "gonogo":
        raise UserError(f"{path}: a {'Hugging Face export' if ref.format == 'hf' else 'quantized checkpoint'} "
                        "has no optimizer or data state to resume training from; give a gonogo checkpoint or "
                        "run directory")
    return ref


def check_resume_path(resume: str) -> None:
    """UserError (one line) when ``resume`` is a path that is not a checkpoint that verifies.

    Run in the parent before any worker starts, so a checkpoint from outside the run is checked
    before DCP unpickles its metadata in every rank.
    """
    if resume in ("auto", "never"):
        return
    training_checkpoint(Path(resume))


def check_readable(ref: "CheckpointRef | str | Path") -> None:
    """UserError (one line) if a resolved model directory cannot be loaded: for a Hugging Face
    directory its config.json and safetensors headers are read (cheap); a gonogo checkpoint was
    already verified against its manifest by ``resolve``. Commands call it before they create
    their run directory, so a damaged input leaves nothing behind."""
    ref = resolve(ref)
    if ref.format != "hf":
        return
    from gonogo.checkpoints.hf_import import check_hf_weights, hf_model_config
    from gonogo.files import unreadable_input

    with unreadable_input(ref.path):
        hf_model_config(ref.path)
        check_hf_weights(ref.path)
