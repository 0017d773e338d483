import pytest

from gonogo.data import synthetic
from gonogo.data.synthetic import Problem, extract_answer, generate, split_of, verify


def test_document_format():
    problem = Problem("47+385=", "7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 432", "432", "add")
    assert problem.text == "Q: 47+385= A: 7+5=12 c1 >2; 4+8+1=13 c1 >32; 0+3+1=4 >432; #### 432"
    assert problem.prompt == "Q: 47+385= A:"


def test_every_family_answers_verify_and_are_right():
    problems = generate("train", seed=0, n=2000)
    assert {p.family for p in problems} == set(synthetic.FAMILIES)
    for problem in problems:
        assert extract_answer(problem.solution) == problem.answer
        assert verify(problem, problem.text)
        assert verify(problem, problem.answer)
        left = problem.question.rstrip("=")
        if problem.family in ("add", "sub", "mul"):
            assert int(problem.answer) == eval(left)  # the arithmetic itself is right
        elif problem.family == "count":
            _, letter, _, word = left.split()
            assert int(problem.answer) == word.count(letter)
        else:
            assert problem.answer == left.split()[1][::-1]


class Fixed:
    """Stands in for random.Random: hands out the given values in order."""

    def __init__(self, values):
        self.values = list(values)

    def choice(self, options):
        return self.values.pop(0)

    def randrange(self, low, high):
        return self.values.pop(0)


def test_arithmetic_steps_on_known_numbers():
    assert synthetic._add(Fixed([2, 47, 3, 385])) == (
        "47+385=", ["7+5=12 c1 >2", "4+8+1=13 c1 >32", "0+3+1=4 >432"], "432")
    # a carry out of the leftmost column: that column writes its whole sum
    assert synthetic._add(Fixed([3, 983, 2, 88])) == (
        "983+88=", ["3+8=11 c1 >1", "8+8+1=17 c1 >71", "9+0+1=10 c1 >1071"], "1071")
    assert synthetic._sub(Fixed([3, 432, 2, 47])) == (
        "432-47=", ["2-7=5 b1 >5", "3-4-1=8 b1 >85", "4-0-1=3 >385"], "385")
    # leading zeros stay in the steps, the answer drops them
    assert synthetic._sub(Fixed([3, 432, 3, 430])) == ("432-430=", ["2-0=2 >2", "3-3=0 >02", "4-4=0 >002"], "2")
    assert synthetic._mul(Fixed([3, 385, 7])) == (
        "385*7=", ["5*7=35 c3 >5", "8*7+3=59 c5 >95", "3*7+5=26 c2 >2695"], "2695")
    assert synthetic._count(Fixed([5, "b", "a", "a", "c", "a", "a"])) == ("count a in baaca=", ["b0 a1 a2 c2 a3"], "3")
    assert synthetic._reverse(Fixed([4, "i", "c", "e", "d"])) == ("reverse iced=", ["deci"], "deci")


def test_last_partial_answer_is_the_answer():
    for problem in generate("train", seed=2, n=1000):
        if problem.family in ("add", "sub", "mul"):
            last = problem.solution.split(";")[-2].split(">")[-1]
            assert int(last) == int(problem.answer)


def test_heldout_and_train_never_share_a_question():
    train = generate("train", seed=0, n=3000)
    heldout = generate("heldout", seed=0, n=1000)
    assert {p.question for p in train}.isdisjoint({p.question for p in heldout})
    assert all(split_of(p.question) == "train" for p in train)
    assert all(split_of(p.question) == "heldout" for p in heldout)
    # other seeds draw other problems, still on the right side
    other = generate("train", seed=1, n=500)
    assert {p.question for p in other}.isdisjoint({p.question for p in heldout})
    assert [p.question for p in other] != [p.question for p in train[:500]]


def test_seeded_reproducibility_and_random_access():
    first = generate("heldout", seed=7, n=200)
    assert first == generate("heldout", seed=7, n=200)
    assert synthetic.problem_at("heldout", 7, 150) == first[150]
    stream = synthetic.stream("heldout", 7, start=100)
    assert [next(stream) for _ in range(100)] == first[100:]
    only = generate("train", seed=0, n=100, families=["count"])
    assert {p.family for p in only} == {"count"}
    with pytest.raises(ValueError, match="families"):
        generate("train", 0, 1, families=["calculus"])
    with pytest.raises(ValueError, match="split"):
        generate("test", 0, 1)


@pytest.mark.parametrize("text, expected", [
    ("4+5=9; #### 9", "9"),
    ("#### 432 and more", "432"),
    ("####432", "432"),
    ("steps; #### 12; #### 13", "12"),
    ("#### deci\nQ: next", "deci"),
    ("no answer mark", None),
    ("#### ", None),
    ("####", None),
    ("", None),
    ("# ### 5", None),
])
def test_extract_answer_on_well_formed_and_malformed_text(text, expected):
    assert extract_answer(text) == expected


def test_verify_rejects_wrong_and_malformed_answers():
    problem = Problem("47+385=", "7+5=12 c1; 4+8+1=13 c1; 0+3+1=4; #### 432", "432", "add")
    assert verify(problem, " #### 0432")
    assert not verify(problem, "#### 431")
    assert not verify(problem, "7+5=12 c1; 4+8")  # cut off before the answer
    assert not verify(problem, "")
    assert not verify(problem, "#### ")
