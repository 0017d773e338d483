"""The process verifier re-checks each step from its own text and never sees the reference."""

import inspect

import pytest

from gonogo.data import synthetic
from gonogo.eval import verifier
from gonogo.eval.verifier import score

RIGHT = "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 432"


def test_its_only_inputs_are_the_prompt_and_the_completion():
    assert list(inspect.signature(score).parameters) == ["prompt", "completion"]
    assert list(inspect.signature(verifier.scorer_for).parameters) == ["prompt"]
    # the module does not import the corpus that could recompute the answer from the question
    source = inspect.getsource(verifier)
    assert not any(line.startswith(("import ", "from ")) and "synthetic" in line for line in source.splitlines())


def test_every_built_in_solution_is_consistent():
    for problem in synthetic.generate("heldout", 7, 300):
        assert score(problem.question, problem.solution) == 1.0, problem


@pytest.mark.parametrize("completion", [
    "7+5=12 c1 >2; 4+8+1=14 c1 >42; 0+3+1=4 >432; #### 432",   # 4+8+1 is not 14 (lucky final answer)
    "7+5=12 >2; 4+8=12 c1 >22; 0+3+1=4 >422; #### 422",           # 12 without its carry, and the carry lost
    "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 433",      # the answer does not follow from the steps
    "7+5=12 c1 >2; 4+8+1=13 c1 >31; 0+3+1=4 >431; #### 431",      # the running answer is not the column's digit
    "7+5=12 c1 >2; #### 2",                                       # stops early: the last column keeps its carry
    "the answer is 432",
])
def test_an_inconsistent_chain_scores_below_a_consistent_one(completion):
    assert score("47+385=", RIGHT) == 1.0
    assert score("47+385=", completion) < 1.0


def test_sub_mul_and_count_chains_are_checked_from_their_own_text():
    assert score("52-17=", "2-7=5 b1 >5; 5-1-1=3 >35; #### 35") == 1.0
    assert score("52-17=", "2-7=5 >5; 5-1=4 >45; #### 45") < 1.0          # a borrow not taken
    assert score("304-298=", "4-8=6 b1 >6; 0-9-1=0 b1 >06; 3-2-1=0 >006; #### 6") == 1.0
    assert score("304-298=", "4-8=6 b1 >6; 0-9-1=0 b1 >06; 3-2-1=0 >006; #### 006") == 1.0
    assert score("47*6=", "7*6=42 c4 >2; 4*6+4=28 c2 >282; #### 282") == 1.0
    assert score("47*6=", "7*6=42 c4 >2; 4*6+3=27 c2 >272; #### 272") < 1.0  # adds a carry that was not written
    assert score("47*6=", "7*6=42 c4 >2; 4*5+4=24 c2 >242; #### 242") < 1.0  # the multiplier changed
    assert score("count a in abca=", "a1 b1 c1 a2; #### 2") == 1.0
    assert score("count a in abca=", "a1 b1 c2 a2; #### 2") < 1.0          # counted a second letter
    assert score("count a in abca=", "a1 b1 c1 a1; #### 1") < 1.0          # missed an occurrence
    assert score("reverse abc=", "cba; #### cba") == 1.0
    assert score("reverse abc=", "cba; #### cab") < 1.0


def test_its_blind_spot_is_a_consistent_chain_that_misread_the_question():
    # 4+7 instead of 4+8: every step is consistent, the answer is wrong -- the verifier cannot
    # know, because it does not read the operands (that would make it an answer oracle again)
    assert score("47+385=", "7+5=12 c1 >2; 4+7+1=12 c1 >22; 0+3+1=4 >422; #### 422") == 1.0


def test_prompts_it_does_not_know_have_no_score():
    assert score("What is the capital of France?", "#### Paris") is None
    assert verifier.scorer_for("What is the capital of France?") is None
    assert verifier.chain_kind("Q: 47+385= A:") == "add"
