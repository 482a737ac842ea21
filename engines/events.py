"""Novelty events that say what they are: descriptors, a likely kind, and live grouping.

The decomposition (``engines/decompose.py``) raises an event when a frame's novelty stands out
against the recent past (:func:`robust_z`). This module describes each event from the frame, its
lagged frames and the components at that moment (:func:`describe`):

- ``lag``: the lag whose prediction failed most over the event's region;
- ``component``: ``"fast"`` when the change is new signal (it is in the fast component),
  ``"slow"`` when it reshapes what the background and slow components already held (a focus
  change, the field moving);
- ``size_px``: novel pixels in the region; ``motion_px``: how far the signal that appeared lies
  from the signal that left (lag 1), 0 when nothing left;
- ``likely``: a kind from simple rules on those features: ``focus`` or ``drift`` (the change
  covers much of the field, or the whole-field channel raised the event; drift when the field
  shifted), ``entering`` (new signal at the edge
  of the field), ``division`` (new signal on both sides of an object that was there), ``burst``
  (new signal where nothing was), else ``unknown``.

:class:`EventGroups` clusters the events online by their feature vectors (a leader clustering:
an event joins the nearest group within a radius, or starts a new one); group ids never change,
so a user can ask to be told (or let the feedback policy act) only for one group or one kind:
:func:`only` wraps a callback accordingly.

Pure numpy on host copies, and only on frames that raise an event: no cost on quiet frames.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["KINDS", "EventGroups", "describe", "event_score", "field_fraction", "only", "robust_z"]

KINDS = ("burst", "entering", "division", "focus", "drift", "unknown")

# Rules for ``likely``: set by hand from what each kind changes, checked on the tuning part of
# bench/bench_events.py's movies (never on the held-out part).
_SPREAD_FIELD = 0.25  # fraction of the frame's blocks that are novel: a whole-field change
_DRIFT_PX = 0.5  # a whole-field change whose field moved by this much is drift, not focus
_EDGE_PX = 8.0  # novel signal whose centroid is this close to the border: entering
_LEFT_FRACTION = 0.35  # signal that left / signal that appeared above this: something moved
_PRIOR_FRACTION = 0.5  # an object there before (relative to what appeared): division, not burst


def robust_z(past: Sequence[float], value: float) -> float:
    """How far ``value`` stands out against ``past``: (value - median) / (1.4826 MAD), the spread
    floored at 5 % of the median and at 0.05 (a quiet movie has a MAD near zero, and then any
    flicker would stand out)."""
    med = statistics.median(past)
    mad = statistics.median(abs(v - med) for v in past) * 1.4826
    return (value - med) / max(mad, 0.05 * med, 0.05)


# The whole-field channel: a block counts as changed when its mean novelty exceeds this (noise
# sigmas above 3 per pixel). Chosen on the tuning part (0.005-0.2 tried; 0.01 best).
FIELD_LEVEL = 0.01


def field_fraction(xp: Any, excess: Any, block: int) -> float:
    """Fraction of the frame's ``block``-sized blocks holding novel signal: the whole-field
    channel of the event score. A focus change or a jump of the field touches most blocks a
    little, and a frame's most novel block (the local channel) may not notice it at all."""
    if excess is None:
        return 0.0
    h, w = excess.shape
    b = max(1, min(block, h, w))
    hb, wb = h // b, w // b
    blocks = xp.reshape(excess[: hb * b, : wb * b], (hb, b, wb, b))
    means = xp.sum(blocks, axis=(1, 3)) * (1.0 / (b * b))
    return float(xp.mean(xp.astype(means > FIELD_LEVEL, xp.float32)))


def event_score(
    past_local: Sequence[float], local: float, past_field: Sequence[float], field: float, min_local: float
) -> tuple[float, str]:
    """A frame's event score and the channel it came from: the larger of the local channel's
    robust z-score (the most novel block; only when it reaches ``min_local``) and the
    whole-field channel's (:func:`field_fraction`), each against its own past."""
    z_local = robust_z(past_local, local) if local >= min_local else -math.inf
    z_field = robust_z(past_field, field)
    return (z_local, "local") if z_local >= z_field else (z_field, "field")


