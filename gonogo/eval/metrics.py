"""Scores of one question's samples: pass@k, maj@k (self-consistency) and best-of-N.

pass@k is the unbiased estimator of Chen et al. 2021 (openai/human-eval): with n samples of
which c are correct, the chance that k drawn without replacement contain a correct one,
1 - C(n-c, k) / C(n, k), computed as a running product so no huge binomial is formed.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``c`` correct out of ``n`` samples (``k <= n``)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples c={c} must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def majority_answer(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent extracted answer (None answers do not vote); a tie goes to the answer
    that appeared first, so the vote is deterministic."""
    votes = Counter(answer for answer in answers if answer is not None)
    if not votes:
        return None
    most = max(votes.values())
    return next(answer for answer in answers if answer is not None and votes[answer] == most)


def best_of(texts: Sequence[str], answers: Sequence[Optional[str]],
            score: Callable[[str], float]) -> int:
    """Index of the sample the verifier likes best (``score`` in [0, 1]); ties go to the sample
    whose answer has more votes among the tied, then to the earliest."""
    scores = [score(text) for text in texts]
    top = max(scores)
    tied = [index for index, value in enumerate(scores) if value == top]
    if len(tied) == 1:
        return tied[0]
    winner = majority_answer([answers[index] for index in tied])
    return next((index for index in tied if answers[index] == winner), tied[0])
