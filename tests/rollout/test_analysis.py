"""Thresholds, windows and checks; the weighted split; one-line errors for contradictory flags."""

from __future__ import annotations

import pytest

from gonogo.rollout.analysis import Analysis, Thresholds, WindowStats, analyze, window_stats
from gonogo.rollout.router import RequestRecord, WeightedChoice


def test_weighted_choice_is_exact_in_every_hundred_requests():
    choice = WeightedChoice()
    for weight in (0, 10, 25, 50, 100, 33):
        choice.set_weight(weight)
        sides = [choice.next_side() for _ in range(200)]
        assert sides[:100].count("canary") == weight
        assert sides[100:].count("canary") == weight


def _record(side: str, ok: bool, latency: float, ttft: float = 0.01, pinned: bool = False) -> RequestRecord:
    return RequestRecord(side=side, path="/v1/chat/completions", pinned=pinned, started=10.0,
                         ended=10.0 + latency, status=200 if ok else 502, ttft=ttft, ok=ok)


def test_window_stats_leave_out_pinned_quality_probes_and_count_failures():
    stats = window_stats([_record("canary", True, 0.1), _record("canary", False, 0.2),
                          _record("canary", True, 5.0, pinned=True)])
    assert stats.requests == 2 and stats.failures == 1 and stats.success_rate == 0.5
    assert stats.e2el_p99_ms == pytest.approx(100.0)


def test_no_canary_data_is_a_failed_check():
    results = analyze(WindowStats(), window_stats([_record("stable", True, 0.1)]), Thresholds())
    assert not all(r.passed for r in results)
    assert any(r.name == "requests" and not r.passed for r in results)


def test_latency_ratio_uses_the_same_window_and_a_floor():
    thresholds = Thresholds(latency_ratio=2.0)
    stable = window_stats([_record("stable", True, 0.1)])
    slow = window_stats([_record("canary", True, 0.5)])
    ratio = next(r for r in analyze(slow, stable, thresholds) if r.name == "latency_ratio")
    assert not ratio.passed and ratio.value == pytest.approx(5.0)
    # 10 ms against 30 ms is below a 50 ms floor: jitter, not a regression
    fast_stable = window_stats([_record("stable", True, 0.01, ttft=0.005)])
    fast_canary = window_stats([_record("canary", True, 0.03, ttft=0.01)])
    ratio = next(r for r in analyze(fast_canary, fast_stable, thresholds, ratio_floor_ms=50) if r.name == "latency_ratio")
    assert ratio.passed
    # at 100 % stable has no traffic in the window: the ratio stands aside, the other checks decide
    alone = next(r for r in analyze(slow, WindowStats(), thresholds) if r.name == "latency_ratio")
    assert alone.passed and "no stable" in alone.reason


def test_accuracy_checks_absolute_and_relative():
    thresholds = Thresholds(accuracy=0.5, accuracy_drop=0.1)
    canary = window_stats([_record("canary", True, 0.1)])
    failing = {r.name for r in analyze(canary, None, thresholds, accuracy=0.75, stable_accuracy=1.0) if not r.passed}
    assert failing == {"accuracy_drop"}
    failing = {r.name for r in analyze(canary, None, thresholds, accuracy=0.25, stable_accuracy=0.25) if not r.passed}
    assert failing == {"accuracy"}


@pytest.mark.parametrize("flags, words", [
    (["--steps", "50,25,100"], "increase"),
    (["--steps", "10,50"], "last step must be 100"),
    (["--steps", "0,100"], "1..100"),
    (["--min-success-rate", "1.5"], "success_rate"),
    (["--max-latency-ratio", "0.5"], "latency_ratio"),
    (["--check", "p42_latency=3"], "unknown metric"),
    (["--threshold", "0"], "threshold"),
    (["--min-accuracy", "0.5", "--quality-prompts", "0"], "quality_prompts is 0"),
    (["--min-success-rate", "-1"], "success_rate"),
])
def test_contradictory_or_unknown_thresholds_are_one_line_exit_2(flags, words, capsys, tmp_path):
    from gonogo.cli import main

    code = main(["canary", "--stable", "http://127.0.0.1:9", "--canary", "http://127.0.0.1:9",
                 "--out", str(tmp_path / "out"), *flags])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and words in error, error
    assert not (tmp_path / "out").exists()  # nothing started


def test_stage_settings_reject_unknown_metric_names():
    from gonogo.errors import UserError
    from gonogo.stages.canary.stage import CanarySettings
    from gonogo.typed_config import validate

    with pytest.raises(UserError, match="unknown key 'analysis.thresholds.p42'"):
        validate(CanarySettings, {"stable": "a", "canary": "b", "analysis": {"thresholds": {"p42": 1}}}, "plan")
    settings = validate(CanarySettings, {"stable": "a", "canary": "b",
                                         "analysis": {"steps": [20, 100], "thresholds": {"ttft_p99_ms": 300}}}, "plan")
    assert settings.analysis.thresholds.active() == {"success_rate": 0.99, "ttft_p99_ms": 300}
    assert isinstance(settings.analysis, Analysis)


def test_the_canary_stage_kind_is_registered_with_its_metrics():
    from gonogo.stages import get_kind

    kind = get_kind("canary")
    settings = kind.settings(stable="runs/x", canary="http://127.0.0.1:8001")
    assert {"promoted", "rolled_back", "failed_checks", "client_errors", "time_to_decision_s"} <= kind.metrics(settings)
    assert kind.devices(settings) == 1   # only the stable server is started by the stage


@pytest.mark.parametrize("concurrency", [4, 12])
def test_the_quality_probe_keeps_at_most_its_concurrency_in_flight(concurrency):
    """A real threaded HTTP server on 127.0.0.1 that holds each request until ``concurrency`` of
    them are in (a barrier, at most 10 s: a loaded machine may start the client's threads slowly)
    and counts how many it held at once: the probe fills but never exceeds its concurrency."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from gonogo.data.synthetic import generate
    from gonogo.rollout.analysis import measure_accuracy

    lock, state = threading.Lock(), {"now": 0, "most": 0}
    together = threading.Barrier(concurrency, timeout=10)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            try:
                together.wait()  # one wave of `concurrency` requests at a time (12 problems: whole waves)
            except threading.BrokenBarrierError:  # fewer came within 10 s: `most` shows it
                pass
            time.sleep(0.05)
            with lock:
                state["now"] -= 1
            body = json.dumps({"choices": [{"index": 0, "text": "#### 0", "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        problems = generate("heldout", 0, 12)
        accuracy, errors = measure_accuracy(f"http://127.0.0.1:{server.server_address[1]}", "canary", "m", problems,
                                            max_tokens=8, concurrency=concurrency)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert errors == 0 and accuracy is not None
    assert state["most"] == concurrency
    assert Analysis(quality_concurrency=concurrency).quality_concurrency == concurrency
