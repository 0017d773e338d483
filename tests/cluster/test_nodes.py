"""Inventory of many nodes: two doctor agents on this machine meet at one endpoint and print one
table; a node that never joins is a clear NO-GO; differing versions or an unhealthy node too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gonogo.cluster import nodes
from gonogo.cluster.torchrun import free_port
from gonogo.errors import UserError
from gonogo.gates import parse_gate

REPO = Path(__file__).resolve().parents[2]


def _doctor(tmp_path: Path, name: str, *flags: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    argv = [sys.executable, "-m", "gonogo", "doctor", "--size-MB", "2", "--path", str(tmp_path / name), *flags]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp_path)


def _finish(process: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        out, err = process.communicate()
        pytest.fail(f"doctor agent timed out:\n{err[-2000:]}")
    return process.returncode, out, err


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_two_agents_one_table_and_a_node_that_never_joins(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [_doctor(tmp_path, f"n{rank}", "--json", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                      "--node-rank", str(rank), "--join-timeout", "60") for rank in (0, 1)]
    results = [_finish(agent) for agent in agents]
    for code, out, err in results:
        assert code == 0, err[-2000:]
        view = json.loads(out)["cluster"]  # stdout is the JSON alone
        assert [node["node_rank"] for node in view["nodes"]] == [0, 1] and view["go"] is True
        assert view["metrics"]["nodes_answered"] == 2 and view["metrics"]["versions_identical"] is True
        assert all(node["versions"]["torch"] for node in view["nodes"])
    # both agents started in one folder: each ran into its own run directory, GO on the node gates
    runs = list((tmp_path / "runs").iterdir())
    assert sorted(run.name.rsplit("-", 1)[1] for run in runs) == ["node0", "node1"]
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["verdict"] == "GO" and len(summary["gates"]) == 3
        assert json.loads((run / "stages" / "doctor" / "metrics.json").read_text())["nodes_all_answered"] is True
    # one node alone: it waits its join timeout, then says who answered and who did not (the stage
    # fails: the table of the one node and the reason on stdout, the runner's NO-GO on stderr)
    lone = f"127.0.0.1:{free_port()}"
    code, out, err = _finish(_doctor(tmp_path, "lone", "--nnodes", "2", "--rdzv-endpoint", lone, "--node-rank", "0",
                                     "--join-timeout", "3", "--out", str(tmp_path / "lone-run")))
    text = " ".join(out.split())
    assert code == 1
    assert f"NO-GO: 1 of 2 nodes answered at {lone} within 3 s (missing node rank(s) 1;" in text, text
    assert f"1 of 2 nodes answered at {lone} within 3 s" in " ".join(err.split()) and "NO-GO" in err
    summary = json.loads((tmp_path / "lone-run" / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO"
    assert json.loads((tmp_path / "lone-run" / "stages" / "doctor" / "cluster.json").read_text())["go"] is False


def _node(rank, torch="2.13.0", healthy=True):
    return {"node_rank": rank, "hostname": f"n{rank}", "time": 1.0, "healthy": healthy,
            "problems": [] if healthy is not False else ["GPU 0: 3 uncorrected ECC errors"], "unknowns": [],
            "gpu_count": 8, "cpu_count": 64, "memory_GB": 1000.0,
            "versions": {"driver": "550.54", "cuda_driver": "12.4", "cuda_build": "12.4", "nccl": "2.21.5",
                         "torch": torch}}


def test_differing_versions_or_an_unhealthy_node_is_no_go():
    good = nodes.cluster_view([_node(0), _node(1)], 2, "h:1", 5)
    assert good["go"] and parse_gate("versions_identical == true").evaluate(good["metrics"]).passed
    mixed = nodes.cluster_view([_node(0), _node(1, torch="2.12.0")], 2, "h:1", 5)
    assert not mixed["go"] and mixed["metrics"]["versions_identical"] is False
    assert "torch versions differ: n0 (node 0): 2.13.0, n1 (node 1): 2.12.0" in mixed["problems"]
    assert not parse_gate("versions_identical == true").evaluate(mixed["metrics"]).passed
    sick = nodes.cluster_view([_node(0), _node(1, healthy=False)], 2, "h:1", 5)
    assert not sick["go"] and sick["metrics"]["nodes_all_healthy"] is False
    assert not parse_gate("nodes_all_healthy == true").evaluate(sick["metrics"]).passed
    short = nodes.cluster_view([_node(0)], 2, "h:1", 5)
    assert not parse_gate("nodes_all_answered == true").evaluate(short["metrics"]).passed
    assert short["metrics"]["nodes_all_healthy"] is None and "unknown" in short["metrics"]


def test_endpoint_typo_is_a_user_error():
    with pytest.raises(UserError, match="expected HOST:PORT"):
        nodes.parse_endpoint("node0")


NODE_GATES = '["nodes_all_answered == true", "nodes_all_healthy == true", "versions_identical == true"]'


def _plan(tmp_path: Path, name: str, endpoint: str, rank: int, join_timeout: float, gates: str = NODE_GATES) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[plan]
name = "{name}"
[[stage]]
name = "nodes"
kind = "doctor"
storage_size_MB = 1
nnodes = 2
rdzv_endpoint = "{endpoint}"
node_rank = {rank}
join_timeout_s = {join_timeout}
gates = {gates}
""", encoding="utf-8")
    return path


