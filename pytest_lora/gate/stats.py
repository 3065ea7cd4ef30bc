"""The statistics the gate needs: a one-sided Mann-Whitney U test and a median, in pure Python.

Why Mann-Whitney. Step times are not normal (a long right tail from the allocator, the OS and
other processes) and come in small samples (5 to 10 timed steps). The U test asks only whether a
step of one run tends to take longer than a step of the other, so one stray step does not decide
the verdict; asv gates on it for the same reasons. The test is one-sided, in the direction that
would be a regression: a run that got faster is not evidence of anything to fail on.

Small samples get the exact distribution of U (every ordering of the two samples equally likely
under the null hypothesis), larger ones the normal approximation with a continuity and a tie
correction. The smallest p-value an exact test can give is ``1 / C(n + m, n)``: 1/252 for 5
against 5 steps, which is why the gate's significance level (``ALPHA``) is not asv's 0.002.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

EXACT_LIMIT = 30  # n + m up to this many samples: the exact distribution (at most C(30, 15) orderings)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def u_statistic(new: Sequence[float], base: Sequence[float]) -> float:
    """How many (new, base) pairs have the new value larger; ties count one half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in new for y in base)


def mann_whitney_greater(new: Sequence[float], base: Sequence[float]) -> float:
    """p-value of the one-sided test that ``new`` tends to be larger than ``base``."""
    n, m = len(new), len(base)
    if n == 0 or m == 0:
        raise ValueError("the Mann-Whitney test needs at least one sample on each side")
    u = u_statistic(new, base)
    ties = len(set(new) | set(base)) < n + m
    if n + m <= EXACT_LIMIT and not ties:
        return _exact_upper_tail(n, m, int(u))
    return _normal_upper_tail(new, base, u)


def _exact_upper_tail(n: int, m: int, u: int) -> float:
    """P(U >= u) when every ordering of n new and m base values is equally likely."""
    counts = _u_counts(n, m)
    return sum(counts[u:]) / math.comb(n + m, n)


@lru_cache(maxsize=None)
def _u_counts(n: int, m: int) -> tuple[int, ...]:
    """How many orderings of n new and m base values give U = 0, 1, ..., n*m.

    The largest of all values is either a new one (it beats all m base values: U grows by m) or a
    base one (it adds nothing): counts(n, m)[u] = counts(n - 1, m)[u - m] + counts(n, m - 1)[u].
    """
    if n == 0 or m == 0:
        return (1,)
    with_new_largest = _u_counts(n - 1, m)
    with_base_largest = _u_counts(n, m - 1)
    counts = [0] * (n * m + 1)
    for u, count in enumerate(with_new_largest):
        counts[u + m] += count
    for u, count in enumerate(with_base_largest):
        counts[u] += count
    return tuple(counts)


def _normal_upper_tail(new: Sequence[float], base: Sequence[float], u: float) -> float:
    """The normal approximation of P(U >= u), with a continuity and a tie correction."""
    n, m = len(new), len(base)
    pooled = sorted([*new, *base])
    tie_sum = 0
    start = 0
    while start < len(pooled):
        end = start
        while end + 1 < len(pooled) and pooled[end + 1] == pooled[start]:
            end += 1
        size = end - start + 1
        tie_sum += size**3 - size
        start = end + 1
    total = n + m
    variance = n * m / 12 * ((total + 1) - tie_sum / (total * (total - 1)))
    if variance <= 0:  # every value equal: no evidence either way
        return 1.0
    z = (u - n * m / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))
