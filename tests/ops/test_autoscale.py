"""Autoscaling: the autoscaler's rules on a pool it cannot tell from a real one, the KEDA/HPA
manifests against the shipped schema subsets, and `gonogo drill autoscale` end to end."""

import json
import re
import threading
import time

import pytest

from gonogo.stages.autoscale.stage import (AutoscaleSettings, Autoscaler, Pool, Replica, hpa, keda_scaled_object,
                                      validate_manifest, write_manifests)
from tests.conftest import run_gonogo


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_scales_up_only_with_a_ready_replica_and_down_after_the_cooldown_and_the_drain():
    # one request running on two replicas (0.5 per replica) is below the down threshold
    settings = AutoscaleSettings(max_replicas=2, scale_up_threshold=1.0, scale_down_threshold=0.6, cooldown_s=0.6,
                                 interval_s=0.05, window_s=0.2)
    pool = Pool(settings)
    pool.add(Replica("replica-1", "http://127.0.0.1:1"))
    starting = threading.Event()
    stopped = []

    def start_replica(name):
        starting.set()
        time.sleep(0.3)  # not ready yet: it must not be in the pool meanwhile
        return Replica(name, "http://127.0.0.1:2")

    autoscaler = Autoscaler(pool, start_replica, lambda replica: stopped.append((replica.name, replica.in_flight)))
    autoscaler.start()
    try:
        with pool._lock:
            pool.waiting = 3                       # 3 queued on 1 replica: above the threshold
        assert starting.wait(5)
        assert len(pool.ready()) == 1              # readiness before traffic
        assert wait_for(lambda: len(pool.ready()) == 2)
        with pool._lock:
            pool.waiting = 0
        second = pool.replicas[1]
        second.in_flight = 1                       # a request still running on the replica to be removed
        went_down = time.monotonic()
        assert wait_for(lambda: any(e["event"] == "scale_down_triggered" for e in autoscaler.events))
        assert time.monotonic() - went_down >= settings.cooldown_s * 0.9   # not before the cool-down
        assert not second.accepting and stopped == []                     # out of rotation, draining
        time.sleep(0.2)
        assert stopped == []
        second.in_flight = 0
        assert wait_for(lambda: stopped == [("replica-2", 0)])
        assert [r.name for r in pool.ready()] == ["replica-1"]
        time.sleep(settings.cooldown_s * 1.5)
        assert len(pool.ready()) == 1              # never below min_replicas
    finally:
        autoscaler.stop()
    names = [e["event"] for e in autoscaler.events]
    assert names == ["scale_up_triggered", "replica_ready", "scale_down_triggered", "replica_removed"]


