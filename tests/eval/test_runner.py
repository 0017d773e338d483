"""Generation and scoring with the real engine on a tiny random checkpoint (seconds)."""

import json

import pytest

from gonogo.data.tokenizer import ByteTokenizer
from gonogo.errors import UserError
from gonogo.eval.runner import (Options, Question, builtin_questions, evaluate, prompt_ids, score_question,
                                user_questions)

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
    row = score_question(question, ([wrong], [20]), ([wrong, wrong, lucky, right], [20, 20, 20, 22]), [1, 2, 4])
    assert row["correct"] is False and row["maj@1"] is False and row["maj@2"] is False
    assert row["maj@4"] is False            # 532 has two votes, 432 two: the tie goes to 532 (first seen)
    assert row["pass@1"] == pytest.approx(0.5) and row["pass@4"] == 1.0
    assert row["best_of_4"] is True and row["best_of_2"] is False
    assert row["tokens@4"] == 82 and row["verifier"] == "step re-derivation"


def test_evaluate_is_reproducible_and_reports_every_k_and_family(checkpoints, tmp_path):
    pretrained, finetuned = checkpoints
    questions = builtin_questions(6, 0)
    first = evaluate(finetuned, questions, OPTIONS, compare_to=pretrained, samples_path=tmp_path / "s.jsonl")
    second = evaluate(finetuned, questions, OPTIONS)
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
    assert len(rows) == 6 and all(len(row["samples"]) == 4 for row in rows)


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
