"""A process verifier that does not know the answer: it re-checks each step from the step's text.

Best-of-N is only a measurement of test-time scaling if its judge cannot see the reference
answer. The judge here is :func:`score`, whose whole input is the prompt text and one
completion: the reference answer is not an argument, and nothing here recomputes it.

What it checks, per step of a built-in chain (``7+5=12 c1 >2; 4+8+1=13 c1 >32; ... #### 432``):

- the step's own arithmetic: ``4+8+1=13`` is 13; ``3-7-1=15 b1`` borrowed because 3-7-1 < 0;
  ``7*6+4=46 c4`` carries 4 because 46 // 10 = 4;
- that it continues the step before it: the carry (borrow) it adds is the one the previous step
  wrote, the multiplier digit stays the same, and its running answer (``>32``) is the previous
  one with this column's digit in front (the whole value for the leftmost column);
- that the final answer after ``####`` is the last step's running answer.

``count`` chains (``a0 b1 c1 b2``) are checked for a running count that rises by one exactly on
one letter; ``reverse`` chains only for the answer copying the step. The prompt is read for one
thing: which kind of chain to expect (``+``, ``-``, ``*``, ``count``, ``reverse``). The
operands, the word and the letter are never read, so a chain that copies a digit of the question
wrongly but is otherwise consistent scores 1.0: that is this verifier's blind spot, and why its
precision (the share of accepted samples that are right) is measured and reported rather than
assumed. A completion it cannot parse as a chain scores 0 on the unparsed steps; a prompt whose
kind it does not know has no score (None), and best-of-N falls back to the vote.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

ANSWER_MARK = "####"  # the same mark as gonogo.data.synthetic, which is not imported: no reference here
PROCESS_VERIFIER = "process verifier, no reference"
NO_VERIFIER = "none (the vote picks)"
ACCEPT = 1.0  # a completion is "accepted" when every check passes: precision/recall use this

_ANSWER = re.compile(re.escape(ANSWER_MARK) + r"[ \t]*([^\s;]+)")
_ADD = re.compile(r"(\d)\+(\d)(\+1)?=(\d+)( c1)? >(\d+)")
_SUB = re.compile(r"(\d)-(\d)(-1)?=(\d+)( b1)? >(\d+)")
_MUL = re.compile(r"(\d)\*(\d)(?:\+(\d))?=(\d+)(?: c(\d))? >(\d+)")
_COUNT_TOKEN = re.compile(r"([a-z])(\d+)")
_WORD = re.compile(r"[a-z]+")

_KINDS = [
    (re.compile(r"\d+\+\d+="), "add"),
    (re.compile(r"\d+-\d+="), "sub"),
    (re.compile(r"\d+\*\d="), "mul"),
    (re.compile(r"count [a-z] in [a-z]+="), "count"),
    (re.compile(r"reverse [a-z]+="), "reverse"),
]


def chain_kind(prompt: str) -> Optional[str]:
    """Which kind of chain the prompt asks for (the last line's question), or None."""
    text = prompt.strip().splitlines()[-1].strip() if prompt.strip() else ""
    if text.startswith("Q:"):
        text = text[2:].strip()
    if text.endswith("A:"):
        text = text[:-2].strip()
    for pattern, kind in _KINDS:
        if pattern.fullmatch(text):
            return kind
    return None


def _split(completion: str) -> tuple[list[str], Optional[str]]:
    work = completion.split(ANSWER_MARK, 1)[0]
    steps = [step.strip() for step in work.split(";") if step.strip()]
    match = _ANSWER.search(completion)
    return steps, match.group(1) if match else None


def _column_checks(steps: list[str], kind: str) -> tuple[list[bool], Optional[str]]:
    """One pass/fail per step of an add/sub/mul chain, and the last running answer."""
    pattern = {"add": _ADD, "sub": _SUB, "mul": _MUL}[kind]
    results: list[bool] = []
    carry_out: Optional[int] = 0     # what the previous step said it carries (None: unknown)
    running: Optional[str] = ""
    multiplier: Optional[int] = None
    for position, step in enumerate(steps):
        last = position == len(steps) - 1
        match = pattern.fullmatch(step)
        if not match:
            results.append(False)
            carry_out, running = None, None
            continue
        if kind == "add":
            x, y, plus, total, flag, shown = match.groups()
            carry_in, value = int(bool(plus)), int(total)
            ok = int(x) + int(y) + carry_in == value and bool(flag) == (value >= 10)
            next_carry, digits = int(value >= 10), (total if last else str(value % 10))
        elif kind == "sub":
            x, y, minus, written, flag, shown = match.groups()
            carry_in, value = int(bool(minus)), int(x) - int(y) - int(bool(minus))
            ok = int(written) == (value + 10 if value < 0 else value) and bool(flag) == (value < 0)
            next_carry, digits = int(value < 0), str(int(written) % 10)
        else:
            x, digit, plus, product, flag, shown = match.groups()
            carry_in, value = int(plus or 0), int(product)
            ok = int(x) * int(digit) + carry_in == value and int(flag or 0) == value // 10
            ok = ok and (multiplier is None or multiplier == int(digit))
            multiplier = int(digit)
            next_carry, digits = value // 10, (product if last else str(value % 10))
        ok = ok and carry_out is not None and carry_in == carry_out
        ok = ok and running is not None and shown == digits + running
        results.append(ok)
        carry_out, running = next_carry, shown
    if kind == "sub" and running:
        running = str(int(running))  # the answer drops the leading zeros of the last running answer
    return results, running


def _count_checks(steps: list[str]) -> tuple[list[bool], Optional[str]]:
    """One pass/fail per ``letter+count`` token: the count rises by one on every occurrence of one
    letter (the first letter it rises on; the question's letter is not read) and on no other."""
    if len(steps) != 1:
        return [False] * max(len(steps), 1), None
    tokens = [_COUNT_TOKEN.fullmatch(token) for token in steps[0].split()]
    counted, seen = None, 0
    for match in tokens:
        if match and int(match.group(2)) == seen + 1:
            counted = match.group(1)
            break
        if match:
            seen = int(match.group(2))
    results, seen = [], 0
    for match in tokens:
        if not match:
            results.append(False)
            continue
        letter, count = match.group(1), int(match.group(2))
        results.append(count == seen + (letter == counted))
        seen = count
    return results, str(seen)


def _same(answer: str, final: str) -> bool:
    if answer.isdigit() and final.isdigit():
        return int(answer) == int(final)  # "035" is the running answer 035 written without its zero
    return answer == final


def score(prompt: str, completion: str) -> Optional[float]:
    """The share of checks that pass (1.0: every step and the answer are consistent), or None when
    the prompt is not a kind of chain this verifier knows. Takes no reference answer, by design."""
    kind = chain_kind(prompt)
    if kind is None:
        return None
    steps, answer = _split(completion)
    if not steps:
        return 0.0
    if kind in ("add", "sub", "mul"):
        results, final = _column_checks(steps, kind)
    elif kind == "count":
        results, final = _count_checks(steps)
    else:
        results = [len(steps) == 1 and _WORD.fullmatch(steps[0]) is not None]
        final = steps[0] if results[0] else None
    results.append(answer is not None and final is not None and _same(answer, final))
    return sum(results) / len(results)


def scorer_for(prompt: str) -> Optional[Callable[[str], float]]:
    """``score`` bound to one prompt (what best-of-N calls per sample), or None without a verifier."""
    if chain_kind(prompt) is None:
        return None
    return lambda completion: score(prompt, completion) or 0.0
