"""The report of a real run: self-contained, loads in Chromium with every image rendered."""

import json
import sys

from tests.conftest import run_gonogo
from tests.report.browser import check_report

WRITE = ("import json, os; json.dump({{'score': {score}}}, "
         "open(os.path.join(os.environ['GONOGO_STAGE_DIR'], 'metrics.out.json'), 'w'))")


def test_report_loads_in_chromium_with_every_image(write_plan, tmp_path):
    plan = write_plan(f"""
[plan]
name = "report-check"
[[stage]]
name = "collectives"
kind = "collectives"
nproc = 2
min_bytes = "1K"
max_bytes = "4K"
iters = 2
warmup = 1
ops = ["all_reduce"]
gates = ["wrong_total == 0"]
[[stage]]
name = "probe"
kind = "command"
argv = ["{sys.executable}", "-c", {json.dumps(WRITE.format(score=2))}]
metrics = ["score"]
gates = ["score >= 1000"]
[assumptions]
score = ">= 1"
tcp_retransmit_pct = "< 1"
""")
    out = tmp_path / "run"
    result = run_gonogo("run", plan, "--out", out)
    assert result.returncode == 1, result.stdout + result.stderr
    checked = check_report(out / "report.html", "report-unit.png")
    assert checked["failed"] == [] and checked["outside_requests"] == []
    assert checked["images"] and all(image["ok"] for image in checked["images"])
    assert "NO-GO" in checked["title"]
    assert checked["screenshot"].stat().st_size > 10_000
