"""Generation and scoring with the real engine on a tiny random checkpoint (seconds)."""

import json

import pytest

from gonogo.data.tokenizer import ByteTokenizer
from gonogo.errors import UserError
from gonogo.eval.evaluate import (Options, Question, builtin_questions, evaluate, prompt_ids, score_question,
                                user_questions, verifier_quality)

OPTIONS = Options(samples=[1, 2, 4], temperature=1.0, seed=3, max_tokens=12)


def test_prompts_follow_the_checkpoint_format():
    tokenizer = ByteTokenizer()
    question = builtin_questions(1, 0, ["add"])[0]
    text = tokenizer.decode(prompt_ids(question, tokenizer, chat=False), skip_special_tokens=False)
    assert text == f"<|eos|>Q: {question.question} A:"
    chat = tokenizer.decode(prompt_ids(question, tokenizer, chat=True), skip_special_tokens=False)
    assert chat == f"<|bos|><|user|>{question.question}<|end|><|assistant|>"


def test_scores_of_one_question_by_hand():
    question = Question(prompt="47+385=", answer="432", family="add", question="47+385=")
    right = "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 432"
    lucky = "7+5=12 c1 >2; 4+8+1=14 c1 >42; 0+3+1=4 >432; #### 432"
    wrong = "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=5 >532; #### 532"
    misread = "7+5=12 c1 >2; 4+7+1=12 c1 >22; 0+3+1=4 >422; #### 422"
    row = score_question(question, ([wrong], [20]), [([wrong, wrong, lucky, right], [20, 20, 20, 22])], [1, 2, 4])
    assert row["correct"] is False and row["maj@1"] == 0 and row["maj@2"] == 0
    assert row["maj@4"] == 0                # 532 has two votes, 432 two: the tie goes to 532 (first seen)
    assert row["pass@1"] == pytest.approx(0.5) and row["pass@4"] == 1.0
    assert row["best_of_4"] == 1 and row["best_of_2"] == 0
    assert row["tokens@4"] == 82 and row["verifier"].startswith("process verifier")
    assert row["sample_correct"] == [False, False, True, True]
    # two sampling rounds: each k's score is the mean of the rounds; the misread chain fools the verifier
    row = score_question(question, ([wrong], [20]), [([lucky, right], [20, 20]), ([misread, right], [20, 20])], [2])
    assert row["best_of_2"] == pytest.approx(0.5) and row["pass@2"] == 1.0
    assert [r["best_of_2"] for r in row["per_round"]] == [1.0, 0.0]
    assert row["verifier_scores"][1] == row["verifier_scores"][2] == 1.0 and row["verifier_scores"][0] < 1


def test_the_pick_does_not_depend_on_the_reference():
    completions = ["7+5=12 c1 >2; 4+7+1=12 c1 >22; 0+3+1=4 >422; #### 422",
                   "7+5=12 c1 >2; 4+8+1=14 c1 >42; 0+3+1=4 >432; #### 432",
                   "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 432"]
    rows = {answer: score_question(Question(prompt="47+385=", answer=answer, family="add", question="47+385="),
                                   (["#### 1"], [3]), [(completions, [20, 20, 20])], [3])
            for answer in ("432", "422", "999")}
    assert len({tuple(row["verifier_scores"]) for row in rows.values()}) == 1
    # the verifier ties 422 and the right chain; the vote among the tied picks the first: 422,
    # right only when the reference says so
    assert [rows[a]["best_of_3"] for a in ("432", "422", "999")] == [0.0, 1.0, 0.0]


