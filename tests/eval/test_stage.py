"""The `eval` stage kind (in a run directory, with compare_to) and the `gonogo eval` command."""

import json

from gonogo.cli import main
from gonogo.eval.stage import STAGE, EvalSettings, report_stage, run_stage
from gonogo.rundir import RunDir
from gonogo.stages.base import StageContext

from tests.eval.eval_helpers import write_checkpoint


def test_stage_reads_the_newest_checkpoint_and_compares_to_another_stage(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", plan_name="laptop")
    write_checkpoint(run_dir.checkpoints_dir / "pretrain" / "step-00000010", seed=1)
    write_checkpoint(run_dir.checkpoints_dir / "finetune" / "step-00000010", seed=2, chat=True)
    settings = EvalSettings(num=5, samples=[2, 1], max_tokens=8, compare_to="@pretrain")
    context = StageContext(name="eval", kind="eval", run_dir=run_dir, stage_dir=run_dir.stage_dir("eval"))
    metrics = run_stage(context, settings)
    declared = STAGE.metrics(settings)
    assert {"accuracy", "maj@2", "pass@1", "best_of_2", "maj_gain@2", "accuracy_gain", "tokens_per_question"} <= declared
    assert declared <= set(metrics)
    assert "finetune" in metrics["checkpoint"] and metrics["prompt_format"] == "chat"
    assert metrics["accuracy_gain"] == metrics["accuracy"] - metrics["compare_accuracy"]
    items = report_stage(context.stage_dir, metrics)
    assert items[0].title == "Accuracy against k" and items[0].png.startswith(b"\x89PNG")
    assert any(item.title == "Per task family" and item.table for item in items)


def test_metrics_are_declared_from_the_settings():
    names = STAGE.metrics(EvalSettings(samples=[8, 1]))
    assert {"maj@8", "pass@8", "best_of_8", "maj@1"} <= names and "maj@16" not in names
    assert "accuracy_gain" not in names


def test_command_prints_and_writes_json(checkpoints, tmp_path, capsys):
    _pretrained, finetuned = checkpoints
    code = main(["eval", "--checkpoint", str(finetuned), "--num", "4", "--samples", "1,2", "--tasks", "add,count",
                 "--json", str(tmp_path / "eval.json"), "--out", str(tmp_path / "run")])
    assert code == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["questions"] == 4 and set(result["per_family"]) <= {"add", "count"}
    assert "maj@k" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(checkpoints, capsys):
    _pretrained, finetuned = checkpoints
    assert main(["eval", "--checkpoint", str(finetuned), "--samples", "0,2"]) == 2
    assert "samples" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(finetuned), "--tasks", "poetry"]) == 2
    assert "poetry" in capsys.readouterr().err


PLAN = """
[plan]
name = "post"

[[stage]]
name = "pretrain"
kind = "train"
config = "tiny-dense"

[[stage]]
name = "finetune"
kind = "finetune"
gates = ["val_loss <= 0.6", "skipped_lines == 0"]

[[stage]]
name = "eval"
kind = "eval"
samples = [1, 8]
checkpoint = "@finetune"
compare_to = "@pretrain"
gates = ["accuracy_gain > 0", "maj_gain@8 > 0", "best_of_8 > 0.3"]
"""


def test_a_post_training_plan_validates_its_gates(tmp_path):
    from gonogo.plan import load_plan

    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    plan = load_plan(path)
    assert [stage.kind.name for stage in plan.stages] == ["train", "finetune", "eval"]
    path.write_text(PLAN.replace("maj_gain@8", "maj_gain@16"))
    import pytest

    from gonogo.errors import UserError
    with pytest.raises(UserError, match="maj_gain@16"):
        load_plan(path)
