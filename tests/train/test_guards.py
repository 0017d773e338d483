"""The guards inside training: watchdog, straggler scores, loss guard, budget, fault hooks."""

from __future__ import annotations

import json
import time

import pytest

from gonogo.train import guards
from gonogo.train.fault_injection import ENV, Fault, Injector, flip_bytes


def _watchdog(tmp_path, exits, **options):
    settings = dict(rank=1, stage="train", stage_dir=tmp_path / "stage", events_path=tmp_path / "events.jsonl",
                    timeout_s=0.0, min_timeout_s=0.5, factor=10.0, startup_timeout_s=30.0, warmup_steps=2,
                    exit=exits.append)
    settings.update(options)
    return guards.Watchdog(**settings)


def test_watchdog_ends_a_rank_without_progress_and_records_the_detection(tmp_path):
    exits = []
    watchdog = _watchdog(tmp_path, exits).start()
    for step in range(1, 4):
        watchdog.beat(step, step_seconds=0.01)
    # derived: max(0.5 s floor, 10 x 0.01 s): the floor applies
    assert watchdog.timeout_s() == pytest.approx(0.5)
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.1)
    watchdog.stop()
    assert exits == [guards.HANG_EXIT_CODE]
    event = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "hang_detected" and event["rank"] == 1 and event["step"] == 3
    assert event["seconds_without_progress"] >= 0.5
    heartbeat = json.loads((tmp_path / "stage" / "heartbeats" / "rank-00001.json").read_text())
    assert heartbeat["step"] == 3


def test_watchdog_timeout_follows_the_slowest_step_and_long_phases(tmp_path):
    watchdog = _watchdog(tmp_path, [])
    assert watchdog.timeout_s() == 30.0  # before warm-up: the start-up timeout
    watchdog.beat(1, step_seconds=5.0)   # the first step is not counted (allocation, caches)
    watchdog.beat(2, step_seconds=0.2)
    watchdog.beat(3, step_seconds=0.3)
    assert watchdog.timeout_s() == pytest.approx(3.0)
    with watchdog.long_phase():
        assert watchdog.timeout_s() == 30.0
    assert watchdog.check() is None
    fixed = _watchdog(tmp_path, [], timeout_s=7.0)
    for step in range(1, 4):
        fixed.beat(step, step_seconds=0.1)
    assert fixed.timeout_s() == 7.0


def test_straggler_scores_name_the_slow_rank_and_section():
    # rank 2's forward/backward takes 3x as long; data times are under the noise floor
    times = [[0.001, 0.10, 0.02], [0.0012, 0.11, 0.02], [0.001, 0.30, 0.02]]
    best = [0.12, 0.13, 0.13]
    report = guards.straggler_scores(times, best)
    assert report["straggler_ranks"] == [2]
    assert report["slow_sections"][2] == ["forward_backward", "total"]
    assert report["relative"]["forward_backward"][2] == pytest.approx(0.10 / 0.30, abs=1e-3)
    assert report["relative"]["data"] == [1.0, 1.0, 1.0]
    assert report["individual"][2] < 0.75 and report["individual"][0] > 0.75
    even = guards.straggler_scores([[0.001, 0.1, 0.02], [0.001, 0.105, 0.021]], [0.12, 0.12])
    assert even["straggler_ranks"] == [] and even["min_relative_score"] > 0.9


def test_loss_guard_catches_nan_inf_and_spikes_only():
    guard = guards.LossGuard(factor=3.0, window=5, warmup=3)
    assert guard.check(float("nan")) == "loss is nan"
    assert "inf" in guard.check(float("inf"))
    assert guard.check(100.0) is None  # before warm-up there is no median to compare with
    for loss in (5.0, 4.0, 3.5, 3.0):
        assert guard.check(loss) is None
    assert "spike" in guard.check(20.0)
    assert guard.check(4.0) is None
    assert guards.LossGuard(factor=0.0, warmup=0).check(1e9) is None  # spikes off


def test_budget_counts_wall_time_times_ranks():
    started = 1000.0
    assert not guards.budget_spent(started, 2, None, now=10**9)
    assert not guards.budget_spent(started, 2, 1.0, now=started + 1799)
    assert guards.budget_spent(started, 2, 1.0, now=started + 1800)


def test_section_timer_charges_compute_not_waiting():
    timer = guards.SectionTimer("cpu")
    with timer.section("data"):
        time.sleep(0.2)  # waiting (like a gloo collective) costs no CPU time
    with timer.section("forward_backward"):
        deadline = time.process_time() + 0.1
        while time.process_time() < deadline:
            pass
    timer.steps = 1
    data, forward_backward, optimizer = timer.take()
    assert data < 0.05 and forward_backward >= 0.1 and optimizer == 0.0
    assert timer.take() == [0.0, 0.0, 0.0]


