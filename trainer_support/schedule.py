"""Periodic work (snapshots, the curve, evaluations, full checkpoints): due at the multiples of an interval of a
count, a part of the run's state that a checkpoint saves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Every:
    """Periodic work, due at the multiples of `interval` of a count (episodes, steps, seconds); never at 0."""
    interval: float
    next: Optional[float]

    @classmethod
    def counting_from(cls, interval: float, count: float = 0) -> Every:
        """Next due at the first multiple after `count`: a new interval given on resume counts from there."""
        return cls(interval, (count // interval + 1) * interval if interval else None)

    def passed(self, count: float) -> list:
        """The due points `count` has reached, oldest first; the next one moves past `count`."""
        points = []
        while self.next is not None and count >= self.next:
            points.append(self.next)
            self.next += self.interval
        return points
