"""A process verifier for the built-in reasoning tasks: it re-derives every step from the question.

Best-of-N needs a judge that does not peek at the reference answer. For the synthetic families
the question alone fixes the worked solution (column additions with carries, borrows, partial
products, a running letter count, a reversed word), so the verifier recomputes each step from
the question's numbers and scores a completion by the share of its steps (and its final answer,
which must follow from the steps) that are right. A completion with a wrong step scores below
one with every step right, even when it happens to land on the right number.

User questions have no derivation: there the judge is only the final answer against the
reference ("verifier = answer check", an oracle, so best-of-N equals pass@N).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from gonogo.data.synthetic import ANSWER_MARK, extract_answer

STEP_VERIFIER = "step re-derivation"
ANSWER_CHECK = "answer check"


def _digits(number: int, width: int) -> list[int]:
    return [(number // 10**place) % 10 for place in range(width)]


def _add_steps(a: int, b: int) -> tuple[list[str], str]:
    width = max(len(str(a)), len(str(b)))
    steps, carry, so_far = [], 0, ""
    for column, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        total = x + y + carry
        step = f"{x}+{y}" + ("+1" if carry else "") + f"={total}"
        carry = int(total >= 10)
        so_far = (str(total) if column == width - 1 else str(total % 10)) + so_far
        steps.append(step + (" c1" if carry else "") + f" >{so_far}")
    return steps, so_far


def _sub_steps(a: int, b: int) -> tuple[list[str], str]:
    steps, borrow, so_far = [], 0, ""
    for x, y in zip(_digits(a, len(str(a))), _digits(b, len(str(a)))):
        value = x - y - borrow
        step = f"{x}-{y}" + ("-1" if borrow else "")
        borrow = int(value < 0)
        so_far = str(value % 10) + so_far
        steps.append(step + (f"={value + 10} b1" if borrow else f"={value}") + f" >{so_far}")
    return steps, str(int(so_far))


def _mul_steps(a: int, digit: int) -> tuple[list[str], str]:
    columns = _digits(a, len(str(a)))
    steps, carry, so_far = [], 0, ""
    for column, x in enumerate(columns):
        product = x * digit + carry
        step = f"{x}*{digit}" + (f"+{carry}" if carry else "") + f"={product}"
        carry = product // 10
        so_far = (str(product) if column == len(columns) - 1 else str(product % 10)) + so_far
        steps.append(step + (f" c{carry}" if carry else "") + f" >{so_far}")
    return steps, so_far


def _count_steps(target: str, word: str) -> tuple[list[str], str]:
    seen, parts = 0, []
    for letter in word:
        seen += letter == target
        parts.append(f"{letter}{seen}")
    return [" ".join(parts)], str(seen)


_QUESTIONS: list[tuple[re.Pattern, Callable[..., tuple[list[str], str]], Callable]] = [
    (re.compile(r"(\d+)\+(\d+)="), _add_steps, int),
    (re.compile(r"(\d+)-(\d+)="), _sub_steps, int),
    (re.compile(r"(\d+)\*(\d)="), _mul_steps, int),
    (re.compile(r"count ([a-z]) in ([a-z]+)="), _count_steps, str),
    (re.compile(r"reverse ([a-z]+)="), lambda word: ([word[::-1]], word[::-1]), str),
]


def derive(question: str) -> Optional[tuple[list[str], str]]:
    """The worked steps and the answer that follow from a synthetic question, or None."""
    for pattern, steps_of, convert in _QUESTIONS:
        match = pattern.fullmatch(question.strip())
        if match:
            return steps_of(*(convert(group) for group in match.groups()))
    return None


def step_score(question: str) -> Optional[Callable[[str], float]]:
    """A scorer of completions for ``question`` (1.0 = every step and the answer re-derive), or
    None when the question is not one the verifier can derive."""
    derived = derive(question)
    if derived is None:
        return None
    expected_steps, expected_answer = derived

    def score(completion: str) -> float:
        work = completion.split(ANSWER_MARK, 1)[0]
        steps = [step.strip() for step in work.split(";") if step.strip()]
        right = sum(1 for got, want in zip(steps, expected_steps) if got == want)
        answer = extract_answer(completion)
        right += answer is not None and answer == expected_answer
        # extra steps are wrong steps: the denominator is the longer of the two derivations
        return right / (max(len(steps), len(expected_steps)) + 1)

    return score


def answer_score(reference: str, check: Callable[[str, str], bool]) -> Callable[[str], float]:
    """The fallback judge: 1.0 when the completion's final answer matches the reference."""
    return lambda completion: float(check(completion, reference))