def test_fault_from_env_and_hooks(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, json.dumps({"kind": "nan", "rank": 1, "step": 3}))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    fault = Fault.from_env()
    assert fault == Fault(kind="nan", rank=1, step=3, factor=3.0)
    other_rank = Injector(fault, rank=0, stage="train", events_path=tmp_path / "e.jsonl")
    assert other_rank.loss(3, 1.5) == 1.5
    injector = Injector(fault, rank=1, stage="train", events_path=tmp_path / "e.jsonl")
    assert injector.loss(2, 1.5) == 1.5
    poisoned = injector.loss(3, 1.5)
    assert poisoned != poisoned  # NaN
    event = json.loads((tmp_path / "e.jsonl").read_text().splitlines()[0])
    assert event["event"] == "fault_injected" and event["step"] == 3 and event["fault"] == "nan"
    monkeypatch.setenv(ENV, json.dumps({"kind": "meteor", "rank": 0, "step": 1}))
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault.from_env()


def test_nan_fault_fires_once_per_process(tmp_path):
    injector = Injector(Fault("nan", 0, 2), rank=0, stage="train", events_path=tmp_path / "e.jsonl")
    first = injector.loss(2, 1.0)
    assert first != first
    assert injector.loss(2, 1.0) == 1.0


def test_flip_bytes_breaks_the_checkpoint_hash(tmp_path):
    from gonogo.checkpoints import manifest

    checkpoint = tmp_path / "step-00000004"
    (checkpoint / "dcp").mkdir(parents=True)
    (checkpoint / "dcp" / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    (checkpoint / manifest.META_NAME).write_text("{}")
    manifest.commit(checkpoint)
    assert manifest.verify_checkpoint(checkpoint) == (True, "ok")
    assert flip_bytes(checkpoint) == "dcp/__0_0.distcp"
    ok, reason = manifest.verify_checkpoint(checkpoint)
    assert not ok and "corrupted" in reason


# -- inside a real (one-process) training run ------------------------------------------------------

def _tiny_run(tmp_path, name, *overrides, budget=None, env=None):
    from gonogo.procs import run_process
    from gonogo.rundir import RunDir
    from gonogo.train.config import load_train_config
    from gonogo.stages.train.stage import launch
    from gonogo.drills.fault_drills import TINY

    config, path = load_train_config("tiny-dense", TINY + ["train.parallel=none", "train.max_restarts=0",
                                                           "train.log_every=2", *overrides],
                                     deterministic=True)
    run_dir = RunDir.create(tmp_path / name, plan_name=name)
    stage_dir = run_dir.stage_dir("train")

    def run_command(argv, *, timeout, log_name, env=None, on_line=None):
        return run_process(argv, timeout=timeout, log_path=stage_dir / log_name, env=env, on_line=on_line)

    metrics = launch(config, path.name, 1, run_dir=run_dir, stage="train", stage_dir=stage_dir, resume="never",
                     timeout_s=240, run_command=run_command, on_update=lambda update: None,
                     budget_device_hours=budget, env=env)
    events = [json.loads(line) for line in (run_dir.root / "events.jsonl").read_text().splitlines()]
    return metrics, [e for e in events if "event" in e], run_dir.root


@pytest.mark.timeout(240)
def test_nan_loss_rolls_back_to_the_last_checkpoint_and_skips_the_batch(tmp_path):
    fault = Fault("nan", rank=0, step=5).to_env()
    metrics, events, _ = _tiny_run(tmp_path, "nan", "train.steps=8", "train.checkpoint_every=2", env=fault)
    guarded = [e for e in events if e["event"] == "loss_guard"]
    assert len(guarded) == 1 and guarded[0]["reason"] == "loss is nan" and guarded[0]["rolled_back_to"] == 4
    assert metrics["rollbacks"] == 1 and metrics["skipped_batches"] == 1
    assert metrics["steps_completed"] == 8 and metrics["final_loss"] == metrics["final_loss"]  # finite


@pytest.mark.timeout(240)
def test_spent_budget_stops_cleanly_after_a_checkpoint(tmp_path):
    metrics, events, root = _tiny_run(tmp_path, "budget", "train.steps=50", "train.checkpoint_every=0",
                                      budget=1e-9)
    assert metrics["budget_stopped"] is True and metrics["steps_completed"] == 1
    assert [e["event"] for e in events if e["event"] == "budget_stopped"] == ["budget_stopped"]
    assert (root / "checkpoints" / "train" / "step-00000001" / "COMMITTED").is_file()


class _FakeKernelProfiler:
    """Stands in for torch.profiler on CUDA: hands back FunctionEvent-like records."""

    def __init__(self, events):
        self._events = events
        self.started = self.stopped = 0

    def start(self):
        self.started += 1

    def stop(self):
        self.stopped += 1

    def events(self):
        return self._events


def _op(name, start, end, kernels=(), device="CPU"):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels])


