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


def bootstrap_intervals(rows: Sequence[Sequence[float]], draws: int = 1000, seed: int = 0,
                        level: float = 0.95) -> list[tuple[Optional[float], Optional[float]]]:
    """Percentile bootstrap intervals of the column means of ``rows`` (one row per question, one
    column per metric), resampling questions with replacement ``draws`` times. Paired metrics (a
    gain over greedy) are columns of per-question differences, so each draw keeps the pairing.
    With no rows every interval is absent (None, None)."""
    import numpy as np

    if not rows:
        return []
    data = np.asarray(rows, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError("rows must be a list of equally long rows of numbers")
    if draws < 1:
        raise ValueError(f"draws={draws} must be at least 1")
    generator = np.random.default_rng(seed)
    means = np.empty((draws, data.shape[1]))
    for start in range(0, draws, 200):      # 200 draws at a time: bounded memory for large evals
        index = generator.integers(0, len(data), size=(min(200, draws - start), len(data)))
        means[start:start + len(index)] = data[index].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return [(float(a), float(b)) for a, b in zip(low, high)]
