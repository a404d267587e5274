"""Weighted, sticky choice of a backend.

Weights are percentages with 0.01 % resolution, so the unit is one of 10,000 buckets.
Backends own consecutive bucket ranges in a fixed order (the config's), which keeps a
weight change minimal between two backends: moving MMA from 90 % to 80 % hands exactly
buckets 8000..8999 to MMS and leaves every other conversation where it was.
A sticky key hashes to a bucket; without a key a uniform random bucket is drawn.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Mapping

BUCKETS = 10_000


def bucket_of(key: str) -> int:
    """A stable bucket for a sticky key (the same in every process and every run)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def random_bucket() -> int:
    """A uniformly random bucket, for requests without a sticky key."""
    return random.randrange(BUCKETS)


class RoutingTable:
    """Bucket ranges per backend, built once per weight change and then read-only."""

    __slots__ = ("bounds", "names", "weights")

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)
        self.names: tuple[str, ...] = tuple(name for name, w in weights.items())
        units = to_units(weights)
        bounds, total = [], 0
        for name in self.names:
            total += units[name]
            bounds.append(total)
        self.bounds: tuple[int, ...] = tuple(bounds)

    def backend_for(self, bucket: int) -> str:
        """The backend that owns ``bucket``."""
        return self.names[bisect_right(self.bounds, bucket)]

    def share(self, name: str) -> float:
        """The backend's share of traffic in percent, as actually bucketed."""
        i = self.names.index(name)
        low = self.bounds[i - 1] if i else 0
        return (self.bounds[i] - low) * 100 / BUCKETS


def in_sample(key: object, percent: float, salt: str) -> bool:
    """Is a request with this sticky key (None: none) among ``percent`` % of requests?

    A key always gives the same answer. Its bucket is salted (``salt``: "shadow",
    "record", ...) so that a sample does not line up with the routing split, which buckets
    the same key unsalted, nor with another sample. Without a key: at random.
    """
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    if key is not None:
        return bucket_of(f"{salt}:{key}") < percent * 100
    return random.random() * 100 < percent


def to_units(weights: Mapping[str, float]) -> dict[str, int]:
    """Weights -> buckets summing to exactly BUCKETS (largest remainder, stable order)."""
    total = sum(max(0.0, w) for w in weights.values())
    if total <= 0:
        raise ValueError("weights must not all be zero")
    exact = {name: max(0.0, w) * BUCKETS / total for name, w in weights.items()}
    units = {name: int(value) for name, value in exact.items()}
    short = BUCKETS - sum(units.values())
    by_remainder = sorted(exact, key=lambda n: exact[n] - units[n], reverse=True)
    for name in by_remainder[:short]:
        units[name] += 1
    return units