def _rank_window(compute_us, wait_us):
    """One step on a GPU: forward/backward compute kernels, then an all-gather that waited."""
    section = guards.SECTION_PREFIX
    return [
        # the profiler lists each range on the GPU's timeline too: it must not claim the CPU ops
        _op(section + "optimizer", 0, 50_000, device="CUDA"),
        _op(section + "data", 0, 10, []),
        _op("aten::copy_", 1, 2, [("Memcpy HtoD", 5)]),
        _op(section + "forward_backward", 10, 10_000),
        _op("aten::mm", 20, 30, [("sm90_xmma_gemm_bf16", compute_us)]),
        # a backward op runs on autograd's thread: no parent link, only its start time says where
        _op("aten::mm_backward", 500, 520, [("sm90_xmma_gemm_bf16", compute_us)]),
        _op("c10d::allgather_", 600, 700, [("ncclDevKernel_AllGather_RING_LL", wait_us)]),
        _op(section + "optimizer", 10_000, 10_500),
        _op("aten::_foreach_add_", 10_100, 10_200, [("multi_tensor_apply_kernel", 100)]),
        _op("logging", 20_000, 20_001, [("reduce_kernel", 9_999)]),  # outside every section
    ]


def test_cuda_section_timer_charges_compute_kernels_not_collective_wait():
    # two ranks of one FSDP step: rank 0 computes fast and waits 8 ms in the all-gather for rank 1
    fast = guards.SectionTimer("cuda", profiler_factory=lambda: _FakeKernelProfiler(_rank_window(1_000, 8_000)))
    slow = guards.SectionTimer("cuda", profiler_factory=lambda: _FakeKernelProfiler(_rank_window(4_000, 50)))
    for timer in (fast, slow):
        for name in guards.SECTIONS:
            with timer.section(name):
                pass
        timer.steps = 1
    times = [fast.take(), slow.take()]
    assert times[0] == pytest.approx([5e-6, 2e-3, 1e-4])
    assert times[1] == pytest.approx([5e-6, 8e-3, 1e-4])
    assert fast.collective_means == pytest.approx([0.0, 8e-3, 0.0])
    # wall time would give both ranks ~10 ms and even the scores out; kernel time names rank 1
    report = guards.straggler_scores(times, best=[sum(row) for row in times])
    assert report["straggler_ranks"] == [1] and report["slow_sections"][1] == ["forward_backward", "total"]


def test_cuda_section_timer_profiles_the_first_step_of_every_window():
    made = []

    def factory():
        made.append(_FakeKernelProfiler(_rank_window(1_000, 0)))
        return made[-1]

    timer = guards.SectionTimer("cuda", profiler_factory=factory)
    for _ in range(3):  # a window of 3 steps: only the first is profiled
        with timer.section("forward_backward"):
            pass
        timer.steps += 1
    assert [(p.started, p.stopped) for p in made] == [(1, 1)]
    assert timer.take() == pytest.approx([5e-6, 2e-3, 1e-4])  # one step's kernels, per step
    timer.take()
    assert [(p.started, p.stopped) for p in made] == [(1, 1), (1, 1), (1, 0)]
    timer.close()  # the loop's end: nothing left recording
    assert [(p.started, p.stopped) for p in made] == [(1, 1), (1, 1), (1, 1)]


def test_section_timer_reads_a_real_profiler():
    """The torch.profiler calls of the CUDA timer, on this CPU (no kernels, so no device time)."""
    import torch

    def cpu_profiler():
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    timer = guards.SectionTimer("cuda", profiler_factory=cpu_profiler)
    with timer.section("forward_backward"):
        torch.ones(64, 64) @ torch.ones(64, 64)
    timer.steps = 1
    assert timer.take() == [0.0, 0.0, 0.0] and timer.collective_means == [0.0, 0.0, 0.0]
    assert timer.take() == [0.0, 0.0, 0.0]
    timer.close()  # a profiler left running crashes the interpreter at exit (SIGSEGV)
