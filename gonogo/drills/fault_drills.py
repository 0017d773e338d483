"""Fault drills: a short training with one injected fault, beside a fault-free twin.

Each drill trains a tiny model (deterministic fp32, checkpoints every few steps, torchrun with
restarts) twice: once without a fault (the twin, trained once per drill command) and once with
the fault (``gonogo.train.fault_injection``), then reads the faulty run's directory to tell:

- detected (and ``detect_seconds`` after the fault: the watchdog's ``hang_detected``, the loss
  guard's rollback, the skipped checkpoint, or for a dead rank the restarted attempt's start),
- recovered (the run finished every step), ``steps_lost`` (fault step − step resumed from),
- ``resumed_bitwise_equal``: the final weights equal the twin's, bit for bit (expected for
  kill, hang, straggler, torn and corrupt checkpoints; a NaN drill skips a batch, so its weights
  differ, and the drill says so instead of calling it a failure),
- for a straggler: whether exactly the slowed rank was named.

Every run is a child process group bounded in time (gonogo.procs.run_process); nothing outlives
a drill.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

from gonogo.errors import StageFailed, UserError
from gonogo.events import Event, events_file, read_events
from gonogo.rundir import RunDir, write_json_atomic

log = logging.getLogger(__name__)

TRAINING_KINDS = ("kill", "hang", "straggler", "nan", "torn-checkpoint", "corrupt-checkpoint")
KINDS = TRAINING_KINDS + ("shrink", "canary")
# where the fault leaves the math unchanged, the resumed run must end with the twin's weights
BITWISE_EXPECTED = {"kill": True, "hang": True, "straggler": True, "nan": False,
                    "torn-checkpoint": True, "corrupt-checkpoint": True}

# a 2-layer d=64 decoder at sequence length 64: a drill run takes seconds of training
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=128",
        "model.max_seq_len=64", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.val_batches=1", "train.val_every=0", "train.warmup_steps=2"]


def drill_overrides(steps: int, checkpoint_every: int) -> list[str]:
    return TINY + [f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}",
                   f"train.log_every={checkpoint_every}", f"train.straggler_every={checkpoint_every}",
                   "train.max_restarts=2", "train.watchdog_min_timeout_s=5", "train.watchdog_factor=10"]


class Drill:
    """One drill command's shared state: the config, the output folder, the twin."""

    def __init__(self, out_dir: Path, *, config: str = "tiny-dense", nproc: int = 2, steps: int = 24,
                 checkpoint_every: int = 4, seed: int = 0, timeout_s: float = 300.0,
                 overrides: Optional[list[str]] = None,
                 run_command: Optional[Callable[..., int]] = None):
        from gonogo.train.config import load_train_config

        if nproc < 1:
            raise UserError(f"nproc={nproc}: a drill needs at least 1 process")
        if steps < 3 * checkpoint_every:
            raise UserError(f"steps={steps} must be at least 3 x checkpoint_every={checkpoint_every} "
                            f"(a fault needs a checkpoint before it and steps after it)")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.nproc, self.steps, self.checkpoint_every = nproc, steps, checkpoint_every
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.config, self.config_path = load_train_config(
            config, drill_overrides(steps, checkpoint_every) + list(overrides or []), deterministic=True)
        if not self.config.train.checkpoint:
            raise UserError("drills need checkpoints: remove train.checkpoint=false")
        self._run_command = run_command
        self._twin: Optional[dict[str, Any]] = None

    # -- running one training ------------------------------------------------------------------
    def train(self, name: str, env: Optional[dict[str, str]] = None, *, nproc: Optional[int] = None,
              config=None, resume: str = "never", fresh: bool = True) -> dict[str, Any]:
        """Train once into out_dir/name; {"run_dir", "code", "metrics" (None when it failed)}.
        ``fresh=False`` continues the run directory already there (the shrink drill's second part)."""
        from gonogo.procs import ProcessTimeout, run_process
        from gonogo.stages.train.stage import launch

        root = self.out_dir / name
        if fresh and root.exists():
            import shutil

            shutil.rmtree(root)  # our own earlier attempt of this drill (out_dir is the drill's)
        run_dir = RunDir.create(root, plan_name=name) if fresh else RunDir(root)
        stage_dir = run_dir.stage_dir("train")

        def run_command(argv, *, timeout, log_name, env=None, on_line=None) -> int:
            try:
                return run_process(argv, timeout=timeout, log_path=stage_dir / log_name, env=env, on_line=on_line)
            except ProcessTimeout:
                raise StageFailed(f"drill {name}: training did not finish within {timeout:.0f} s") from None

        started = time.time()
        try:
            metrics = launch(config or self.config, self.config_path.name, nproc or self.nproc, run_dir=run_dir,
                             stage="train", stage_dir=stage_dir, resume=resume, timeout_s=self.timeout_s,
                             run_command=self._run_command or run_command, on_update=lambda update: None, env=env)
            error = None
        except StageFailed as failure:
            metrics, error = None, str(failure)
        return {"run_dir": run_dir.root, "metrics": metrics, "error": error, "seconds": time.time() - started}

    def twin(self) -> dict[str, Any]:
        if self._twin is None:
            self._twin = self.train("twin")
            if self._twin["metrics"] is None:
                raise StageFailed(f"the fault-free twin run failed: {self._twin['error']}")
        return self._twin

    # -- one drill -------------------------------------------------------------------------------
    def fault_step(self, kind: str) -> int:
        """A random step with a checkpoint before it and steps after it (a checkpoint step for the
        checkpoint faults, a step between checkpoints otherwise, so steps are lost)."""
        every = self.checkpoint_every
        if kind in ("torn-checkpoint", "corrupt-checkpoint"):
            return every * self.rng.randint(2, self.steps // every - 1)
        candidates = [s for s in range(every + 1, self.steps - 1) if s % every]
        return self.rng.choice(candidates)

    def run_shrink(self, index: int) -> dict[str, Any]:
        """One rank is lost for good: the job fails on N ranks (no restart), then resumes from the
        last committed checkpoint on N-1 ranks (DCP reshards it) and must continue the twin's loss curve."""
        from gonogo.train.fault_injection import Fault

        if self.nproc < 2:
            raise UserError(f"the shrink drill needs at least 2 processes (nproc={self.nproc}): it continues on one fewer")
        twin = self.twin()
        # in the first half, so the resumed part logs a few windows to measure its throughput on
        every = self.checkpoint_every
        step = self.rng.choice([s for s in range(every + 1, self.steps // 2 + 1) if s % every] or [every + 1])
        fault = Fault(kind="kill", rank=self.rng.randrange(self.nproc), step=step)
        name = f"shrink-{index + 1}"
        no_restart = self.config.model_copy(update={"train": self.config.train.model_copy(update={"max_restarts": 0})})
        lost = self.train(name, env=fault.to_env(), config=no_restart)
        resumed = self.train(name, nproc=self.nproc - 1, resume="auto", fresh=False)
        seconds = lost["seconds"] + resumed["seconds"]
        outcome = analyse_shrink(fault, lost, resumed, twin, self.steps, self.nproc)
        outcome["seconds"] = round(seconds, 2)
        log.info("drill shrink #%d: %s", index + 1, outcome)
        return outcome

    def run_once(self, kind: str, index: int) -> dict[str, Any]:
        from gonogo.train.fault_injection import Fault

        if kind == "shrink":
            return self.run_shrink(index)
        if kind not in TRAINING_KINDS:
            raise UserError(f"unknown drill {kind!r}; known: {', '.join(KINDS)}")
        if kind == "straggler" and self.nproc < 2:
            raise UserError(f"the straggler drill needs at least 2 processes (nproc={self.nproc}): "
                            "a slow rank is named against the others")
        twin = self.twin()
        step = self.fault_step(kind) if kind != "straggler" else 1
        rank = 0 if kind in ("torn-checkpoint", "corrupt-checkpoint") else self.rng.randrange(self.nproc)
        fault = Fault(kind=kind, rank=rank, step=step, factor=3.0)
        run = self.train(f"{kind}-{index + 1}", env=fault.to_env())
        outcome = analyse(kind, fault, run, twin, self.steps)
        log.info("drill %s #%d: %s", kind, index + 1, outcome)
        return outcome


# -- reading a drill run ---------------------------------------------------------------------------

def _events(run_dir: Path) -> list[Event]:
    return read_events(events_file(run_dir), metrics=False)


def final_weights_equal(run_dir: Path, twin_dir: Path, steps: int) -> Optional[bool]:
    """Whether the two runs' checkpoints of ``steps`` hold bitwise equal weights (None: missing)."""
    import torch
    from safetensors.torch import load_file

    from gonogo.checkpoints import manifest

    name = manifest.step_dir_name(steps)
    mine = Path(run_dir) / "checkpoints" / "train" / name / manifest.WEIGHTS_NAME
    theirs = Path(twin_dir) / "checkpoints" / "train" / name / manifest.WEIGHTS_NAME
    if not mine.is_file() or not theirs.is_file():
        return None
    a, b = load_file(str(mine)), load_file(str(theirs))
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def analyse(kind: str, fault, run: dict[str, Any], twin: dict[str, Any], steps: int) -> dict[str, Any]:
    events = _events(run["run_dir"])
    metrics = run["metrics"] or {}
    injected = [e for e in events if e["event"] == "fault_injected"]
    fault_time = injected[0]["time"] if injected else None
    restarts = [e for e in events if e["event"] == "attempt_started" and e.get("restart", 0) > 0]
    outcome: dict[str, Any] = {"kind": kind, "fault_rank": fault.rank, "fault_step": fault.step,
                               "injected": bool(injected), "completed": run["metrics"] is not None,
                               "error": run["error"], "seconds": round(run["seconds"], 2)}
    detect_time, resumed_step = None, None
    if restarts:
        resumed_step = restarts[0]["step"]
        outcome["resumed_from"] = restarts[0].get("resumed_from")
        outcome["skipped_checkpoints"] = restarts[0].get("skipped_checkpoints", [])
        outcome["recover_seconds"] = round(restarts[0]["time"] - fault_time, 3) if fault_time else None
    if kind == "kill":
        detect_time = restarts[0]["time"] if restarts else None
    elif kind == "hang":
        hangs = [e for e in events if e["event"] == "hang_detected"]
        detect_time = min(e["time"] for e in hangs) if hangs else None
        outcome["detected_by_ranks"] = sorted({e["rank"] for e in hangs})
        outcome.update(triage_outcome(run["run_dir"], fault))
    elif kind == "nan":
        guarded = [e for e in events if e["event"] == "loss_guard"]
        detect_time = guarded[0]["time"] if guarded else None
        if guarded:
            resumed_step = guarded[0].get("rolled_back_to")
            outcome["reason"] = guarded[0]["reason"]
    elif kind == "torn-checkpoint":
        # detected: the restart did not load the torn checkpoint (it was never committed)
        torn = injected[0].get("checkpoint") if injected else None
        loaded = outcome.get("resumed_from") or ""
        if restarts and not loaded.endswith(f"step-{fault.step:08d}"):
            detect_time = restarts[0]["time"]
            outcome["skipped_checkpoints"] = outcome.get("skipped_checkpoints", []) + [
                [torn, "never committed (killed while being written: no COMMITTED marker)"]]
    elif kind == "corrupt-checkpoint":
        skipped = outcome.get("skipped_checkpoints") or []
        if restarts and any(path.endswith(f"step-{fault.step:08d}") for path, _ in skipped):
            detect_time = restarts[0]["time"]
    elif kind == "straggler":
        named = metrics.get("straggler_ranks")
        outcome["straggler_ranks"] = named
        outcome["min_relative_score"] = metrics.get("min_relative_score")
        outcome["straggler_detected"] = named == [fault.rank]
        scored = [e for e in events if e["event"] == "straggler_scores" and not e.get("warmup")
                  and fault.rank in e.get("straggler_ranks", [])]
        detect_time = scored[0]["time"] if scored else None
    outcome["detected"] = detect_time is not None
    outcome["detect_seconds"] = round(detect_time - fault_time, 3) if detect_time and fault_time else None
    if kind == "straggler":
        outcome["steps_lost"] = 0
        outcome["recovered"] = outcome["completed"]
    else:
        outcome["steps_lost"] = fault.step - resumed_step if resumed_step is not None else None
        restarted_or_rolled = bool(restarts) or metrics.get("rollbacks", 0) > 0
        outcome["recovered"] = bool(outcome["completed"] and outcome["detected"] and restarted_or_rolled
                                    and metrics.get("steps_completed") == steps)
    equal = final_weights_equal(run["run_dir"], twin["run_dir"], steps) if outcome["completed"] else None
    outcome["resumed_bitwise_equal"] = equal
    outcome["bitwise_expected"] = BITWISE_EXPECTED[kind]
    if kind == "nan" and equal is False:
        outcome["note"] = "weights differ from the twin as expected: the NaN batch was skipped"
    return outcome


def _loss_lines(run_dir: Path) -> list[Event]:
    """Rank 0's logged windows (step, loss, tokens/s, time), in the order written."""
    return [line for line in read_events(events_file(run_dir), rank=0, metrics=True) if "loss" in line]


LOSS_CONTINUITY_TOLERANCE = 0.02  # relative; same batches, only the reduction order differs


def analyse_shrink(fault, lost: dict[str, Any], resumed: dict[str, Any], twin: dict[str, Any], steps: int,
                   nproc: int) -> dict[str, Any]:
    events = _events(resumed["run_dir"])
    starts = [e for e in events if e["event"] == "attempt_started"]
    second = starts[-1] if len(starts) >= 2 else None
    resumed_step = second["step"] if second else None
    lines = _loss_lines(resumed["run_dir"])
    before = [r for r in lines if second is None or r["time"] < second["time"]]
    after = [r for r in lines if second is not None and r["time"] >= second["time"]]
    twin_loss = {r["step"]: r["loss"] for r in _loss_lines(twin["run_dir"])}
    compared = [(r["step"], r["loss"], twin_loss[r["step"]]) for r in after if r["step"] in twin_loss]
    worst = max((abs(mine - theirs) / abs(theirs) for _, mine, theirs in compared), default=None)
    metrics = resumed["metrics"] or {}

    def median_rate(rows):
        # a part's first window holds its start-up (allocation, the resumed checkpoint's load)
        rows = rows[1:] if len(rows) > 1 else rows
        rates = [r["tokens_per_second"] for r in rows if r.get("tokens_per_second")]
        return round(statistics.median(rates), 1) if rates else None

    outcome: dict[str, Any] = {
        "kind": "shrink", "fault_rank": fault.rank, "fault_step": fault.step, "ranks_before": nproc,
        "ranks_after": nproc - 1, "first_part_failed": lost["metrics"] is None,
        "completed": resumed["metrics"] is not None, "error": resumed["error"],
        "resumed_from": second.get("resumed_from") if second else None, "resumed_step": resumed_step,
        "steps_lost": fault.step - resumed_step if resumed_step is not None else None,
        "tokens_per_second_before": median_rate(before), "tokens_per_second_after": median_rate(after),
        "loss_vs_twin": [{"step": step, "loss": round(mine, 6), "twin_loss": round(theirs, 6)}
                         for step, mine, theirs in compared],
        "loss_max_relative_diff": float(f"{worst:.3g}") if worst is not None else None,
    }
    outcome["loss_continuous"] = worst is not None and worst <= LOSS_CONTINUITY_TOLERANCE
    outcome["detected"] = outcome["first_part_failed"]
    outcome["recovered"] = bool(outcome["completed"] and resumed_step is not None and outcome["loss_continuous"]
                                and metrics.get("steps_completed") == steps and metrics.get("world_size") == nproc - 1)
    outcome["detect_seconds"] = None  # the first part ends when torchrun stops; nothing is timed here
    return outcome


def triage_outcome(run_dir: Path, fault) -> dict[str, Any]:
    """Whether the hang's triage bundle (gonogo.train.triage) names the injected rank and the frame
    the fault hangs in (``Injector.after_step``), and its "what hung" line."""
    from gonogo.train.triage import bundles

    found = bundles(run_dir, "train")
    if not found:
        return {"triage_bundle": None, "triage_named": False}
    first = found[0]
    diagnosis = first.get("diagnosis") or {}
    frame = diagnosis.get("frame_detail") or {}
    named = (diagnosis.get("rank") == fault.rank and frame.get("function") == "after_step"
             and Path(frame.get("file", "")).name == "fault_injection.py" and diagnosis.get("step") == fault.step)
    return {"triage_bundle": first["folder"], "what_hung": first.get("what_hung"), "triage_named": named}


def summarize(kind: str, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind's figures over its repeats."""
    detect = [o["detect_seconds"] for o in outcomes if o.get("detect_seconds") is not None]
    lost = [o["steps_lost"] for o in outcomes if o.get("steps_lost") is not None]
    summary: dict[str, Any] = {
        "kind": kind, "repeats": len(outcomes),
        "recovered_count": sum(bool(o.get("recovered")) for o in outcomes),
        "detected_count": sum(bool(o.get("detected")) for o in outcomes),
        "recovered": all(o.get("recovered") for o in outcomes),
        "detect_seconds": round(statistics.median(detect), 3) if detect else None,
        "detect_seconds_max": max(detect) if detect else None,
        "steps_lost": max(lost) if lost else None,
    }
    if kind in BITWISE_EXPECTED:
        equal = [o.get("resumed_bitwise_equal") for o in outcomes]
        summary["bitwise_equal_count"] = sum(e is True for e in equal)
        summary["bitwise_expected"] = BITWISE_EXPECTED[kind]
        summary["resumed_bitwise_equal"] = all(e is True for e in equal)
    if kind == "shrink":
        summary["loss_continuous"] = all(o.get("loss_continuous") for o in outcomes)
        summary["tokens_per_second_before"] = outcomes[-1].get("tokens_per_second_before")
        summary["tokens_per_second_after"] = outcomes[-1].get("tokens_per_second_after")
    if kind == "hang":
        summary["triage_named_count"] = sum(bool(o.get("triage_named")) for o in outcomes)
        summary["triage_named"] = all(o.get("triage_named") for o in outcomes)
    if kind == "straggler":
        summary["straggler_detected_count"] = sum(bool(o.get("straggler_detected")) for o in outcomes)
        summary["straggler_detected"] = all(o.get("straggler_detected") for o in outcomes)
    return summary


def run_canary(drill: Drill, out_dir: Path, checkpoint: Optional[str] = None) -> dict[str, Any]:
    """The canary drill (gonogo.rollout): slow and erroring canaries rolled back, a good one
    promoted, and with a model that answers the quality prompts (``checkpoint``) a degraded one
    rolled back. Without ``checkpoint`` the twin's model serves; it is too small to answer
    anything, so a degraded copy of it cannot be told apart and that case is left out (said so)."""
    try:
        from gonogo.stages.canary.stage import DRILLS, run_canary_drill
    except ImportError as error:  # the rollout package is part of gonogo; this guards a broken install
        raise StageFailed(f"the canary drill needs gonogo.rollout: {error}") from None
    cases = tuple(DRILLS)
    if checkpoint is None:
        checkpoint = str(drill.twin()["run_dir"])
        cases = tuple(case for case in DRILLS if case != "degraded")
    started = time.time()
    result = run_canary_drill(out_dir / "canary", Path(checkpoint), drills=cases)
    passed = bool(result.get("passed"))
    # detection: how long each bad canary took to be rolled back
    decisions = [case.get("time_to_decision_s") for name, case in (result.get("drills") or {}).items()
                 if name != "good" and case.get("rolled_back") and case.get("time_to_decision_s") is not None]
    summary = {"kind": "canary", "repeats": 1, "recovered": passed, "recovered_count": int(passed),
               "detected_count": int(passed), "detect_seconds": max(decisions) if decisions else None,
               "detect_seconds_max": max(decisions) if decisions else None, "steps_lost": None,
               "seconds": round(time.time() - started, 2), "checkpoint": checkpoint, "canary": result.get("drills")}
    if "degraded" not in cases:
        summary["note"] = ("degraded-model case left out: the drill's tiny model answers no quality prompt; "
                           "give a trained checkpoint (--checkpoint / the stage's checkpoint) to include it")
    return summary


def run_drills(kinds: list[str], out_dir: Path, *, repeat: int = 1, progress: Callable[[str], None] = lambda t: None,
               canary_checkpoint: Optional[str] = None, **drill_options: Any) -> dict[str, Any]:
    """Run every kind ``repeat`` times; the stage metrics plus per-kind summaries and outcomes."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown drill kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    if repeat < 1:
        raise UserError(f"repeat={repeat}: must be >= 1")
    drill = Drill(out_dir, **drill_options)
    summaries: dict[str, Any] = {}
    outcomes: dict[str, list] = {}
    for kind in kinds:
        if kind == "canary":
            progress("canary drill")
            summaries[kind] = run_canary(drill, Path(out_dir), canary_checkpoint)
            continue
        outcomes[kind] = []
        for index in range(repeat):
            progress(f"{kind} drill {index + 1}/{repeat}")
            outcomes[kind].append(drill.run_once(kind, index))
        summaries[kind] = summarize(kind, outcomes[kind])
    write_json_atomic(Path(out_dir) / "drills.json", {"summaries": summaries, "outcomes": outcomes})
    return stage_metrics(summaries, outcomes)


def stage_metrics(summaries: dict[str, Any], outcomes: dict[str, list]) -> dict[str, Any]:
    detect = [s["detect_seconds_max"] for s in summaries.values() if s.get("detect_seconds_max") is not None]
    lost = [s["steps_lost"] for s in summaries.values() if s.get("steps_lost") is not None]
    bitwise = [s["resumed_bitwise_equal"] for s in summaries.values() if s.get("bitwise_expected")]
    metrics: dict[str, Any] = {
        "recovered": all(s["recovered"] for s in summaries.values()),
        "detect_seconds": max(detect) if detect else None,
        "steps_lost": max(lost) if lost else None,
        "resumed_bitwise_equal": all(bitwise) if bitwise else None,
        "straggler_detected": summaries["straggler"]["straggler_detected"] if "straggler" in summaries else None,
        "triage_named": summaries["hang"]["triage_named"] if "hang" in summaries else None,
        "drills": summaries,
    }
    for kind, summary in summaries.items():
        metrics[f"{kind.replace('-', '_')}_recovered"] = summary["recovered"]
    return metrics
