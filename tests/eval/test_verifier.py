"""The step verifier re-derives solutions from the question, not from the reference answer."""

from gonogo.data import synthetic
from gonogo.eval.verifier import derive, step_score


def test_every_built_in_solution_re_derives_from_its_question():
    for problem in synthetic.generate("heldout", 7, 300):
        steps, answer = derive(problem.question)
        assert answer == problem.answer
        assert step_score(problem.question)(problem.solution) == 1.0


def test_a_wrong_step_scores_below_a_right_one_even_with_the_right_answer():
    score = step_score("47+385=")
    right = "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 432"
    lucky = "7+5=12 c1 >2; 4+8+1=14 c1 >42; 0+3+1=4 >432; #### 432"
    wrong_answer = "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 433"
    assert score(right) == 1.0
    assert score(lucky) < 1.0 and score(wrong_answer) < 1.0
    assert score("7+5=12 c1 >2; #### 2") < score(right)
    assert score(right.replace("; ####", "; 1+1=2 >2; ####")) < 1.0   # an extra step is a wrong step


def test_questions_it_cannot_derive_have_no_verifier():
    assert derive("What is the capital of France?") is None
    assert step_score("What is the capital of France?") is None
