"""``gonogo collectives`` and the collectives stage: nccl-tests arithmetic and layout, real torchrun runs."""

import json
import statistics
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

import gonogo.stages.collectives.stage as collectives
from gonogo.cli import main
from gonogo.cluster import collectives_table
from gonogo.cluster.collectives_worker import bandwidths, collective_counts, sizes
from gonogo.errors import UserError
from gonogo.rundir import RunDir
from gonogo.stages.base import StageContext
from gonogo.typed_config import validate
from tests.conftest import run_gonogo

# -- arithmetic and layout (no processes) ---------------------------------------------------------


def test_sizes_use_powers_of_1024_like_nccl_tests():
    assert collectives_table.parse_size("1K") == 1024
    assert collectives_table.parse_size("16M") == 16 * 1024 ** 2
    assert collectives_table.parse_size("1g") == 1024 ** 3
    assert collectives_table.parse_size("1.5K") == 1536
    assert collectives_table.parse_size(64) == 64
    for bad in ("12Q", "K", "-1K", "0"):
        with pytest.raises(ValueError):
            collectives_table.parse_size(bad)
    assert sizes(1024, 65536, 4) == [1024, 4096, 16384, 65536]
    assert sizes(1024, 5000, 4) == [1024, 4096]


def test_counts_and_bus_bandwidth_follow_nccl_tests():
    # 1 MiB of float32 on 4 ranks: 262144 elements
    assert collective_counts("all_reduce", 262144, 4, 4) == (262144, 262144, 262144)
    assert collective_counts("all_gather", 262144, 4, 4) == (65536, 262144, 65536)
    assert collective_counts("reduce_scatter", 262144, 4, 4) == (262144, 65536, 65536)
    assert collective_counts("all_to_all", 262144, 4, 4) == (262144, 262144, 65536)
    # per-rank counts are rounded down to 16 bytes: 100 bf16 / 3 ranks = 33 -> 32
    assert collective_counts("all_gather", 100, 2, 3) == (32, 96, 32)
    one_second = 1.0
    algbw, busbw = bandwidths("all_reduce", 250_000_000, 4, one_second, 4)
    assert (algbw, busbw) == pytest.approx((1.0, 1.5))  # 2(n-1)/n
    # gather/scatter/all-to-all: S is the count per rank times n, busbw factor (n-1)/n
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert bandwidths(op, 62_500_000, 4, one_second, 4) == pytest.approx((1.0, 0.75))
    for op in ("broadcast", "sendrecv"):
        assert bandwidths(op, 250_000_000, 4, one_second, 4) == pytest.approx((1.0, 1.0))


def form(time_us, algbw, busbw, wrong):
    return {"time": time_us, "alg_bw": algbw, "bus_bw": busbw, "nwrong": wrong}


def test_table_lines_round_trip_through_the_parser():
    rows = [
        {"op": "all_reduce", "size": 1024, "count": 256, "type": "float", "redop": "sum", "root": -1,
         "out_of_place": None, "in_place": form(123.456, 0.0083, 0.0083, 0)},
        {"op": "all_gather", "size": 16777216, "count": 2097152, "type": "bfloat16", "redop": "none", "root": -1,
         "out_of_place": form(123456.7, 1.36, 0.68, 3), "in_place": form(99.0, 1.5, 0.75, None)},
    ]
    summary = collectives_table.summarize(rows)
    assert summary["wrong_total"] == 3 and summary["out_of_bounds"]["count"] == 1
    assert summary["average_bus_bandwidth"]["bandwidth"] == pytest.approx((0.0083 + 0.68 + 0.75) / 3)
    lines = (collectives_table.op_header_lines("all_reduce") + [collectives_table.row_line(rows[0])]
             + collectives_table.op_header_lines("all_gather") + [collectives_table.row_line(rows[1])]
             + collectives_table.footer_lines(summary))
    assert all(collectives_table.is_table_line(line) for line in lines)
    assert not collectives_table.is_table_line("W1125 12:00:00 torch/distributed/run.py] warning")
    parsed = collectives_table.parse_table(lines)
    assert parsed["out_of_bounds"] == 1
    assert parsed["avg_busbw"] == pytest.approx(summary["average_bus_bandwidth"]["bandwidth"], rel=1e-5)
    first, second = parsed["rows"]
    assert (first["op"], first["size"], first["count"], first["type"], first["root"]) == ("all_reduce", 1024, 256, "float", -1)
    assert first["out_of_place"] is None and first["in_place"] == form(123.46, 0.01, 0.01, 0)
    assert second["out_of_place"] == form(123457.0, 1.36, 0.68, 3)  # 7 characters: "123457"
    assert second["in_place"]["nwrong"] is None