def test_one_request_in_flight_now_and_then_is_not_a_scale_up_but_a_sustained_queue_is():
    # 1 request at a time for 0.1 s of every 0.5 s: the gauge reads 1.0 (above 0.6) at some
    # instants, its mean over the window is ~0.2 (CI: such a blip scaled the pool up right after a
    # scale-down); a queue of 3 that stays is
    settings = AutoscaleSettings(max_replicas=2, scale_up_threshold=0.6, scale_down_threshold=0.15, cooldown_s=5.0,
                                 interval_s=0.02, window_s=1.0)
    pool = Pool(settings)
    pool.add(Replica("replica-1", "http://127.0.0.1:1"))
    autoscaler = Autoscaler(pool, lambda name: Replica(name, "http://127.0.0.1:2"), lambda replica: None).start()
    try:
        for _ in range(6):
            pool.replicas[0].in_flight = 1
            time.sleep(0.1)
            pool.replicas[0].in_flight = 0
            time.sleep(0.4)
        assert [e["event"] for e in autoscaler.events] == []
        assert max(s["concurrency"] for s in autoscaler.samples) == 1.0      # the blips were read
        assert max(s["signal"] for s in autoscaler.samples[len(autoscaler.samples) // 2:]) < 0.6
        with pool._lock:
            pool.waiting = 3
        assert wait_for(lambda: len(pool.ready()) == 2, 5.0)
    finally:
        autoscaler.stop()


def test_a_replica_that_cannot_start_is_an_event_not_a_scale_up():
    settings = AutoscaleSettings(max_replicas=2, scale_up_threshold=1.0, scale_down_threshold=0.2, interval_s=0.05)
    pool = Pool(settings)
    pool.add(Replica("replica-1", "http://127.0.0.1:1"))

    def broken(name):
        raise RuntimeError("gonogo serve exited with code 1")

    autoscaler = Autoscaler(pool, broken, lambda replica: None).start()
    try:
        with pool._lock:
            pool.waiting = 5
        assert wait_for(lambda: any(e["event"] == "scale_error" for e in autoscaler.events))
    finally:
        autoscaler.stop()
    assert len(pool.ready()) == 1 and "exited with code 1" in autoscaler.error


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="flaps"):
        AutoscaleSettings(scale_up_threshold=1.0, scale_down_threshold=1.0)


@pytest.mark.parametrize("metric", ["concurrency", "queue_depth", "ttft_p95_ms"])
def test_keda_and_hpa_carry_the_same_thresholds_and_validate(metric, tmp_path):
    settings = AutoscaleSettings(metric=metric, min_replicas=1, max_replicas=4, scale_up_threshold=3,
                                 scale_down_threshold=1, cooldown_s=45)
    keda = keda_scaled_object(settings, name="gonogo", namespace="serving")
    scaler = hpa(settings, name="gonogo", namespace="serving")
    assert validate_manifest(keda) == [] and validate_manifest(scaler) == []
    trigger = keda["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "3"
    assert "gonogo_" in trigger["metadata"]["query"] and 'namespace="serving"' in trigger["metadata"]["query"]
    assert keda["spec"]["maxReplicaCount"] == scaler["spec"]["maxReplicas"] == 4
    assert scaler["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 45
    assert keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"] == 45
    paths = write_manifests(tmp_path, settings)
    assert [p.name for p in paths] == ["keda-scaledobject.yaml", "hpa.yaml"]


def test_the_schemas_reject_what_kubernetes_would():
    scaler = hpa(AutoscaleSettings(), name="gonogo", namespace="default")
    scaler["spec"]["maxReplica"] = 3                                        # a typo
    scaler["spec"]["behavior"]["scaleDown"]["policies"][0]["type"] = "Replicas"
    problems = validate_manifest(scaler)
    assert any("maxReplica" in p for p in problems) and any("Replicas" in p for p in problems)
    keda = keda_scaled_object(AutoscaleSettings(), name="gonogo", namespace="default")
    keda["spec"]["triggers"][0]["metadata"]["threshold"] = "two"
    del keda["spec"]["triggers"][0]["metadata"]["query"]
    problems = validate_manifest(keda)
    assert any("query" in p for p in problems) and any("two" in p for p in problems)


def test_drill_autoscale_scales_one_two_one_with_no_failed_request(tmp_path):
    out = tmp_path / "drill"
    result = run_gonogo("drill", "autoscale", "--out", out, timeout=300)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    metrics = json.loads((out / "stages" / "autoscale" / "metrics.json").read_text())
    assert metrics["scaled_up"] and metrics["max_replicas_seen"] >= 2, result.stdout
    assert metrics["scaled_down"] and metrics["final_replicas"] == 1, result.stdout
    assert metrics["failed_requests"] == 0 and metrics["requests"] > 0, result.stdout
    # the timings are printed
    assert re.search(r"time_to_scale_up_s\s+\d", result.stdout) and re.search(r"time_to_scale_down_s\s+\d", result.stdout)
    # not before the cool-down: cooldown_s after the scale-up's replica was ready, and the signal
    # under the scale-down threshold in every reading of the cooldown_s before. (Counted from the
    # ramp-down, time_to_scale_down_s can be shorter: in one CI-like run the peak left the two
    # replicas idle from their first reading, and the cool-down rightly ran from then.)
    record = json.loads((out / "stages" / "autoscale" / "autoscale.json").read_text())
    down = next(event["t"] for event in record["events"] if event["event"] == "scale_down_triggered")
    ready = max(event["t"] for event in record["events"] if event["event"] == "replica_ready" and event["t"] < down)
    cooldown, threshold = metrics["cooldown_s"], record["settings"]["autoscale"]["scale_down_threshold"]
    assert down - ready >= cooldown, (down, ready)
    before = [sample for sample in record["samples"] if down - cooldown < sample["t"] <= down]
    assert len(before) >= cooldown / record["settings"]["autoscale"]["interval_s"] - 1, before
    assert all(sample["signal"] is not None and sample["signal"] < threshold for sample in before), before
    assert "replica_ready" in result.stdout and "replica_removed" in result.stdout
    for name in ("keda-scaledobject.yaml", "hpa.yaml"):
        assert (out / "stages" / "autoscale" / "k8s" / name).is_file()
    # through the plan runner: the stage kind, its gates, the report's plot and the checklist item
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == ("GO" if result.returncode == 0 else "NO-GO")
    assert {c["key"]: c["status"] for c in summary["checklist"]}["autoscaling"] == (
        "ticked" if result.returncode == 0 else "not ticked")
    assert "replicas, load and TTFT p95 over the ramp" in (out / "report.html").read_text()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["stage"] == "autoscale" and e["event"].startswith("replica_")] == [
        "replica_ready", "replica_removed"]


def test_the_slo_breach_is_dated_by_request_start_not_completion():
    from gonogo.stages.autoscale.stage import Record, slo_breach

    # fast requests, then from t=5 s on requests that wait 3 s in the queue (they end at 8 s +)
    records = [Record(started=100.0 + t, ended=100.0 + t + 0.05, ttft=0.05, ok=True) for t in range(5)]
    records += [Record(started=105.0 + t / 10, ended=108.0 + t / 10, ttft=3.0, ok=True) for t in range(5)]
    assert slo_breach(records, 100.0, slo_s=1.0, window_s=3.0) == 5.0
    assert slo_breach(records[:5], 100.0, slo_s=1.0, window_s=3.0) is None    # never broken: unknown


class PeriodicPool(Pool):
    """One request in flight for the first 0.1 s of every second from ``t0``: 0.1 requests on
    average, 0.05 per replica of two, whenever it is read."""

    def signals(self, now=None):
        now = time.monotonic() if now is None else now
        signals = super().signals(now)
        running = 1 if (now - self.t0) % 1.0 < 0.1 else 0
        return {**signals, "running": running, "concurrency": running / max(1, signals["replicas"])}


def test_traffic_at_a_fixed_period_does_not_stay_in_phase_with_the_readings():
    # read every 0.5 s from the start of a period, a strictly periodic load shows its request at every
    # other reading (a mean of 0.25 per replica, above the 0.15 to scale down) until the readings drift;
    # jittered readings see it 10% of the time, as it is, and the pool scales down after the cool-down
    settings = AutoscaleSettings(max_replicas=2, scale_up_threshold=0.6, scale_down_threshold=0.15, cooldown_s=2.0,
                                 interval_s=0.5, window_s=3.0)
    pool = PeriodicPool(settings)
    pool.add(Replica("replica-1", "http://127.0.0.1:1"))
    pool.add(Replica("replica-2", "http://127.0.0.1:2"))
    autoscaler = Autoscaler(pool, lambda name: Replica(name, "http://127.0.0.1:3"), lambda replica: None)
    pool.t0 = autoscaler.t0
    autoscaler.start()
    try:
        assert wait_for(lambda: any(e["event"] == "scale_down_triggered" for e in autoscaler.events), 20.0), \
            [(s["t"], s["running"], s["signal"]) for s in autoscaler.samples]
    finally:
        autoscaler.stop()