def test_precision_and_recall_of_the_verifier():
    rows = [{"verifier_scores": [1.0, 1.0, 0.5, None], "sample_correct": [True, False, True, True]},
            {"verifier_scores": [1.0, 0.2], "sample_correct": [True, False]}]
    quality = verifier_quality(rows)
    assert quality["verifier_samples"] == 5 and quality["verifier_accepted"] == 3
    assert quality["verifier_precision"] == pytest.approx(2 / 3) and quality["verifier_recall"] == pytest.approx(2 / 3)
    assert quality["verifier_lift"] == pytest.approx((2 / 3) / (3 / 5))    # 3 of the 5 scored samples are right
    nothing = verifier_quality([{"verifier_scores": [0.5], "sample_correct": [False]}])
    assert nothing["verifier_precision"] is None and nothing["verifier_recall"] is None   # no samples: absent
    assert nothing["verifier_lift"] is None


def test_user_questions_without_a_verifier_fall_back_to_the_vote():
    question = Question(prompt=[{"role": "user", "content": "Capital of France?"}], answer="Paris", family="user")
    row = score_question(question, (["#### Lyon"], [3]), [(["#### Lyon", "#### Paris", "#### Paris"], [3, 3, 3])], [3])
    assert row["verifier"].startswith("none") and row["verifier_scores"] == [None] * 3
    assert row["best_of_3"] == row["maj@3"] == 1.0


def test_evaluate_is_reproducible_and_reports_every_k_and_family(checkpoints, tmp_path):
    pretrained, finetuned = checkpoints
    questions = builtin_questions(6, 0)
    two_seeds = Options(samples=[1, 2, 4], temperature=1.0, seed=3, max_tokens=12, sample_seeds=2, bootstrap=200)
    first = evaluate(finetuned, questions, two_seeds, compare_to=pretrained, samples_path=tmp_path / "s.jsonl")
    second = evaluate(finetuned, questions, two_seeds)
    for k in (1, 2, 4):
        assert 0 <= first[f"maj@{k}"] <= 1 and 0 <= first[f"pass@{k}"] <= 1 and 0 <= first[f"best_of_{k}"] <= 1
        assert first[f"pass@{k}"] == second[f"pass@{k}"] and first[f"maj@{k}"] == second[f"maj@{k}"]
    assert first["pass@4"] >= first["pass@2"] >= first["pass@1"]
    assert first["prompt_format"] == "chat" and first["compare"]["prompt_format"] == "text"
    assert first["accuracy_gain"] == first["accuracy"] - first["compare_accuracy"]
    assert sum(block["questions"] for block in first["per_family"].values()) == 6
    assert [point["k"] for point in first["curve"]] == [1, 2, 4]
    assert first["curve"][0]["tokens_per_question"] < first["curve"][2]["tokens_per_question"] <= first["tokens_per_question"]
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["samples"]) == 8 and len(row["per_round"]) == 2 for row in rows)
    assert [entry["sampling_seed"] for entry in first["per_seed"]] == [3, 1003]
    for k in (1, 2, 4):   # the two-seed value is the mean of the seeds; each interval brackets its value
        assert first[f"maj@{k}"] == pytest.approx(sum(e[f"maj@{k}"] for e in first["per_seed"]) / 2)
        for name in (f"maj@{k}", f"best_of_{k}", f"pass@{k}", f"maj_gain@{k}", f"best_gain@{k}", "accuracy",
                     "accuracy_gain"):
            assert first[f"{name}_ci_low"] <= first[name] + 1e-12 <= first[f"{name}_ci_high"] + 2e-12
    assert first["verifier_samples"] == 6 * 8


def test_user_questions_report_bad_lines_and_refuse_a_mostly_bad_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "2+2=", "answer": 4}),
                               "{not json",
                               json.dumps({"messages": [{"role": "user", "content": "3+3="}], "answer": "6"}),
                               json.dumps({"prompt": "1+1="}),
                               ""]) + "\n")
    questions, bad = user_questions(path, min_good_fraction=0.5)
    assert [q.answer for q in questions] == ["4", "6"]
    assert [number for number, _ in bad] == [2, 4]
    assert "not valid JSON" in bad[0][1] and "answer" in bad[1][1]
    with pytest.raises(UserError, match=r"only 2 of 4 lines are usable.*first bad line 2"):
        user_questions(path, min_good_fraction=0.9)