def _run_plan(plan: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return subprocess.Popen([sys.executable, "-m", "gonogo", "run", str(plan), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_doctor_stage_of_two_plans_gathers_both_nodes_and_a_lone_node_fails_clearly(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    runs = [_run_plan(_plan(tmp_path, f"node{rank}", endpoint, rank, 60), tmp_path / f"run{rank}") for rank in (0, 1)]
    for rank, process in enumerate(runs):
        code, out, err = _finish(process)
        summary = json.loads((tmp_path / f"run{rank}" / "summary.json").read_text())
        assert code == 0 and summary["verdict"] == "GO", (summary.get("reasons"), err[-2000:])
        view = json.loads((tmp_path / f"run{rank}" / "stages" / "nodes" / "cluster.json").read_text())
        assert [node["node_rank"] for node in view["nodes"]] == [0, 1]
        metrics = json.loads((tmp_path / f"run{rank}" / "stages" / "nodes" / "metrics.json").read_text())
        assert metrics["nodes_answered"] == 2 and metrics["versions_identical"] is True
        html = (tmp_path / f"run{rank}" / "report.html").read_text()
        assert "Nodes: 2 of 2 answered" in html
    # a node whose peer never starts: NO-GO, and the reason names who answered and who is missing
    lone = f"127.0.0.1:{free_port()}"
    code, out, err = _finish(_run_plan(_plan(tmp_path, "lone", lone, 0, 3), tmp_path / "lone"))
    summary = json.loads((tmp_path / "lone" / "summary.json").read_text())
    assert code == 1 and summary["verdict"] == "NO-GO"
    reasons = " ".join(summary["reasons"])
    assert f"1 of 2 nodes answered at {lone} within 3 s (missing node rank(s) 1;" in reasons, reasons


def test_plan_node_settings_and_node_gates_are_checked_before_anything_runs(tmp_path):
    from gonogo.plan import load_plan

    good = load_plan(_plan(tmp_path, "ok", "node0:29400", 1, 30))
    assert good.stages[0].settings.nnodes == 2 and len(good.stages[0].gates) == 3
    for endpoint, rank, message in (("node0", 0, "expected HOST:PORT"), ("node0:29400", 2, "must be below nnodes")):
        with pytest.raises(UserError, match=message):
            load_plan(_plan(tmp_path, "bad", endpoint, rank, 30))
    # one node: the cluster metrics are not declared, so a gate on them is refused
    single = tmp_path / "single.toml"
    single.write_text('[plan]\nname = "single"\n[[stage]]\nname = "d"\nkind = "doctor"\n'
                      'gates = ["nodes_all_answered == true"]\n', encoding="utf-8")
    with pytest.raises(UserError, match="nodes_all_answered"):
        load_plan(single)
    missing = tmp_path / "missing.toml"
    missing.write_text('[plan]\nname = "m"\n[[stage]]\nname = "d"\nkind = "doctor"\nnnodes = 3\n', encoding="utf-8")
    with pytest.raises(UserError, match="needs rdzv_endpoint"):
        load_plan(missing)
