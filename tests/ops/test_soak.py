"""The soak: a real short soak through `gonogo soak` with a store slowed on purpose fails its drift
gate; the analysis of a timeline (probe track, retention, unknowns) on its own."""

import json

from gonogo.stages.soak.stage import SoakSettings, analyse
from tests.conftest import run_gonogo


def test_a_soak_with_a_slowed_checkpoint_store_fails_its_drift_gate(tmp_path):
    out = tmp_path / "soak"
    result = run_gonogo("soak", "--minutes", "0.25", "--window", "5", "--checkpoint-every", "1",
                        "--probe-every", "5", "--probe-tokens", "4096", "--slow-store", "2", "--max-drift", "1.5",
                        "--out", out, timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO"
    gates = {g["expression"]: g for g in summary["gates"]}
    drift = gates["checkpoint_drift_max <= 1.5"]
    assert drift["status"] == "fail" and drift["measured"] > 1.5
    metrics = summary["stages"][0]["metrics"]
    # the figures a soak reports, all measured
    for key in ("checkpoint_p50_s", "checkpoint_p99_s", "checkpoint_baseline_s", "busy_share_min",
                "probe_loss_first", "probe_loss_last", "rss_growth_MB"):
        assert isinstance(metrics[key], float), key
    assert metrics["probes"] >= 2 and metrics["retention_ok"] is True and metrics["checkpoints_kept"] <= 3
    assert metrics["slow_store_s"] == 2
    timeline = json.loads((out / "stages" / "soak" / "soak.json").read_text())
    assert timeline["windows"][0]["drift"] == 1.0 and all(c["seconds"] >= 2 for c in timeline["checkpoints"]
                                                          if c["window"] > 0)
    kinds = {e.get("event") for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())}
    assert {"soak_started", "soak_checkpoint", "soak_probe", "soak_window", "soak_finished"} <= kinds
    html = (out / "report.html").read_text()
    for title in ("checkpoint duration over the soak", "utilisation per window", "scheduled loss probe"):
        assert title in html
    assert html.count("data:image/png;base64") >= 3
    assert "soak_checkpoint" in html and "slow_store_s=2" in html      # every event, in the report
    assert {c["key"]: c["status"] for c in summary["checklist"]}["retention"] == "not ticked"


def timeline(probes=(5.0, 4.0, 3.5), kept=3, durations=((0, 0.2), (0, 0.2), (1, 0.25), (2, 0.22))):
    return {"seconds": 15.0, "steps": 30, "slow_store_s": 0.0,
            "windows": [{"index": i, "seconds": 5.0, "busy_share": 0.8, "utilization_pct": 40.0, "rss_MB": 500.0 + i}
                        for i in range(3)],
            "checkpoints": [{"window": w, "seconds": s, "t": 0.0, "step": 1} for w, s in durations],
            "probes": [{"loss": loss, "t": 0.0, "step": 1} for loss in probes], "checkpoints_kept": kept}


def test_a_healthy_timeline_passes_and_a_degraded_one_does_not():
    settings = SoakSettings(keep_latest_k=3, probe_tolerance=0.05)
    good = analyse(timeline(), settings)
    assert good["checkpoint_drift_max"] == 1.25 and good["probe_on_track"] is True
    assert good["retention_ok"] is True and good["rss_growth_MB"] == 2.0 and "unknown" not in good
    assert analyse(timeline(probes=(5.0, 4.0, 4.5)), settings)["probe_on_track"] is False  # the loss went back up
    assert analyse(timeline(kept=4), settings)["retention_ok"] is False                   # retention not applied


def test_missing_samples_are_unknown_with_a_reason():
    metrics = analyse(timeline(probes=(5.0,), durations=((1, 0.2),)), SoakSettings())
    assert metrics["probe_on_track"] is None and metrics["checkpoint_drift_max"] is None
    assert "two" in metrics["unknown"]["probe_on_track"]
    assert "first window" in metrics["unknown"]["checkpoint_drift_max"]
