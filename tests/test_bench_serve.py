"""bench/serve.py's verdict: consistent figures per engine, and TPOT compared only when streamed."""

from __future__ import annotations

import pytest

from .bench_support import load_bench, quiet_watch


@pytest.fixture(scope="module")
def serve_bench():
    return load_bench("serve")


def _row(tok_s, ttft, tpot, failed=0):
    # E2EL as a streamed request's: TTFT + 127 x TPOT, or the burst's given end
    return {"tok_s": tok_s, "ttft_p50_ms": ttft, "tpot_p50_ms": tpot, "failed": failed,
            "e2el_p50_ms": ttft + 127 * tpot}


def _verdicts(serve_bench, results) -> list[str]:
    lines = serve_bench.engines_report(results, quiet_watch(), quick=True, dtype="bfloat16", vllm_dtype="bfloat16",
                                       threads=None)
    return [line.split("|")[5].strip() for line in lines if line.startswith("| 1 |") or line.startswith("| 8 |")
            if line.count("|") == 6]


def test_a_tpot_from_bursts_is_not_compared_but_a_slower_engine_is_not_met(serve_bench):
    # vLLM's 8-stream run with a TPOT of 0.18 ms: 127 tokens in 22 ms of a 1.3 s request, bursts;
    # its streamed runs (TTFT 657 ms, TPOT 4.95 ms: half the request decoding) are compared
    assert serve_bench.sent_in_bursts(_row(668, 1289, 0.177))
    assert not serve_bench.sent_in_bursts(_row(770, 657, 4.95))
    assert not serve_bench.sent_in_bursts(_row(309, 15.0, 3.03))
    streamed = {("gonogo", 1): _row(499, 9.3, 1.93), ("vllm", 1): _row(309, 15.0, 3.03),
                ("gonogo", 8): _row(1358, 46, 5.43), ("vllm", 8): _row(668, 1289, 0.177)}
    one, eight = _verdicts(serve_bench, streamed)
    assert one == "met" and eight.startswith("met (TPOT not compared")
    # slower on tokens/s, or on a streamed TPOT, or a failed request: NOT met
    for worse in ({("gonogo", 1): _row(299, 9.3, 1.93)}, {("gonogo", 1): _row(499, 9.3, 3.5)},
                  {("gonogo", 1): _row(499, 9.3, 1.93, failed=1)}, {("gonogo", 8): _row(1358, 1300, 5.43)}):
        verdicts = _verdicts(serve_bench, {**streamed, **worse})
        assert any(verdict.startswith("NOT met") for verdict in verdicts), worse
