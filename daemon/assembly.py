"""z-stack assembly: with an engine that works on (z, y, x) volumes, the chain runs on whole
stacks. Planes sent one per message are collected per (stream, position, segment, channel, time
point); a complete stack becomes one item. Planes of a stack that never completes (a plane lost
or refused) are handed back as stale once a later time point is under way, so they are recorded
as skipped, not held forever."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..bridges.protocol import Frame
from .routing import Item

__all__ = ["StackAssembler"]


class StackAssembler:
    def __init__(self, on_stale: Callable[[Item], None]) -> None:
        self._partial: dict[tuple, dict[int, Item]] = {}
        self._on_stale = on_stale

    def add(self, item: Item) -> Item | None:
        """Take one plane; the assembled stack (as one item, z = 0) once every plane is in."""
        lay = item.segment.layout
        n_z = lay.n_z if lay.has_z else 1
        key = (*item.segment.key, item.c, item.t)
        planes = self._partial.setdefault(key, {})
        planes[item.z] = item
        for old in [k for k in self._partial if k[:4] == key[:4] and k[4] < item.t - 1]:
            for stale in self._partial.pop(old).values():  # planes of a stack that never completed
                self._on_stale(stale)
        if len(planes) < n_z:
            return None
        del self._partial[key]
        stack = np.stack([planes[z].array for z in sorted(planes)])
        first = planes[min(planes)]
        header = dict(first.frame.header, shape=list(stack.shape))
        return Item(Frame(header, stack), item.p, item.c, 0, item.t, item.segment, first.received, cost=0)
