"""The run's event log: lines written by several processes at once stay whole, and the reader's
filters pick what a stage or the report asks for."""

from __future__ import annotations

import json
import multiprocessing

from gonogo.events import events_file, read_events, write_event


def _append_many(path, rank: int, count: int) -> None:
    for step in range(count):
        write_event(path, "train", rank=rank, step=step, loss=1.0 / (step + 1), padding="x" * 2000)


def test_lines_from_several_processes_never_interleave(tmp_path):
    path = events_file(tmp_path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(path, rank, 150)) for rank in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert all(worker.exitcode == 0 for worker in workers)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 600
    records = [json.loads(line) for line in lines]  # a torn line would not parse
    for rank in range(4):
        assert [r["step"] for r in records if r["rank"] == rank] == list(range(150))


def test_a_line_keeps_the_file_format(tmp_path):
    path = events_file(tmp_path)
    write_event(path, "train", rank=0, step=3, event="loss_guard", reason="nan")
    record = json.loads(path.read_text(encoding="utf-8"))
    assert list(record) == ["time", "stage", "rank", "step", "event", "reason"]
    assert record["stage"] == "train" and record["event"] == "loss_guard" and record["time"] > 0


def test_the_reader_filters_and_skips_a_torn_line(tmp_path):
    path = events_file(tmp_path)
    write_event(path, "plan", event="stage_start", kind="train")
    write_event(path, "train", rank=0, step=1, loss=2.5, tokens_per_second=100.0)
    write_event(path, "train", rank=1, step=1, step_time_s_rank=0.2)
    write_event(path, "train", rank=0, step=2, event="hang_detected", seconds_without_progress=9.0)
    with path.open("a") as handle:
        handle.write('{"time": 1.0, "stage": "train", "ev')  # a crash mid-line
    assert len(read_events(path)) == 4
    assert [e.kind for e in read_events(path, stage="train", metrics=False)] == ["hang_detected"]
    hang = read_events(path, kind="hang_detected")[0]
    assert (hang.stage, hang.rank, hang.step) == ("train", 0, 2)
    assert hang.fields() == {"step": 2, "seconds_without_progress": 9.0}
    assert [e["loss"] for e in read_events(path, rank=0, metrics=True)] == [2.5]
    assert read_events(path, stage="plan")[0].get("kind") == "train"
    assert read_events(tmp_path / "nothing.jsonl") == []
