"""The training side of checkpoints: atomic, verified DCP saves (sync or async), resume, retention.

On disk, under the checkpoints root (``<run>/checkpoints``)::

    step-00000040/
      dcp/                  torch.distributed.checkpoint files: sharded model + optimizer
      ranks/rank-00000.json per-rank state: loader position and RNG states (one file per rank)
      train_state.json      step, scheduler state and the trainer's ``extra`` dict (rank 0's)
      model.safetensors     consolidated full weights (rank 0), only when save(consolidate=True):
                            the training loop asks for it on its last save; inference reads it,
                            or the model part of dcp/ when a checkpoint has none
      meta.json             {"step", "model", "tokenizer", "world_size", "train", "created"}
      manifest.json         every file's relative path, size and XXH3-128 digest (hashed while
                            the files were written: a save reads nothing back)
      COMMITTED             written last; holds the sha256 of manifest.json

A save writes everything into ``.tmp-step-00000040/`` and renames it into place only after
``COMMITTED`` is durable, so a crash leaves either a complete checkpoint or a hidden temporary
directory, never a half-written ``step-*``. A checkpoint is loaded only when it verifies (see
``gonogo.checkpoints.manifest`` and ``gonogo.checkpoints.reference``). The per-rank JSON files are plain data (no pickles), so they can be
read and diffed by hand. Loading a checkpoint for inference is ``gonogo.checkpoints.loaders``.

Usage inside a torchrun worker (every rank calls every method)::

    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=3)
    resumed = checkpointer.load_latest("auto", model, optimizer, scheduler, model_config=config)
    step = resumed.step                              # 0 when nothing was loaded
    if resumed.loader_state is not None:
        loader.load_state_dict(resumed.loader_state)
    ...
    checkpointer.save(step, model, optimizer, scheduler, loader.state_dict(), extra={...},
                      model_config=config, meta={"train": train_config.model_dump()})
    ...
    checkpointer.close()                             # waits until an async save has committed

Loading at another world size (resharding): DCP redistributes the model and optimizer shards
to the new layout. Per-rank state cannot map one to one, so the rule is: every rank receives
rank 0's saved loader state (``Resumed.resharded`` is True; the loader takes the global data
position from it), and every rank reseeds torch, Python and NumPy with ``seed_for(step, rank)``
so a resharded resume is deterministic, though not bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from gonogo.checkpoints import adapters, manifest
from gonogo.checkpoints.loaders import read_dcp_model_weights
from gonogo.checkpoints.manifest import CorruptShard
from gonogo.checkpoints.reference import (
    QUANTIZATION_NAME,
    TRAIN_STATE_NAME,
    check_before_restore,
    training_checkpoint,
)
from gonogo.checkpoints.writers import hashing_storage_writer, write_safetensors
from gonogo.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_NAME = "byte-v1"
WEIGHTS_NAME = manifest.WEIGHTS_NAME

__all__ = ["Checkpointer", "Resumed", "seed_for"]


@dataclass
class Resumed:
    """What ``Checkpointer.load_latest`` restored (``path`` is None when it started fresh)."""

    path: Optional[Path]
    step: int
    loader_state: Optional[dict]
    extra: dict
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (checkpoint, why not loaded)
    resharded: bool = False  # saved at another world size: loader/RNG state mapped (see module doc)


def seed_for(step: int, rank: int) -> int:
    """The RNG seed a rank uses after a resharded resume (deterministic in step and rank)."""
    return (step * 1_000_003 + rank * 7_919 + 12_345) % (2**31 - 1)


# -- process group helpers (all of them work without torch.distributed: one process) -------

def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def _world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def _gather_to_rank0(value: Any) -> list:
    """Every rank's ``value`` as a list on rank 0 (an empty list elsewhere)."""
    dist = _dist()
    if not dist:
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []


