"""pass@k, maj@k and best-of-N on hand-computed cases."""

import math

import pytest

from gonogo.eval.scoring import best_of, majority_answer, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),
    (5, 1, 1, 1 / 5),                       # one draw hits the single correct sample 1 time in 5
    (5, 2, 2, 1 - 3 / 10),                  # C(3,2)/C(5,2) = 3/10 of the pairs miss both
    (10, 3, 4, 1 - 35 / 210),               # C(7,4)=35, C(10,4)=210
    (4, 3, 2, 1.0),                         # n - c = 1 < k: every pair holds a correct one
    (16, 1, 8, 0.5),
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # the binomials here overflow a float; the running product does not
    value = pass_at_k(2000, 10, 100)
    exact = 1 - math.comb(1990, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-9)


def test_pass_at_k_refuses_k_beyond_n():
    with pytest.raises(ValueError, match="k=9"):
        pass_at_k(8, 1, 9)


def test_majority_ignores_missing_answers_and_breaks_ties_by_first_appearance():
    assert majority_answer(["3", None, "4", "4", None, None]) == "4"
    assert majority_answer(["7", "5", "5", "7"]) == "7"          # tie: "7" came first
    assert majority_answer([None, None]) is None


def test_best_of_prefers_the_verifier_then_the_vote():
    texts = ["a", "b", "c", "d"]
    answers = ["1", "2", "2", "1"]
    scores = {"a": 0.5, "b": 1.0, "c": 1.0, "d": 0.2}
    assert best_of(texts, answers, scores.get) == 1
    # b, c and d tie: the answer "1" has one vote among them, "2" two -> the first "2" wins
    scores = {"a": 0.1, "b": 0.9, "c": 0.9, "d": 0.9}
    assert best_of(texts, answers, scores.get) == 1
    assert best_of(["x", "y"], ["5", "6"], {"x": 0.0, "y": 1.0}.get) == 1
