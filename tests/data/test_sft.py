import json
import logging

import pytest
import torch

from gonogo.data import synthetic
from gonogo.data.loader import IGNORE_INDEX
from gonogo.data.sft import make_sft_source, parse_example, read_sft_jsonl, sft_loader
from gonogo.data.tokenizer import ByteTokenizer
from gonogo.errors import UserError

GOOD_MESSAGES = {"messages": [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]}
GOOD_PROMPT = {"prompt": "2+2=", "completion": "#### 4"}


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_synthetic_chats_train_only_on_the_worked_solution():
    source = make_sft_source("synthetic", "train", seed=0)
    tokenizer = ByteTokenizer()
    problem = synthetic.problem_at("train", 0, 4)
    ids, mask = source.document(4, 0)
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        f"<|bos|><|user|>{problem.question}<|end|><|assistant|>{problem.solution}<|end|>")
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == problem.solution + "<|end|>"
    val = make_sft_source("synthetic", "val", seed=0)
    heldout = synthetic.problem_at("heldout", 0, 0)
    assert tokenizer.decode(val.document(0, 0)[0]).startswith(heldout.question)


def test_sft_loader_masks_everything_but_assistant_tokens():
    loader = sft_loader(make_sft_source("synthetic"), seq_len=128, batch_size=2)
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (2, 128)
    tokenizer = ByteTokenizer()
    kept = tokenizer.decode(targets[0][targets[0] != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert "####" in kept and "<|user|>" not in kept and "<|assistant|>" not in kept
    assert (targets == IGNORE_INDEX).sum() > 0
    # where a target is kept it is the next input token
    same = targets[:, :-1] != IGNORE_INDEX
    assert torch.equal(targets[:, :-1][same], inputs[:, 1:][same])


def test_both_jsonl_formats_are_read(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [GOOD_MESSAGES, "", GOOD_PROMPT])
    data = read_sft_jsonl(path)
    assert data.skipped == 0 and len(data.examples) == 2
    assert data.examples[1] == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "#### 4"}]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"text": "plain"}, "needs a 'messages' list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role is 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no non-empty assistant message"),
    ({"prompt": "q"}, "must both be strings"),
    ({"prompt": "q", "completion": ""}, "'completion' is empty"),
])
def test_each_kind_of_bad_line_is_explained(line, problem):
    messages, reason = parse_example(line if isinstance(line, str) else json.dumps(line))
    assert messages is None and problem in reason


def test_bad_lines_are_reported_with_line_numbers_and_counted(tmp_path, caplog):
    lines = [GOOD_MESSAGES] * 10 + ["{broken"] + [GOOD_PROMPT] * 8 + [{"prompt": 1, "completion": "x"}]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        data = read_sft_jsonl(path, min_good_fraction=0.8)
    assert data.bad_lines == [(11, "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
                              (20, "'prompt' and 'completion' must both be strings")]
    assert data.skipped == 2 and len(data.examples) == 18
    assert "mixed.jsonl:11: skipped: not valid JSON" in caplog.text
    assert "skipped 2 of 20 lines" in caplog.text


def test_too_many_bad_lines_is_a_user_error(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD_PROMPT, "nope", {"text": "x"}])
    with pytest.raises(UserError, match=r"only 1 of 3 lines are usable .*first bad line 2: not valid JSON"):
        read_sft_jsonl(path, min_good_fraction=0.5)
    assert len(read_sft_jsonl(path, min_good_fraction=0.3).examples) == 1
    with pytest.raises(UserError, match="no such file"):
        read_sft_jsonl(tmp_path / "missing.jsonl")


def test_user_jsonl_source_splits_train_and_val_without_overlap(tmp_path):
    lines = [{"prompt": f"question {index}", "completion": f"#### {index}"} for index in range(200)]
    path = write_lines(tmp_path / "many.jsonl", lines)
    train = make_sft_source(path, "train", val_percent=10)
    val = make_sft_source(path, "val", val_percent=10)
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    assert not {json.dumps(e) for e in train.examples} & {json.dumps(e) for e in val.examples}
    inputs, targets = next(sft_loader(train, seq_len=32, batch_size=2))
    assert inputs.shape == (2, 32)