def _state_dicts(model, optimizer) -> dict[str, Any]:
    """What DCP saves and loads in place: the model's state dict, and the optimizer's with it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (decisions such as 'which checkpoint' are made once)."""
    dist = _dist()
    if not dist:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _reseed(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def _config_dict(model_config: Any) -> dict:
    if hasattr(model_config, "model_dump"):
        return model_config.model_dump(mode="json")
    assert isinstance(model_config, dict), type(model_config)
    return dict(model_config)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / "ranks" / f"rank-{rank:05d}.json"


def _check_same_model(directory: Path, saved: dict, model_config: Any) -> None:
    """UserError when the checkpoint was saved for a model of another shape or setting."""
    if model_config is None:
        return
    current = _config_dict(model_config)
    try:  # fields added to ModelConfig since the checkpoint was written count as their defaults
        from gonogo.model.shape import ModelConfig

        saved = ModelConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:
        pass  # not a ModelConfig the running code knows: compare as saved
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        raise UserError(f"{directory}: checkpoint is of a different model ({'; '.join(differences)}); "
                        "use the same [model] settings, or start fresh with --resume never")


def _training_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint dir a load of ``path`` reads: a committed gonogo checkpoint dir as it is (the
    load checks it, in one pass with its read), anything else (a run dir ...) resolved and verified."""
    path = Path(path)
    if manifest.is_committed(path) and not (path / QUANTIZATION_NAME).exists():
        return path
    return training_checkpoint(path).path


def _full_model_state(model) -> dict:
    """Full (unsharded) weights on CPU; a collective under FSDP, so every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Checkpointer:
    """Saves and restores checkpoints under ``root`` (the directory holding ``step-*`` dirs).

    keep_last: committed checkpoints kept after each save (the newest is never deleted);
    keep_every: also keep every checkpoint whose step is a multiple of it;
    async_mode: ``save`` returns once the state is staged in memory; the files are written in
    the background (DCP's process-based async save under torch.distributed, a thread in a
    single process) and the checkpoint is committed when the write completes; at the latest
    when the next ``save``, ``wait`` or ``close`` is called.
    """

    def __init__(self, root: Path, *, keep_last: int = 3, keep_every: Optional[int] = None,
                 async_mode: bool = False):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least 1 checkpoint")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every={keep_every}: must be >= 1 (or None)")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_mode = async_mode
        self._pending: Optional[_PendingSave] = None
        self._stager: Any = None  # DCP's staging buffers, kept so later async saves reuse the memory
        self.last_commit_time: Optional[float] = None  # time.monotonic() of the last commit (rank 0)

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, loader_state: Optional[dict], extra: Optional[dict],
             model_config, meta: Optional[dict] = None, *, consolidate: bool = True) -> Path:
        """Save the state of ``step``; returns the final ``step-N`` path (committed on return
        unless async_mode, where ``wait()`` guarantees it).

        loader_state: this rank's data position (each rank gets its own back); extra: the
        trainer's own JSON-like state (rank 0's is kept); meta: more fields for meta.json,
        e.g. {"train": train_config_dict}; consolidate: also write the full weights as
        model.safetensors (a second copy of the model's bytes: a save that only serves resume
        leaves it out, and inference reads the model from dcp/ instead).
        """
        import torch.distributed.checkpoint as dcp

        self.wait()
        rank, world_size = _rank(), _world_size()
        final = self.root / manifest.step_dir_name(step)
        temporary = self.root / manifest.temporary_dir_name(step)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if temporary.exists():  # left by a save of this step that crashed: never committed
                shutil.rmtree(temporary)
            (temporary / "ranks").mkdir(parents=True)
        _barrier()
        rank_state = {"rank": rank, "world_size": world_size, "step": step,
                      "loader": manifest.encode_state(loader_state, "loader_state"), "rng": manifest.encode_state(_rng_state(), "rng")}
        rank_entry = manifest.write_json_durable(_rank_file(temporary, rank), rank_state)
        own = {_rank_file(temporary, rank).relative_to(temporary).as_posix(): rank_entry}

        state = _state_dicts(model, optimizer)
        meta_record = {"step": step, "model": _config_dict(model_config), "tokenizer": TOKENIZER_NAME,
                       "world_size": world_size, "train": {},
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for key, value in (meta or {}).items():
            assert key not in ("step", "model", "world_size", "created"), f"meta.json's {key!r} is set by the checkpointer"
            meta_record[key] = value
        train_state = {"step": step, "scheduler": manifest.encode_state(scheduler.state_dict() if scheduler else None, "scheduler"),
                       "extra": manifest.encode_state(extra or {}, "extra")}
        _barrier()  # every rank's own file is on disk before rank 0 can list the directory

        if not self.async_mode:
            full_weights = _full_model_state(model) if consolidate else None
            # each rank hashes the files it writes as it writes them: nothing is read back
            writer = hashing_storage_writer(temporary / "dcp")
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(temporary / "dcp"), storage_writer=writer,
                         no_dist=_dist() is None)
            own.update({f"dcp/{name}": entry for name, entry in writer.fs.entries.items()})
            known = _gather_to_rank0(own)
            if rank == 0:
                self._commit(temporary, final, full_weights, meta_record, train_state,
                             {name: entry for part in known for name, entry in part.items()})
            _barrier()  # nobody continues (or loads) before the checkpoint is committed
            return final

        future = self._async_save(state, temporary / "dcp")
        pending = _PendingSave(final, future, consolidate=consolidate)
        known = _gather_to_rank0(own)
        if rank == 0:
            pending.committer = threading.Thread(
                target=self._commit_when_written, name=f"gonogo-commit-{step}", daemon=True,
                args=(pending, temporary, meta_record, train_state,
                      {name: entry for part in known for name, entry in part.items()}))
            pending.committer.start()
        self._pending = pending
        return final

    def _async_save(self, state: dict, directory: Path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        # under torch.distributed the write runs in DCP's background process, which has its own
        # gloo group, so the loop's collectives and the checkpoint's never share one group
        kind = AsyncCheckpointerType.PROCESS if _dist() else AsyncCheckpointerType.THREAD
        if self._stager is None:
            # shared memory: the staged copy goes to the background process without another copy
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=_dist() is not None,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        from gonogo.checkpoints.dcp_filesystem import crc_free_storage_writer

        with _single_process_quiet():
            response = dcp.async_save(state, storage_writer=crc_free_storage_writer(directory),
                                      async_checkpointer_type=kind, async_stager=self._stager,
                                      no_dist=_dist() is None)
        return getattr(response, "upload_completion", response)

    def _commit_when_written(self, pending: "_PendingSave", temporary, meta_record, train_state, known) -> None:
        try:
            pending.future.result()
            full_weights = None
            if pending.consolidate:
                with _single_process_quiet():
                    full_weights = read_dcp_model_weights(temporary / "dcp")
            # DCP wrote the shards in its own process: they are hashed here, off the training thread
            self._commit(temporary, pending.final, full_weights, meta_record, train_state, known)
        except BaseException as error:  # re-raised by wait(), on the training thread
            pending.error = error

    def _commit(self, temporary: Path, final: Path, full_weights: Optional[dict], meta_record: dict,
                train_state: dict, known: Optional[dict] = None) -> None:
        """Rank 0: consolidated weights (when given), meta, manifest, COMMITTED, rename, retention.

        ``known``: manifest entries of files hashed as they were written; any other file under
        ``temporary`` is read back and hashed by ``manifest.commit``.
        """
        known = dict(known or {})
        if full_weights is not None:
            if adapters.is_lora_state(full_weights):  # the consolidated weights are merged
                train = meta_record.get("train") or {}
                full_weights, lora_weights = adapters.merge(full_weights, train["lora_rank"], train["lora_alpha"])
                known[adapters.ADAPTERS_NAME] = write_safetensors(temporary / adapters.ADAPTERS_NAME, lora_weights)
            known[WEIGHTS_NAME] = write_safetensors(temporary / WEIGHTS_NAME, full_weights)
        known[TRAIN_STATE_NAME] = manifest.write_json_durable(temporary / TRAIN_STATE_NAME, train_state)
        known[manifest.META_NAME] = manifest.write_json_durable(temporary / manifest.META_NAME, meta_record)
        manifest.commit(temporary, known)
        if final.exists():
            # a checkpoint of the same step from an earlier attempt (e.g. a corrupt one that was
            # skipped on resume): keep it aside instead of deleting what we did not just write
            aside = final.with_name(f"{final.name}.replaced-{int(time.time())}")
            log.warning("%s already exists; moving it to %s", final, aside.name)
            final.rename(aside)
        temporary.rename(final)
        manifest.fsync_dir(self.root)
        self.last_commit_time = time.monotonic()
        log.info("checkpoint committed: %s", final)
        self._apply_retention(keep=final)

    def _apply_retention(self, keep: Path) -> None:
        committed = [(step, path) for step, path in manifest.step_dirs(self.root) if manifest.is_committed(path)]
        kept = {path for _, path in committed[-self.keep_last:]} | {keep}
        if self.keep_every:
            kept |= {path for step, path in committed if step % self.keep_every == 0}
        for _step, path in committed:
            if path in kept or not manifest.looks_like_checkpoint(path):
                continue
            # hide it first, so a crash half-way through the delete leaves no torn step-* dir
            doomed = path.with_name(f".delete-{path.name}")
            path.rename(doomed)
            shutil.rmtree(doomed)
            log.info("retention: deleted %s", path.name)

    def wait(self) -> None:
        """Block until a pending async save has committed (every rank calls it)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.committer is not None:
            pending.committer.join()
        else:
            try:
                pending.future.result()
            except BaseException as error:  # raised after the barrier, so no rank is left waiting
                pending.error = error
        _barrier()
        if pending.error is not None:
            raise RuntimeError(f"async checkpoint {pending.final.name} failed") from pending.error

    def close(self) -> None:
        """Wait for a pending async save (call before the process group is destroyed)."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # -- loading --------------------------------------------------------------------------
    def load(self, path: str | Path, model, optimizer=None, scheduler=None, *, model_config=None
             ) -> tuple[int, Optional[dict], dict]:
        """Load one checkpoint (a checkpoint dir or a run dir) -> (step, loader_state, extra).

        UserError when ``path`` is not a checkpoint, does not verify, or is of another model;
        nothing on disk is changed by a failed load.
        """
        resumed = self._load_checked(_training_checkpoint_dir(path), model, optimizer, scheduler, model_config)
        return resumed.step, resumed.loader_state, resumed.extra

    def load_latest(self, resume: str | Path, model, optimizer=None, scheduler=None, *,
                    model_config=None) -> Resumed:
        """``resume``: "never" (fresh start), "auto" (the newest committed checkpoint under root
        that verifies; torn or corrupt newer ones are skipped and listed in ``skipped``), or a
        path (that checkpoint, or UserError)."""
        if str(resume) == "never":
            return Resumed(None, 0, None, {})
        if str(resume) != "auto":
            return self._load_checked(_training_checkpoint_dir(resume), model, optimizer, scheduler, model_config)
        candidates = _from_rank0([path for _, path in reversed(manifest.step_dirs(self.root))]
                                 if _rank() == 0 else None)
        skipped: list[tuple[Path, str]] = []
        overwritten: Optional[Path] = None
        for path in candidates:  # newest first
            resumed, reason, touched = self._attempt(path, model, optimizer, scheduler, model_config)
            if resumed is not None:
                resumed.skipped = skipped
                return resumed
            overwritten = path if touched else overwritten
            log.warning("resume: skipping %s: %s", path, reason)
            skipped.append((path, reason))
        if overwritten is not None:
            # an older checkpoint would have overwritten every tensor; a fresh start cannot use them
            raise UserError(f"no checkpoint under {self.root} can be loaded ({'; '.join(f'{p.name}: {r}' for p, r in skipped)}); "
                            f"{overwritten.name} was found corrupt while it was being read into the model and "
                            f"optimizer, so their tensors are no longer the fresh ones: start again with "
                            f"--resume never, or move the bad checkpoints away")
        return Resumed(None, 0, None, {}, skipped=skipped)

    def _load_checked(self, path: Path, model, optimizer, scheduler, model_config) -> Resumed:
        resumed, reason, touched = self._attempt(path, model, optimizer, scheduler, model_config)
        if resumed is not None:
            return resumed
        if touched:
            reason += " (found while reading it into the model and optimizer, whose tensors must not be used now)"
        raise UserError(f"{path}: checkpoint cannot be loaded: {reason} "
                        "(use --resume auto to take the newest good one)")

    def _attempt(self, path: Path, model, optimizer, scheduler, model_config
                 ) -> tuple[Optional[Resumed], str, bool]:
        """(what was restored or None, why not, whether the model's and optimizer's tensors were
        written before a shard turned out corrupt): ``check_before_restore`` on rank 0, then the
        restore that checks the shards while it reads them."""
        ok, reason, shards = _from_rank0(check_before_restore(path) if _rank() == 0 else None)
        if not ok:
            return None, reason, False
        try:
            return self._restore(path, model, optimizer, scheduler, model_config, shards), "ok", False
        except CorruptShard as error:
            return None, str(error), True

    def _restore(self, path: Path, model, optimizer, scheduler, model_config,
                 shards: Optional[dict[str, Any]]) -> Resumed:
        """Load ``path``, checked by ``check_before_restore`` (``shards``: the shard files' digests,
        checked while they are read; None: the whole checkpoint was verified already).
        ``CorruptShard`` when a shard's digest does not match (the tensors are then partly overwritten)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        from gonogo.checkpoints.dcp_filesystem import DirectReader, VerifyingReader

        meta = _read_json(path / manifest.META_NAME)
        _check_same_model(path, meta["model"], model_config)
        state = _state_dicts(model, optimizer)
        reader = (DirectReader(path / "dcp") if shards is None
                  else VerifyingReader(path / "dcp", shards["files"], shards["algorithm"]))
        try:
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(path / "dcp"), storage_reader=reader, no_dist=_dist() is None)
        except CheckpointException as error:
            corrupt = [failure[0] for failure in error.failures.values() if isinstance(failure[0], CorruptShard)]
            if corrupt:
                raise corrupt[0] from None
            raise
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

        train_state = manifest.decode_state(_read_json(path / TRAIN_STATE_NAME))
        if scheduler is not None:
            assert train_state["scheduler"] is not None, f"{path} was saved without a scheduler"
            scheduler.load_state_dict(train_state["scheduler"])
        step = int(train_state["step"])
        rank, world_size = _rank(), _world_size()
        resharded = int(meta["world_size"]) != world_size
        if resharded:
            rank_state = manifest.decode_state(_read_json(_rank_file(path, 0)))
            _reseed(seed_for(step, rank))
            log.info("resume: world size %s -> %s: rank 0's loader state for every rank, RNG reseeded",
                     meta["world_size"], world_size)
        else:
            rank_state = manifest.decode_state(_read_json(_rank_file(path, rank)))
            _set_rng_state(rank_state["rng"])
        log.info("resumed from %s (step %d)", path, step)
        return Resumed(path, step, rank_state["loader"], train_state["extra"], resharded=resharded)


@dataclass
class _PendingSave:
    final: Path
    future: Any
    committer: Optional[threading.Thread] = None
    error: Optional[BaseException] = None
    consolidate: bool = True
