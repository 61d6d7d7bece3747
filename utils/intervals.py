"""How far an accuracy measured on n expressions can be trusted: a confidence interval for a binomial
proportion.

The Wilson score interval, not the normal approximation p ± z·sqrt(p(1-p)/n): a breakdown by kind of
expression holds small counts (15 expressions) and accuracies near 0 or 100 %, where the normal
interval shrinks to a point (0 of n, n of n), spills past [0, 1] and covers the true value far less
often than it claims; Wilson's stays inside [0, 1] and keeps close to its coverage (Brown, Cai and
DasGupta, Statistical Science 16(2), 2001).
"""
from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """``(low, high)``, proportions in [0, 1], of the Wilson score interval for ``successes`` of ``n``:
    centre ``(p + z²/2n) / (1 + z²/n)``, half-width ``z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)``, with
    ``p = successes / n`` and ``z`` the normal quantile of ``(1 + confidence) / 2`` (1.96 at 95 %)."""
    if n < 1:
        raise ValueError(f"a confidence interval needs at least one trial, got n = {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n = {n}, got {successes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 of n (n of n) the low (high) end is 0 (1) exactly; computed, it would miss by a rounding error.
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)
