"""Evidence: the moments of the video the kept tokens come from, as ranked time ranges.

One definition for every surface (CLI, API, show, server, ComfyUI) and, through the shared test vectors, the C++
runtime. A temporal unit is *dense* when it holds at least twice its uniform share of the kept tokens
(2 * kept / units, and at least one token); consecutive dense units form a range; ranges are ranked by the share of
all kept tokens they hold (ties: the earlier range first). A range spans from its first unit's timestamp to the
start of the unit after its last one (the last unit of the video lasts as long as the one before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DENSITY = 2.0  # a unit is dense at this many times its uniform share of the kept tokens
MAX_RANGES = 5


@dataclass(frozen=True)
class EvidenceRange:
    start_s: float
    end_s: float
    tokens: int  # kept tokens inside the range
    share: float  # of all kept tokens, 0..1

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def unit_ends(timestamps: Sequence[float]) -> np.ndarray:
    """When each unit stops: the next unit's start; the last lasts as long as the one before it (1 s if alone)."""
    starts = np.asarray(timestamps, dtype=np.float64)
    if len(starts) == 0:
        return starts
    step = starts[-1] - starts[-2] if len(starts) > 1 else 1.0
    return np.append(starts[1:], starts[-1] + step)


def evidence_ranges(
    kept_per_unit: Sequence[int], timestamps: Sequence[float], max_ranges: int = MAX_RANGES
) -> list[EvidenceRange]:
    """Ranked time ranges where the kept tokens concentrate (see the module docstring for the rule)."""
    counts = np.asarray(kept_per_unit, dtype=np.int64)
    if len(counts) != len(timestamps):
        raise ValueError(f"{len(counts)} unit counts for {len(timestamps)} timestamps")
    total = int(counts.sum())
    if total == 0:
        return []
    threshold = max(1.0, DENSITY * total / len(counts))
    ends = unit_ends(timestamps)
    ranges, first = [], None
    for u, dense in enumerate(np.append(counts >= threshold, False)):
        if dense and first is None:
            first = u
        elif not dense and first is not None:
            tokens = int(counts[first:u].sum())
            ranges.append(EvidenceRange(float(timestamps[first]), float(ends[u - 1]), tokens, tokens / total))
            first = None
    ranges.sort(key=lambda r: (-r.tokens, r.start_s))
    return ranges[:max_ranges]


def describe(ranges: Sequence[EvidenceRange], kept: int, total: int) -> str:
    """One plain sentence, e.g. 'kept 96 of 2880 tokens; 81% of them from 18.8-19.8 s, 6% from 3.0-3.5 s'."""
    head = f"kept {kept} of {total} tokens"
    if not ranges:
        return head + ", spread evenly over the video"
    parts = [
        f"{r.share:.0%} {'of them ' if i == 0 else ''}from {r.start_s:.1f}-{r.end_s:.1f} s"
        for i, r in enumerate(ranges[:3])
    ]
    return f"{head}; " + ", ".join(parts)