def _block_means(a: np.ndarray, b: int) -> np.ndarray:
    hb, wb = a.shape[0] // b, a.shape[1] // b
    return a[: hb * b, : wb * b].reshape(hb, b, wb, b).mean(axis=(1, 3))


def _field_shift(a: np.ndarray, b: np.ndarray) -> float:
    """How far (px) the field of ``a`` moved from ``b``: the peak of their phase correlation,
    refined to sub-pixel by a parabola per axis."""
    fa = np.fft.rfft2(a - a.mean())
    fb = np.fft.rfft2(b - b.mean())
    cross = fa * np.conj(fb)
    corr = np.fft.irfft2(cross / np.maximum(np.abs(cross), 1e-12), s=a.shape)
    py, px = np.unravel_index(int(np.argmax(corr)), corr.shape)
    shift = []
    for axis, p in ((0, py), (1, px)):
        n = corr.shape[axis]
        idx = [py, px]
        idx[axis] = (p - 1) % n
        lo = corr[tuple(idx)]
        idx[axis] = (p + 1) % n
        hi = corr[tuple(idx)]
        mid = corr[py, px]
        den = lo - 2 * mid + hi
        frac = 0.5 * (lo - hi) / den if den < 0 else 0.0
        s = p + frac
        shift.append(s - n if s > n / 2 else s)
    return float(math.hypot(*shift))