def test_a_check_turned_off_produces_no_correctness_metric():
    rows = [{"op": "all_reduce", "size": 1024, "count": 256, "type": "float", "redop": "sum", "root": -1,
             "out_of_place": form(10.0, 0.1, 0.1, None), "in_place": form(10.0, 0.1, 0.1, None)}]
    summary = collectives_table.summarize(rows)
    assert summary["wrong_total"] is None  # nothing was checked: not "0 wrong"
    results = {"results": rows, **summary, "fabric": {"tcp": None}, "loopback": {"GBps": 0.5}}
    metrics = collectives.stage_metrics(results, ["all_reduce"])
    assert metrics["wrong_total"] is None and "check = 0" in metrics["unknown"]["wrong_total"]
    assert metrics["tcp_retransmit_pct"] is None and "/proc/net/snmp" in metrics["unknown"]["tcp_retransmit_pct"]
    assert metrics["busbw_vs_loopback"] == pytest.approx(0.2)
    assert collectives_table.summarize([])["average_bus_bandwidth"]["bandwidth"] is None


def test_loopback_probe_moves_data_within_its_bound():
    probe = collectives.loopback_probe(64 * 1024, seconds=0.1)
    assert probe["bytes"] > 0 and probe["GBps"] > 0 and probe["seconds"] < 5


def test_stage_settings_validate_sizes_and_declare_metrics():
    settings = validate(collectives.CollectivesSettings, {"min_bytes": "4K", "ops": ["all_reduce", "sendrecv"]}, "plan.toml")
    assert (settings.min_bytes, settings.max_bytes, settings.nproc, settings.dtypes) == (4096, 16 * 1024 ** 2, 2, ["float32"])
    assert collectives.STAGE.metrics(settings) == {
        "busbw_GBps_avg", "wrong_total", "tcp_retransmit_pct", "all_reduce_busbw_GBps", "sendrecv_busbw_GBps",
        "loopback_GBps", "busbw_vs_loopback"}
    assert len(collectives.CollectivesSettings().ops) == 6
    for bad in ({"min_bytes": "64K", "max_bytes": "1K"}, {"max_bytes": "12Q"}, {"ops": ["allreduce"]}, {"nproc": 0}):
        with pytest.raises(UserError) as error:
            validate(collectives.CollectivesSettings, bad, "plan.toml")
        assert "\n" not in str(error.value)
    with pytest.raises(ValidationError):
        collectives.CollectivesSettings(timeout_s=0)
    # one process (one GPU): every op but the ring between ranks
    assert validate(collectives.CollectivesSettings, {"nproc": 1, "ops": ["all_reduce"]}, "plan.toml").nproc == 1
    with pytest.raises(UserError, match="sendrecv is a ring between ranks"):
        validate(collectives.CollectivesSettings, {"nproc": 1}, "plan.toml")


