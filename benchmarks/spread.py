"""The spread of a benchmark figure over repeats, and whether enough repeats were taken to trust its median.

A ratio is computed per repeat (both of its timings come from the same repeat, so drift between repeats cancels),
then summarised by its median, quartiles and range. Quartiles and range describe how the repeats scatter and do not
shrink with more repeats; what does is the distribution-free 95% confidence interval of the median (order
statistics: no assumption about the noise's shape), so that interval, relative to the median, is what a target
spread such as +-2% is checked against.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

CONFIDENCE = 0.95


def median_interval_ranks(count: int) -> tuple[int, int] | None:
    """1-based ranks (k, count + 1 - k) of the sorted samples bounding the median with at least 95% confidence:
    the largest k with P(Binomial(count, 1/2) < k) <= 2.5%. None when too few samples give any
    such interval (under 6 at 95%)."""
    tail = (1 - CONFIDENCE) / 2
    below = 0.0  # P(Binomial(count, 1/2) < k), k = 1 first
    rank = 0
    for k in range(1, count // 2 + 1):
        below += math.comb(count, k - 1) / 2**count
        if below > tail:
            break
        rank = k
    return (rank, count + 1 - rank) if rank else None


def spread(values: Sequence[float]) -> dict:
    """Median, quartiles (linear interpolation between order statistics), range and the confidence interval of the
    median; `half_width` is that interval's larger side relative to the median (None with too few repeats)."""
    ordered = sorted(values)
    median = statistics.median(ordered)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else (median, median, median)
    ranks = median_interval_ranks(len(ordered))
    interval = (ordered[ranks[0] - 1], ordered[ranks[1] - 1]) if ranks else None
    half_width = max(median - interval[0], interval[1] - median) / median if interval else None
    return {"median": median, "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1], "ci95": interval,
            "half_width": half_width, "repeats": len(ordered)}


def within(summary: dict, target: float) -> bool:
    """Whether the median is known to within +-target (relative); never with too few repeats for an interval."""
    return summary["half_width"] is not None and summary["half_width"] <= target


def per_repeat_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """The ratio of two timings taken in the same repeat, repeat by repeat."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} timings against {len(denominator)}: the ratio needs one of each per repeat")
    return [a / b for a, b in zip(numerator, denominator)]
