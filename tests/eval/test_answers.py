"""Answers of user problems: GSM8K's `#### 42` and MATH's `\\boxed{...}`, compared by value."""

from __future__ import annotations

import pytest

from gonogo.data.synthetic import Problem, canonical_answer, extract_answer, verify
from gonogo.eval.evaluate import normal_answer
from gonogo.eval.scoring import majority_answer


@pytest.mark.parametrize("text, expected", [
    ("so she pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("#### 1,234 apples", "1,234"),
    ("we get \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("first \\boxed{1}, finally \\boxed{x^{2}+1}", "x^{2}+1"),   # the last box, nested braces
    ("cut off \\boxed{12", None),
    ("#### ", None),
    ("no answer here", None),
])
def test_extraction(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, reference, right", [
    ("#### 1,234", "1234", True),
    ("#### 1234.0", "1234", True),
    ("\\boxed{0.75}", "3/4", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{$42.50}", "42.5", True),
    ("#### 50%", "0.5", True),
    ("#### 0432", "432", True),
    ("\\boxed{41}", "42", False),
    ("#### ahg", "ahg", True),
    ("#### ahg", "hga", False),
])
def test_answers_compare_by_value(completion, reference, right):
    assert verify(Problem("", "", reference, ""), completion) is right


def test_votes_count_equal_values_as_one_answer():
    answers = [normal_answer(extract_answer(text)) for text in ["#### 1,000", "\\boxed{1000}", "#### 999", "#### 1000.0"]]
    assert answers.count(canonical_answer("1000")) == 3 and majority_answer(answers) == "1000"
