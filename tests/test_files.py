"""Commands check their outputs before they work, write results atomically, and turn damaged inputs
into one line (gonogo.files).

Tests run as root here, where chmod stops nothing; an output path under a regular file
(``afile/out``) is refused for root too, so that is the unwritable path these tests use.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from gonogo.errors import UserError
from gonogo.files import check_output_dir, check_output_file, unreadable_input, write_atomic, write_json_atomic
from tests.conftest import run_gonogo


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".gonogo-write-check")]


def assert_one_line_exit_2(completed, *expected: str) -> str:
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr + completed.stdout
    assert "Traceback" not in completed.stderr + completed.stdout
    assert len(lines) == 1, completed.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def cli(capsys, *argv) -> tuple[int, str]:
    """The real command line in this process (the module imports are paid once): exit code, stderr."""
    from gonogo.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def assert_one_error_line(code: int, err: str, *expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]


# -- the helpers --------------------------------------------------------------------------------------

def test_an_output_under_a_file_is_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"--out .*afile/sub/deeper: cannot be written because .*afile is a file"):
        check_output_dir(tmp_path / "afile" / "sub" / "deeper")
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "afile")
    with pytest.raises(UserError, match=r"--json .*: is a directory; give a file name"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(UserError, match="afile is a file"):
        check_output_file(tmp_path / "afile" / "result.json", "--json")
    check_output_dir(tmp_path / "new" / "run")  # creatable: fine, and not created by the check
    check_output_file(tmp_path / "new" / "result.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_write_atomic_keeps_the_old_file_and_leaves_no_temporary_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"val_loss": 1.5})
    before = path.read_bytes()
    assert before == b'{\n  "val_loss": 1.5\n}\n'

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError, match="metrics.json: could not be written .No space left on device"):
        write_json_atomic(path, {"val_loss": None})
    monkeypatch.undo()
    assert path.read_bytes() == before
    with pytest.raises(TypeError):  # a value that is not JSON: nothing opened, nothing left
        write_json_atomic(path, {"value": object()})
    with pytest.raises(UserError, match="could not be written"):
        write_atomic(tmp_path, "a directory is not replaced by a file")
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_an_interrupt_during_the_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_new_directory_appears_whole_or_not_at_all(tmp_path):
    from gonogo.files import new_directory

    with pytest.raises(KeyboardInterrupt):
        with new_directory(tmp_path / "quantized") as temporary:
            (temporary / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its .tmp- sibling
    with new_directory(tmp_path / "quantized") as temporary:
        (temporary / "model.safetensors").write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["quantized"]
    with pytest.raises(UserError, match="already exists and is not empty"):
        with new_directory(tmp_path / "quantized"):
            pass
    assert (tmp_path / "quantized" / "model.safetensors").read_bytes() == b"whole"


def test_unreadable_input_names_the_source_in_one_line():
    with pytest.raises(UserError) as caught:
        with unreadable_input("ckpt/hf"):
            json.loads("{broken")
    assert str(caught.value).startswith("ckpt/hf: cannot be read as a model (JSONDecodeError")
    with pytest.raises(AssertionError):  # an internal invariant is not the file's fault
        with unreadable_input("ckpt/hf"):
            raise AssertionError("bug")


# -- every command that writes results: refused before it works --------------------------------------

@pytest.fixture(scope="module")
def damaged_hf(tmp_path_factory) -> Path:
    """A Hugging Face export whose model.safetensors is cut in half: reading it is the first work
    every model command does, so an --out error instead of this one shows --out was checked first."""
    from gonogo.export.hf import export_hf
    from tests.infer.conftest import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("damaged")
    out = export_hf(write_checkpoint(root / "step-00000010", tiny_model()), root / "hf")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


@pytest.mark.parametrize("argv", [
    ["run", "quick", "--out", "afile/sub"],
    ["train", "tiny-dense", "--out", "afile/sub", "train.steps=2"],
    ["finetune", "--checkpoint", "{hf}", "--out", "afile/sub"],
    ["eval", "--checkpoint", "{hf}", "--out", "afile/sub"],
    ["eval", "--checkpoint", "{hf}", "--json", "afile/eval.json"],
    ["export", "--checkpoint", "{hf}", "--out", "afile/sub"],
    ["quantize", "--checkpoint", "{hf}", "--format", "fp8", "--out", "afile/sub"],
], ids=lambda argv: "-".join(a for a in argv[:4] if not a.startswith("{")))
def test_an_unwritable_output_is_one_line_before_any_work(argv, tmp_path, damaged_hf):
    (tmp_path / "afile").write_text("not a directory")
    argv = [a.replace("{hf}", str(damaged_hf)) for a in argv]
    completed = run_gonogo(*argv, cwd=tmp_path, timeout=120)
    flag = "--json" if "--json" in argv else "--out"
    assert_one_line_exit_2(completed, f"{flag} afile/", "afile is a file")
    assert "cannot be read as a model" not in completed.stderr  # the damaged checkpoint was not read yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no run directory, no runs/, no temp


@pytest.mark.parametrize("argv", [
    ["scale", "tiny-dense", "--nproc", "1", "--out", "afile/sub"],
    ["drill", "kill", "--out", "afile/sub"],
    ["collectives", "--nproc", "2", "--json", "afile/rows.json"],
    ["collectives", "--nproc", "2", "--out", "afile/sub"],
    ["capacity", "--model", "llama3-8b", "--gpu", "h100", "--gpus", "8", "--json", "afile/estimate.json"],
    ["launch", "tiny-dense", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "1", "--out", "afile/sub"],
    ["canary", "--emit-k8s", "afile/sub"],
], ids=lambda argv: "-".join(argv[:1] + [a for a in argv if a.startswith("--") and a in ("--json", "--out")]))
def test_the_other_writing_commands_refuse_an_unwritable_output_first(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    code, err = cli(capsys, *argv)
    assert_one_error_line(code, err, "afile/", "afile is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - the standard library's name
        self.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"object": "list", "data": [{"id": "m", "object": "model"}]}')

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("target", ["afile/result.json", "a_dir"])
def test_loadtest_refuses_its_json_output_before_sending_a_request(target, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "a_dir").mkdir()
    _CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        completed = run_gonogo("loadtest", "--url", url, "--num-requests", "2", "--json", target, cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    expected = "is a directory; give a file name" if target == "a_dir" else "afile is a file"
    assert_one_line_exit_2(completed, f"--json {target}", expected)
    assert _CountingHandler.requests == []  # not one request: the check came before the load test
    assert leftovers(tmp_path) == [] and list((tmp_path / "a_dir").iterdir()) == []


# -- damaged inputs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_export(tmp_path_factory) -> Path:
    from gonogo.export.hf import export_hf
    from tests.infer.conftest import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return export_hf(write_checkpoint(root / "step-00000010", tiny_model()), root / "hf")


def _damage(hf: Path, target: Path, how: str) -> Path:
    import shutil

    shutil.copytree(hf, target)
    if how == "truncated-safetensors":
        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "broken-config":
        (target / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
    elif how == "config-without-sizes":
        (target / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    elif how == "config-of-another-shape":
        config = json.loads((target / "config.json").read_text())
        config["intermediate_size"] *= 2
        (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("how", ["truncated-safetensors", "broken-config", "config-without-sizes",
                                 "config-of-another-shape"])
def test_a_damaged_hugging_face_export_is_one_line_and_nothing_is_written(how, hf_export, tmp_path, capsys):
    source = _damage(hf_export, tmp_path / "damaged", how)
    for command in (["export"], ["quantize", "--format", "fp8"]):
        code, err = cli(capsys, *command, "--checkpoint", source, "--out", tmp_path / "out")
        assert_one_error_line(code, err, f"error: {source}")  # names the damaged input (or its file)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_damaged_export_given_to_eval_or_finetune_is_one_error_line(hf_export, tmp_path, capsys):
    source = _damage(hf_export, tmp_path / "damaged", "truncated-safetensors")
    for argv in (["eval", "--checkpoint", source, "--num", "2", "--samples", "1", "--out", tmp_path / "eval"],
                 ["finetune", "--checkpoint", source, "train.steps=1", "--out", tmp_path / "finetune"]):
        code, err = cli(capsys, *argv)
        assert code == 2, err
        assert_one_error_line(code, err, f"gonogo {argv[0]}: error: {source}", "safetensors")
        assert not argv[-1].exists(), argv[-1]  # no run directory left behind


def test_a_torn_gonogo_checkpoint_and_a_folder_that_is_no_model_are_one_line(tmp_path, capsys):
    from tests.infer.conftest import tiny_model, write_checkpoint

    torn = write_checkpoint(tmp_path / "step-00000010", tiny_model())
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    for source, expected in ((torn, "checkpoint cannot be used"), (tmp_path / "notes", "not a checkpoint")):
        for command in (["export"], ["quantize", "--format", "fp8"]):
            code, err = cli(capsys, *command, "--checkpoint", source, "--out", tmp_path / "out")
            assert_one_error_line(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_damaged_run_directory_files_are_one_line(tmp_path, capsys):
    from gonogo.rundir import RunDir

    run_dir = RunDir.create(tmp_path / "run", "p")
    run_dir.plan_path.write_text('[plan]\nname = "p"\n\n[[stage]]\nname = "c"\nkind = "command"\nargv = ["true"]\n')
    run_dir.state_path.write_text('{"stages": {"c": {"status": "pass')  # torn
    for argv in (["report", run_dir.root], ["run", "--resume", "--out", run_dir.root]):
        assert_one_error_line(*cli(capsys, *argv), "state.json: cannot be read")
    run_dir.state_path.write_text('{"stages": {"c": {"status": "passed"}}}')
    (run_dir.stage_dir("c") / "metrics.json").write_text("[1, 2")
    assert_one_error_line(*cli(capsys, "report", run_dir.root), "metrics.json: cannot be read")
