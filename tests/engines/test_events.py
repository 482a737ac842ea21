"""Novelty events that say what they are (engines/events.py through the decompose engine).

Movies: ``lag_movie`` (static filaments, slow blobs and fast particles, noise sigma 5: busy, but
nothing sudden) with one event injected into the clean signal before the noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from livescope.engines.base import FrameInfo, StreamSpec, create_engine
from livescope.engines.events import EventGroups, describe, only, robust_z

from .movies import COMPONENTS, lag_movie, spots

T_EVENT = 70
SHAPE = (64, 64)


def _movie(inject=None, n=100, seed=3):
    _, truth = lag_movie(n, shape=SHAPE, seed=seed)
    clean = sum(truth[k] for k in COMPONENTS)
    if inject is not None:
        inject(clean)
    rng = np.random.default_rng(seed + 100)
    return (clean + rng.normal(0, 5.0, clean.shape)).astype(np.float32)


def _events(frames, **params):
    engine = create_engine("decompose", **params)
    engine.setup(StreamSpec(shape=frames.shape[1:], dtype="float32", interval_s=1.0))
    events = []
    for t, frame in enumerate(frames):
        events += engine.process(frame, FrameInfo(seq=t, timestamp=float(t)))["events"]
    return events


def test_a_busy_movie_without_events_raises_none_at_the_default_threshold():
    assert _events(_movie()) == []


def test_an_injected_burst_is_detected_placed_and_labelled():
    cy, cx = 40.0, 24.0

    def burst(clean):
        clean[T_EVENT : T_EVENT + 2] += spots(SHAPE, [(cy, cx)], 2.0, 300.0)  # 2 frames, 5x the objects

    events = _events(_movie(burst))
    assert [e["seq"] for e in events] == [T_EVENT]
    event = events[0]
    assert event["kind"] == "novelty" and event["channel"] == "local"
    assert abs(event["centroid"][0] - cy) < 3 and abs(event["centroid"][1] - cx) < 3
    assert event["likely"] == "burst", event
    assert event["component"] == "fast" and event["lag"] in (1, 2, 4, 8)
    assert 10 < event["size_px"] < 400 and event["motion_px"] == 0.0
    assert event["group"] == 1


def test_a_focus_jump_is_labelled_focus():
    def defocus(clean):
        for t in range(T_EVENT, T_EVENT + 3):
            clean[t] = ndimage.gaussian_filter(clean[t], 2.0, mode="nearest")

    events = _events(_movie(defocus))
    assert events and events[0]["seq"] == T_EVENT, events
    assert events[0]["likely"] == "focus" and events[0]["component"] == "slow", events[0]
    assert all(T_EVENT <= e["seq"] <= T_EVENT + 4 for e in events)


def test_an_object_entering_at_the_edge_is_labelled_entering():
    def entering(clean):
        for t in range(T_EVENT, len(clean)):
            clean[t] += spots(SHAPE, [(30.0, float(t - T_EVENT))], 4.0, 150.0)

    events = _events(_movie(entering))
    assert [e["seq"] for e in events] == [T_EVENT], events
    assert events[0]["likely"] == "entering" and events[0]["centroid"][1] < 8, events[0]


def test_groups_keep_their_ids_and_count():
    groups = EventGroups()

    def ev(likely, size, novelty, left=0.0, prior=0.0):
        return {
            "likely": likely,
            "size_px": size,
            "motion_px": 0.0,
            "novelty": novelty,
            "features": {"spread": 0.0, "edge_px": 30.0, "left": left, "prior": prior},
        }

    first = [groups.assign(ev("burst", 60, 2.0)), groups.assign(ev("focus", 2000, 0.8))]
    assert first == [1, 2]
    # similar events join, dissimilar ones (or another kind) start new groups; ids never change
    assert groups.assign(ev("burst", 70, 2.2)) == 1
    assert groups.assign(ev("burst", 900, 9.0, left=1.0)) == 3
    assert groups.assign(ev("division", 70, 2.2)) == 4
    assert groups.assign(ev("focus", 1800, 0.9)) == 2
    assert [(g["id"], g["likely"], g["count"]) for g in groups.summary()] == [
        (1, "burst", 2),
        (2, "focus", 2),
        (3, "burst", 1),
        (4, "division", 1),
    ]


def test_only_passes_the_asked_kinds_and_groups():
    got = []
    keep = only(got.append, likely={"division"})
    for e in ({"likely": "burst", "group": 1}, {"likely": "division", "group": 2}, {"kind": "drift"}):
        keep(e)
    assert got == [{"likely": "division", "group": 2}]
    by_group = only(got.append, groups={1})
    by_group({"likely": "burst", "group": 1})
    by_group({"likely": "burst", "group": 3})
    assert got[-1] == {"likely": "burst", "group": 1} and len(got) == 2


def test_describe_reads_a_division_and_the_robust_score():
    h = w = 128  # one cell splits into two moving apart, noise-free
    before = spots((h, w), [(64, 64)], 4.0, 100.0)
    after = spots((h, w), [(64, 58), (64, 70)], 3.2, 60.0)
    excess = np.where(np.abs(after - before) > 15, 1.0, 0.0)
    event = {"bbox": [52, 48, 76, 80], "centroid": [64.0, 64.0], "novelty": 1.0}
    describe(
        event,
        excess=excess,
        frame=after,
        lagged=[before] * 4,
        lags=(1, 2, 4, 8),
        background=np.zeros((h, w)),
        fast=after - before,
        sigma=1.0,
    )
    assert event["likely"] == "division", event
    assert event["features"]["lobes"] == 2 and event["motion_px"] < 1.0
    assert robust_z([1.0] * 10, 1.0) == 0.0
    assert robust_z([1.0, 1.1, 0.9] * 4, 2.0) == pytest.approx((2.0 - 1.0) / 0.1482, rel=0.01)