@pytest.mark.parametrize("flags, words", [
    (("-b", "64K", "-e", "1K"), "bigger than"),
    (("--ops", "all_reduce,allreduce"), "'allreduce'"),
    (("-b", "12Q"), "12Q"),
    (("-d", "float16"), "float16"),
    (("--nproc", "0"), "at least 1"),
    (("-f", "x"), "-f"),
    (("--iters", "0"), "--iters"),
    (("--nproc", "1"), "sendrecv is a ring between ranks"),
])
def test_bad_flags_are_one_line_user_errors(flags, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["collectives", "--nproc", "2", *map(str, flags)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # before the run directory: nothing created


def test_bad_flag_through_the_cli_exits_2_with_one_line(tmp_path):
    result = run_gonogo("collectives", "--nproc", "2", "-b", "12Q", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "12Q" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_default_gates_say_what_the_exit_code_said():
    assert collectives.default_gates(collectives.CollectivesSettings()) == ["wrong_total == 0"]
    # nothing checked: no gate on a figure that cannot be measured (the command says so instead)
    assert collectives.default_gates(collectives.CollectivesSettings(check=0)) == []


# -- real torchrun, 2 gloo processes ---------------------------------------------------------------


def leftover_processes(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (our torchrun and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_every_op_is_exact_in_float32_and_bfloat16(tmp_path):
    json_path = tmp_path / "rows.json"
    result = run_gonogo("collectives", "--nproc", 2, "-b", "1K", "-e", "64K", "-f", 4, "-d", "all",
                        "-n", 2, "-w", 1, "--json", json_path, "-T", 180, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    # the stage ran through the runner into runs/collectives-<time>/, gated on wrong_total == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("collectives-")
    assert {"plan.toml", "state.json", "events.jsonl", "summary.json", "report.html"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["verdict"] == "GO" and [g["expression"] for g in summary["gates"]] == ["wrong_total == 0"]
    stage_dir = run / "stages" / "collectives"
    assert json.loads((stage_dir / "metrics.json").read_text())["wrong_total"] == 0
    assert (stage_dir / "collectives.log").read_text() == result.stdout  # stdout: the table alone
    assert "GO" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# gonogo collectives") and "# Using devices" in lines
    parsed = collectives_table.parse_table(lines)
    rows = parsed["rows"]
    assert len(rows) == 6 * 2 * 4  # ops x dtypes x sizes
    assert {row["op"] for row in rows} == set(collectives.OP_NAMES)
    assert {row["type"] for row in rows} == {"float", "bfloat16"}
    for row in rows:
        # the forms torch has, and only those (the others print N/A)
        has_out, has_in = {"all_reduce": (False, True), "broadcast": (False, True), "all_to_all": (True, False),
                           "sendrecv": (True, False)}.get(row["op"], (True, True))
        assert (row["out_of_place"] is not None, row["in_place"] is not None) == (has_out, has_in), row
        for measured in (row["out_of_place"], row["in_place"]):
            if measured:
                assert measured["nwrong"] == 0, row
                assert measured["time"] > 0 and measured["bus_bw"] >= 0
    assert parsed["out_of_bounds"] == 0
    assert any(line.startswith("# TCP retransmits") for line in lines)
    assert any(line.startswith("# InfiniBand errors") for line in lines)
    report = json.loads(json_path.read_text())
    assert len(report["results"]) == len(rows) and report["wrong_total"] == 0
    busbws = [f["bus_bw"] for row in report["results"] for f in (row["out_of_place"], row["in_place"]) if f]
    assert report["average_bus_bandwidth"]["bandwidth"] == pytest.approx(statistics.fmean(busbws))
    assert parsed["avg_busbw"] == pytest.approx(statistics.fmean(busbws), rel=1e-4, abs=1e-9)
    assert report["fabric"]["infiniband"]["present"] in (True, False)


def test_a_perturbed_result_is_counted_on_every_checked_row(tmp_path):
    json_path = tmp_path / "rows.json"
    result = run_gonogo("collectives", "--nproc", 2, "--ops", "all_reduce,all_gather", "-b", "1K", "-e", "4K",
                        "-n", 1, "-w", 0, "-c", 2, "--json", json_path, "-T", 180, "--out", tmp_path / "run",
                        timeout=240, env={"GONOGO_INJECT_WRONG": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NO-GO" in result.stderr
    # all_reduce: 2 sizes x in-place; all_gather: 2 sizes x 2 forms; one flipped element each
    assert "# Out of bounds values : 6 FAILED" in result.stdout
    parsed = collectives_table.parse_table(result.stdout.splitlines())
    wrongs = [f["nwrong"] for row in parsed["rows"] for f in (row["out_of_place"], row["in_place"]) if f]
    assert wrongs == [1] * 6
    assert json.loads(json_path.read_text())["wrong_total"] == 6
    assert "6 wrong elements" in result.stderr
    (gate,) = json.loads((tmp_path / "run" / "summary.json").read_text())["gates"]
    assert gate["expression"] == "wrong_total == 0" and gate["measured"] == 6 and not gate["passed"]


def test_with_the_check_off_a_wrong_element_is_not_seen_and_the_command_says_so(tmp_path):
    result = run_gonogo("collectives", "--nproc", 2, "--ops", "all_reduce", "-b", "1K", "-e", "1K", "-n", 1, "-w", 0,
                        "-c", 0, "-T", 180, "--out", tmp_path / "run", timeout=240, env={"GONOGO_INJECT_WRONG": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "correctness not checked (--check 0)" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["verdict"] == "GO" and summary["gates"] == []
    metrics = json.loads((tmp_path / "run" / "stages" / "collectives" / "metrics.json").read_text())
    assert metrics["wrong_total"] is None and "check = 0" in metrics["unknown"]["wrong_total"]


def test_a_hung_rank_ends_the_command_with_a_clear_error(tmp_path):
    marker = f"gonogo-test-{uuid.uuid4()}"
    timeout = 60
    started = time.monotonic()
    result = run_gonogo("collectives", "--nproc", 2, "--ops", "all_reduce", "-b", "1K", "-e", "1K", "-T", timeout,
                        "--out", tmp_path / "out", timeout=timeout + 60,
                        env={"GONOGO_INJECT_HANG": "1", "GONOGO_TEST_MARKER": marker})
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < timeout, f"took {elapsed:.0f} s"
    # the stage failed with one reason (NO-GO), the same line summary.json and stderr give
    (reason,) = json.loads((tmp_path / "out" / "summary.json").read_text())["reasons"]
    assert "rank(s) 1 did not arrive" in reason and "hung or dead" in reason
    said = " ".join(result.stderr.split())  # the console wraps long lines (a long path even mid-word)
    assert "NO-GO" in said and "rank(s) 1 did not arrive" in said and "(hung or dead)" in said
    assert result.stdout.startswith("# gonogo collectives")  # the table up to the failure
    assert (tmp_path / "out" / "stages" / "collectives" / "torchrun.log").is_file()
    assert leftover_processes(marker) == []


def test_the_stage_writes_table_json_metrics_events_and_report(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", "test")
    settings = collectives.CollectivesSettings(ops=["all_reduce", "sendrecv"], min_bytes="1K", max_bytes="4K",
                                               iters=2, warmup=1, timeout_s=180)
    progress = []
    context = StageContext(name="comm", kind="collectives", run_dir=run_dir, stage_dir=run_dir.stage_dir("comm"),
                           on_progress=progress.append)
    metrics = collectives.STAGE.run(context, settings)
    assert set(metrics) - {"unknown"} == collectives.STAGE.metrics(settings)
    assert metrics["wrong_total"] == 0
    assert metrics["loopback_GBps"] > 0
    assert metrics["busbw_vs_loopback"] == pytest.approx(metrics["all_reduce_busbw_GBps"] / metrics["loopback_GBps"])
    assert metrics["all_reduce_busbw_GBps"] > 0 and metrics["sendrecv_busbw_GBps"] > 0
    assert metrics["busbw_GBps_avg"] > 0 and metrics["tcp_retransmit_pct"] >= 0
    stage_dir = context.stage_dir
    table = (stage_dir / "collectives.log").read_text().splitlines()
    assert len(collectives_table.parse_table(table)["rows"]) == 4 and any(line.startswith("# Out of bounds") for line in progress)
    saved = json.loads((stage_dir / "collectives.json").read_text())
    assert saved["config"]["nranks"] == 2 and saved["config"]["backend"] == "gloo"
    events = [json.loads(line) for line in run_dir.events_path.read_text().splitlines()]
    assert len(events) == 4 and all({"time", "stage", "rank", "step"} <= set(event) for event in events)
    items = collectives.STAGE.report(stage_dir, metrics)
    plots = [item for item in items if item.png]
    assert plots and plots[0].png.startswith(b"\x89PNG")
    assert any(item.table and len(item.table) == 4 for item in items)
    assert collectives.STAGE.report(tmp_path, {}) is None


ROOT_CAUSE = """Root Cause (first observed failure):
[0]:
  time      : 2026-11-25_17:19:54
  host      : localhost
  rank      : {rank} (local_rank: {rank})
  exitcode  : {code} (pid: 22276)
====="""


def test_failure_reason_names_the_rank_that_ended_first():
    reason = collectives._failure_reason
    killed = ROOT_CAUSE.format(rank=1, code=-9)
    saw = "rank 0: all_reduce float32 2097152 B: lost the connection to another rank (did it die?)"
    assert reason(killed, [saw], 1) == f"rank 1 was killed by signal 9; {saw}"
    hung = "rank 0: all_reduce float32 1024 B: rank(s) 1 did not arrive within 9 s (hung or dead)"
    assert reason(ROOT_CAUSE.format(rank=0, code=1), [hung], 1) == hung
    assert reason("no summary", [], 3) == "torchrun exited with code 3"


@pytest.mark.parametrize("world", [8, 256, 257, 1000, 4096])
def test_the_reduction_check_stays_exact_in_bfloat16_at_any_scale(world):
    """A bf16 all_reduce / reduce_scatter over ``world`` ranks, accumulated rank by rank in bf16 as
    a ring does, must equal the expected integers exactly (bf16 holds integers only up to 256)."""
    import argparse

    import torch

    from gonogo.cluster.collectives_worker import Benchmark

    bench = Benchmark.__new__(Benchmark)
    bench.torch, bench.device, bench.world = torch, torch.device("cpu"), world
    bench.args = argparse.Namespace(dtypes=["float32", "bfloat16"])
    bench.set_value_bounds(bench.args.dtypes)
    for op, counts in (("all_reduce", (512, 512, 512)), ("reduce_scatter", (world * 4, 4, 4))):
        bench.rank = 0
        expected = bench.expected(op, counts, rep=1).double()
        total = torch.zeros(counts[0], dtype=torch.bfloat16)
        for rank in range(world):
            bench.rank = rank
            total = total + bench.input_values(op, counts, rep=1).to(torch.bfloat16)
        received = total[:counts[1]].double()  # rank 0's slice of a reduce_scatter
        assert torch.equal(received, expected), op
        assert (expected > 0).double().mean() > 0.5 and expected.max() > 1, "a check of zeros proves nothing"