def _lobes(mask: np.ndarray) -> int:
    """Connected (8-neighbour) parts of a small boolean mask larger than 3 px."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes > 3).sum())


def describe(
    event: dict[str, Any],
    *,
    excess: np.ndarray,
    frame: np.ndarray,
    lagged: Sequence[np.ndarray],
    lags: Sequence[int],
    background: np.ndarray,
    fast: np.ndarray,
    sigma: float,
    block: int = 16,
) -> dict[str, Any]:
    """Add ``likely``, ``component``, ``lag``, ``size_px``, ``motion_px`` and ``features`` to a
    novelty event (in place, and returned). Host numpy arrays, all frame-shaped: ``excess`` the
    per-pixel novelty (noise sigmas above 3), ``frame`` the compared frame, ``lagged`` its lagged
    frames (shortest lag first), ``background`` and ``fast`` the components in the same units."""
    h, w = frame.shape
    y0, x0, y1, x1 = event["bbox"]
    m = 4  # look a little around the region: where the signal came from
    ry0, rx0, ry1, rx1 = max(0, y0 - m), max(0, x0 - m), min(h, y1 + m), min(w, x1 + m)
    win = (slice(ry0, ry1), slice(rx0, rx1))
    novel = excess[win] > 0
    size = int(novel.sum())
    s = max(float(sigma), 1e-12)

    # Which lag failed most: its mean error over the novel pixels, in noise sigmas.
    cur = frame[win]
    errs = [float(np.abs(cur - lg[win])[novel].mean()) / s if size else 0.0 for lg in lagged]
    lag = int(lags[int(np.argmax(errs))]) if errs else 0

    # What appeared and what left since lag 1, beyond 3 sigma of a difference.
    d = cur - lagged[0][win] if lagged else np.zeros_like(cur)
    t = 3.0 * math.sqrt(2.0) * s
    pos = np.where(d > t, d, 0.0)
    neg = np.where(d < -t, -d, 0.0)
    appeared, left = float(pos.sum()), float(neg.sum())
    motion = 0.0
    if appeared > 0 and left > _LEFT_FRACTION * appeared:
        yy, xx = np.mgrid[ry0:ry1, rx0:rx1]
        cp = np.array([(yy * pos).sum(), (xx * pos).sum()]) / appeared
        cn = np.array([(yy * neg).sum(), (xx * neg).sum()]) / left
        motion = float(np.hypot(*(cp - cn)))
    # Was something there before (the oldest lag, above the background)?
    oldest = lagged[-1][win] if lagged else cur
    prior = float(np.clip(oldest - background[win], 0.0, None)[pos > 0].sum()) if appeared else 0.0
    fast_share = float(np.abs(fast[win])[novel].sum()) / max(float(np.abs(d)[novel].sum()), 1e-12) if size else 0.0
    component = "fast" if fast_share >= 0.5 else "slow"

    b = max(1, min(block, h, w))
    means = _block_means(excess, b)
    best = float(means.max()) if means.size else 0.0
    spread = float((means > 0.25 * best).mean()) if best > 0 else 0.0
    cy, cx = event["centroid"]
    edge = float(min(cy, cx, h - 1 - cy, w - 1 - cx))
    lobes = _lobes(pos > 0)

    if spread >= _SPREAD_FIELD or event.get("channel") == "field":  # raised by the whole-field channel
        shift = _field_shift(frame, lagged[0]) if lagged else 0.0
        likely = "drift" if shift >= _DRIFT_PX else "focus"
    elif edge <= _EDGE_PX and left <= _LEFT_FRACTION * appeared:
        likely = "entering"
    elif appeared > 0 and prior >= _PRIOR_FRACTION * appeared and (lobes >= 2 or left > _LEFT_FRACTION * appeared):
        likely = "division"
    elif appeared > 0 and left <= _LEFT_FRACTION * appeared:
        likely = "burst"
    else:
        likely = "unknown"
    event.update(
        likely=likely,
        component=component,
        lag=lag,
        size_px=size,
        motion_px=round(motion, 2),
        features={
            "spread": round(spread, 3),
            "edge_px": round(edge, 1),
            "left": round(left / appeared, 3) if appeared else 0.0,
            "prior": round(prior / appeared, 3) if appeared else 0.0,
            "lobes": lobes,
            "fast_share": round(fast_share, 3),
        },
    )
    return event


def _vector(event: dict[str, Any]) -> np.ndarray:
    """The grouping features, scaled so that 1 is a large difference for each."""
    f = event.get("features", {})
    return np.array(
        [
            math.log1p(event.get("size_px", 0)) / 2.0,
            min(event.get("motion_px", 0.0), 20.0) / 5.0,
            f.get("spread", 0.0) * 4.0,
            min(f.get("left", 0.0), 2.0),
            min(f.get("prior", 0.0), 2.0),
            1.0 if f.get("edge_px", 99.0) <= _EDGE_PX else 0.0,
            math.log1p(max(event.get("novelty", 0.0), 0.0)),
        ]
    )


class EventGroups:
    """Online grouping of events by their features: stable ids, counts, the kinds seen.

    An event joins the nearest group whose centre is within ``radius`` (and of the same
    ``likely`` kind, so that a group never mixes kinds), moving the centre towards it; otherwise
    it starts a new group (at most ``max_groups``; past that it joins the nearest of its kind).
    """

    def __init__(self, radius: float = 1.0, max_groups: int = 32) -> None:
        self.radius = radius
        self.max_groups = max_groups
        self.groups: list[dict[str, Any]] = []

    def assign(self, event: dict[str, Any]) -> int:
        """Give ``event`` its ``group`` id (in place) and return it."""
        v = _vector(event)
        kind = event.get("likely", "unknown")
        same = [g for g in self.groups if g["likely"] == kind]
        near = min(same, key=lambda g: float(np.linalg.norm(g["_centre"] - v)), default=None)
        dist = float(np.linalg.norm(near["_centre"] - v)) if near is not None else math.inf
        if near is None or (dist > self.radius and len(self.groups) < self.max_groups):
            near = {"id": len(self.groups) + 1, "likely": kind, "count": 0, "_centre": v.copy()}
            self.groups.append(near)
        near["count"] += 1
        near["_centre"] += (v - near["_centre"]) / near["count"]
        event["group"] = near["id"]
        return int(near["id"])

    def summary(self) -> list[dict[str, Any]]:
        """The groups so far: id, likely kind, count."""
        return [{"id": g["id"], "likely": g["likely"], "count": g["count"]} for g in self.groups]


def only(
    callback: Callable[[dict[str, Any]], Any],
    *,
    likely: Iterable[str] | None = None,
    groups: Iterable[int] | None = None,
) -> Callable[[dict[str, Any]], None]:
    """``callback`` called only for events of these ``likely`` kinds and/or ``group`` ids, e.g.
    ``EventFollower(control, only(policy.on_event, likely={"division"}))``."""
    kinds = set(likely) if likely is not None else None
    ids = set(groups) if groups is not None else None

    def filtered(event: dict[str, Any]) -> None:
        if kinds is not None and event.get("likely") not in kinds:
            return
        if ids is not None and event.get("group") not in ids:
            return
        callback(event)

    return filtered
