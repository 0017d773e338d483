"""The `eval` stage kind (in a run directory, with compare_to) and the `gonogo eval` command."""

import json
from pathlib import Path

import pytest

from gonogo.cli import main
from gonogo.stages.eval.stage import NOT_METRICS, STAGE, EvalSettings
from gonogo.stages.eval.stage import report as report_stage
from gonogo.stages.eval.stage import run as run_stage
from gonogo.plan import STAGE_RUNNER_METRICS
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
    assert {"accuracy", "maj@2", "pass@1", "best_of_2", "maj_gain@2", "accuracy_gain", "tokens_per_question",
            "maj_gain@2_ci_low", "best_gain@2_ci_low", "accuracy_gain_ci_low", "verifier_precision",
            "verifier_recall"} <= declared
    assert declared <= set(metrics)
    assert "finetune" in metrics["checkpoint"] and metrics["prompt_format"] == "chat"
    assert metrics["accuracy_gain"] == metrics["accuracy"] - metrics["compare_accuracy"]
    items = report_stage(context.stage_dir, metrics)
    assert items[0].title.startswith("Test-time scaling") and items[0].png.startswith(b"\x89PNG")
    titles = [item.title for item in items]
    assert any(title.startswith("Test-time scaling (value [95% CI") for title in titles)
    assert any("never sees the reference" in title and "recall" in title for title in titles)
    assert any(item.title == "Does sampling beat greedy?" and "maj@2 minus greedy" in item.text for item in items)
    assert any(item.title == "Per task family" and item.table for item in items)
    # real generation, a randomly initialised "finetune" against a random "pretrain": the laptop
    # plan's eval gates say NO-GO (no gain, and a verifier with no right sample to accept)
    from gonogo.plan import load_plan, resolve_plan_path

    laptop = next(s for s in load_plan(resolve_plan_path("laptop")).stages if s.kind.name == "eval")
    results = [gate.evaluate(metrics) for gate in laptop.gates]
    assert results and not any(result.passed for result in results), [(r.gate.text, r.measured) for r in results]


def test_the_report_says_plainly_whether_a_gain_holds():
    from gonogo.stages.eval.stage import _gain_verdict

    summary = {"maj_gain@8": 0.1, "maj_gain@8_ci_low": 0.02, "maj_gain@8_ci_high": 0.18,
               "per_seed": [{"maj_gain@8": 0.1}, {"maj_gain@8": -0.01}, {"maj_gain@8": 0.2}]}
    assert "the gain holds" in _gain_verdict(summary, "maj_gain", "maj@8", 8)
    assert "positive at 2 of 3 sampling seeds" in _gain_verdict(summary, "maj_gain", "maj@8", 8)
    summary["maj_gain@8_ci_low"] = -0.01
    assert "does not hold" in _gain_verdict(summary, "maj_gain", "maj@8", 8)


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


# -- the built-in plans' eval gates say NO-GO for a model that got worse ---------------------------------

def _fake_generation(monkeypatch, good: set[str], seed: int):
    """run_model without a model: a checkpoint named in ``good`` writes the right worked solution
    greedily on 2 questions in 5 and in 5 of every 8 samples (its other samples are wrong chains
    whose answer does not follow from their steps); any other checkpoint only writes wrong chains.
    Generation is the only fake: scoring, the verifier, the bootstrap and the gates are the real ones."""
    from gonogo.data import synthetic
    from gonogo.eval import evaluate as evaluation

    def run_model(checkpoint, questions, options, *, greedy_only=False, prompt_format="auto"):
        solutions = {p.question: p.solution for p in synthetic.generate("heldout", seed, len(questions))}
        n = max(options.samples)

        def wrong(question, salt):
            return solutions[question.question].rsplit("####", 1)[0] + f"#### {question.answer}9{salt}"

        greedy, sampled = [], []
        for number, question in enumerate(questions):
            right = solutions[question.question]
            is_good = str(checkpoint) in good
            greedy.append(([right if is_good and number % 5 < 2 else wrong(question, 7)], [20]))
            rounds = []
            for round_ in range(0 if greedy_only else options.sample_seeds):
                texts = [right if is_good and (index + round_) % 8 < 5 else wrong(question, index)
                         for index in range(n)]
                rounds.append((texts, [20] * n))
            sampled.append(rounds)
        return {"checkpoint": str(checkpoint), "prompt_format": "chat", "greedy": greedy, "sampled": sampled,
                "seconds": 1.0, "tokens": 20 * len(questions)}

    monkeypatch.setattr(evaluation, "run_model", run_model)


@pytest.mark.parametrize("plan_name", ["quick", "laptop", "gpu-node", "byo-model"])
def test_built_in_eval_gates_say_no_go_for_a_model_that_got_worse(plan_name, monkeypatch, tmp_path):
    from gonogo.stages.eval.stage import run_evaluation
    from gonogo.plan import load_plan, resolve_plan_path

    # byo-model's parameters only name paths; the fake generation below never opens them
    parameters = {"model": str(tmp_path / "model"), "data": str(tmp_path / "chats.jsonl")}
    plan = load_plan(resolve_plan_path(plan_name), parameters if plan_name == "byo-model" else None)
    stage = next(s for s in plan.stages if s.kind.name == "eval")
    assert stage.gates and stage.settings.compare_to
    _fake_generation(monkeypatch, good={"finetuned"}, seed=stage.settings.seed)

    def gates_on(checkpoint, compare_to, out):
        summary = run_evaluation(stage.settings, Path(checkpoint), Path(compare_to), None, tmp_path / out)
        metrics = {key: value for key, value in summary.items() if key not in NOT_METRICS}
        assert stage.metrics - STAGE_RUNNER_METRICS <= set(metrics)
        return [gate.evaluate(metrics) for gate in stage.gates]

    # the finetuned model against the pretrained one: every built-in gate passes (they can pass) ...
    better = gates_on("finetuned", "pretrained", "better")
    assert all(result.passed for result in better), [(r.gate.text, r.measured) for r in better]
    # ... and a pretrained-only model against the finetuned one fails them (they can fail)
    worse = gates_on("pretrained", "finetuned", "worse")
    assert not any(result.passed for result in worse), [(r.gate.text, r.measured) for r in worse]
