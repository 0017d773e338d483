"""The controller's webhooks and the fault proxy, over small in-process backends (fast)."""

from __future__ import annotations

import httpx
import pytest

from gonogo.rollout.analysis import Analysis
from gonogo.rollout.canary_faults import FaultProxy
from gonogo.rollout.controller import Side, Webhooks
from gonogo.rollout.router import ThreadedServer
from gonogo.stages.canary.stage import CanarySettings, Load, run_rollout


@pytest.fixture
def webhook():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    calls = []

    async def hook(request):
        calls.append((request.path_params["answer"], await request.json()))
        return JSONResponse({}, status_code=int(request.path_params["answer"]))

    server = ThreadedServer(Starlette(routes=[Route("/{answer}", hook, methods=["POST"])])).start()
    yield server.url, calls
    server.stop()


def _settings(**webhooks) -> CanarySettings:
    return CanarySettings(stable="-", canary="-", webhooks=Webhooks(**webhooks),
                          analysis=Analysis(steps=[50, 100], interval_s=1.2, threshold=2, quality_prompts=0),
                          load=Load(rate=10, concurrency=2, max_tokens=4))


def test_refused_pre_rollout_halts_and_an_accepted_confirmation_promotes(backends, webhook, tmp_path):
    url, calls = webhook
    stopped = []
    stable, canary = (Side(u, "m", stop=lambda name=name: stopped.append(name)) for u, name in zip(backends, ("stable", "canary")))
    metrics = run_rollout(stable, canary, _settings(pre_rollout=f"{url}/500", rollback=f"{url}/200"), tmp_path / "a")
    assert metrics["halted"] and metrics["rolled_back"] and metrics["intervals"] == 0
    assert stopped == ["canary"]
    assert [(answer, body["phase"]) for answer, body in calls] == [("500", "pre-rollout"), ("200", "rollback")]

    calls.clear()
    stopped.clear()
    metrics = run_rollout(stable, canary, _settings(confirm_promotion=f"{url}/202"), tmp_path / "b")
    assert metrics["promoted"] and metrics["client_errors"] == 0 and metrics["failed_checks"] == 0
    assert stopped == ["stable"]   # promotion retires the old stable
    assert [body["phase"] for _, body in calls] == ["confirm-promotion"]


def test_refused_confirmation_counts_as_failed_checks_then_rolls_back(backends, webhook, tmp_path):
    url, calls = webhook
    metrics = run_rollout(Side(backends[0], "m"), Side(backends[1], "m"),
                          _settings(confirm_promotion=f"{url}/403"), tmp_path)
    assert metrics["rolled_back"] and not metrics["promoted"] and metrics["failed_checks"] == 2
    assert metrics["client_errors"] == 0
    assert [body["phase"] for _, body in calls] == ["confirm-promotion", "confirm-promotion"]


def test_fault_proxy_injects_5xx_and_dropped_connections(backends):
    errors = FaultProxy(backends[1], error_rate=0.5).start()
    drops = FaultProxy(backends[1], drop_rate=1.0).start()
    try:
        statuses = [httpx.post(f"{errors.url}/v1/chat/completions", json={}).status_code for _ in range(4)]
        assert statuses == [200, 503, 200, 503]  # deterministic: every other request
        assert httpx.get(f"{errors.url}/health").status_code == 200  # health stays honest
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("POST", f"{drops.url}/v1/chat/completions", json={}, timeout=5) as response:
                for _ in response.iter_lines():
                    pass
        assert drops.injected["drop"] == 1
    finally:
        errors.stop()
        drops.stop()
