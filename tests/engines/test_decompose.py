"""The rolling multi-lag decomposition on synthetic movies with known components."""

from __future__ import annotations

import numpy as np
import pytest

from livescope.engines.base import EngineError, FrameInfo, StreamSpec, create_engine
from tests.conftest import REAL_DATA

from .movies import COMPONENTS, corr, spots


def synthetic_movie(
    n_frames=240,
    shape=(64, 64),
    n_slow=3,
    n_fast=6,
    slow_speed=0.12,  # px per frame, straight drift
    fast_step=3.0,  # px per frame, random walk
    slow_sigma=2.5,
    fast_sigma=1.3,
    amp=60.0,
    noise=5.0,
    bleach_tau=None,  # frames
    seed=0,
):
    """Static filaments + slowly drifting blobs + fast diffusing particles + Gaussian noise.

    Returns the frames and the ground truth of each component (bleached like the frames).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    static = np.full(shape, 100.0)
    for _ in range(4):
        a, c = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8) * h
        d = (yy - c) * np.cos(a) - (xx - w / 2) * np.sin(a)
        static += 80 * np.exp(-(d**2) / 2.0)
    slow_pos = rng.uniform(8, h - 8, (n_slow, 2))
    angle = rng.uniform(0, 2 * np.pi, n_slow)
    slow_vel = slow_speed * np.stack([np.sin(angle), np.cos(angle)], 1)
    fast_pos = rng.uniform(4, h - 4, (n_fast, 2))
    truth = {k: np.zeros((n_frames, h, w)) for k in COMPONENTS}
    for t in range(n_frames):
        truth["background"][t] = static
        truth["slow"][t] = spots(shape, slow_pos + t * slow_vel, slow_sigma, amp)
        truth["fast"][t] = spots(shape, fast_pos, fast_sigma, amp)
        fast_pos = fast_pos + rng.normal(0, fast_step, fast_pos.shape)
        fast_pos = np.where(fast_pos < 2, 4 - fast_pos, fast_pos)  # reflect at the edges
        fast_pos = np.where(fast_pos > h - 3, 2 * (h - 3) - fast_pos, fast_pos)
    gain = np.ones(n_frames) if bleach_tau is None else np.exp(-np.arange(n_frames) / bleach_tau)
    for k in COMPONENTS:
        truth[k] *= gain[:, None, None]
    clean = sum(truth[k] for k in COMPONENTS)
    frames = clean + rng.normal(0, noise, clean.shape)
    return frames.astype(np.float32), truth


def run_engine(frames, timestamps=None, **params):
    engine = create_engine("decompose", **params)
    engine.setup(StreamSpec(shape=frames.shape[1:], dtype="float32", interval_s=1.0))
    out = {k: [] for k in (*COMPONENTS, "residual", "novelty", "bleach")}
    events = []
    for t, frame in enumerate(frames):
        ts = float(t) if timestamps is None else float(timestamps[t])
        res = engine.process(frame, FrameInfo(seq=t, timestamp=ts))
        for k in out:
            out[k].append(res[k])
        events += res["events"]
    return {k: np.asarray(v) for k, v in out.items()}, events, engine


def rolling_median(frames, window):
    """The live peer: per-pixel median of the last `window` frames."""
    return np.stack([np.median(frames[max(0, t - window + 1) : t + 1], 0) for t in range(len(frames))])


def test_outputs_add_up_to_the_frame():
    frames, _ = synthetic_movie(n_frames=40, shape=(32, 48))
    out, events, engine = run_engine(frames.astype(np.uint16))
    total = out["background"] + out["slow"] + out["fast"] + out["residual"]
    np.testing.assert_allclose(total, frames.astype(np.uint16), atol=1e-3)
    for k in (*COMPONENTS, "residual"):
        assert out[k].dtype == np.float32 and out[k].shape == frames.shape
    assert out["novelty"].shape == (40,) and np.all(np.isfinite(out["novelty"]))
    assert events == []
    assert engine.passes is None and "novelty" in engine.scalar_outputs


@pytest.mark.parametrize("equal", [False, True], ids=["typical", "same-size-and-brightness"])
def test_components_beat_median_background_subtraction(equal):
    kw = dict(slow_sigma=2.0, fast_sigma=2.0) if equal else {}
    frames, truth = synthetic_movie(**kw)
    out, _, engine = run_engine(frames)
    later = slice(engine.background_window, None)  # once the background window is full
    offline = np.median(frames, 0)  # offline: sees the whole movie, future included
    live = rolling_median(frames, engine.background_window)
    ours = {k: corr(out[k][later], truth[k][later]) for k in COMPONENTS}
    # Background subtraction can only offer its foreground as the slow and as the fast part.
    for k in ("slow", "fast"):
        for peer in (offline, live):
            assert ours[k] > corr((frames - peer)[later], truth[k][later]) + 0.05, (k, ours)
    assert ours["background"] > corr(live[later], truth["background"][later]), ours
    assert ours["background"] > 0.995
    # Separated by time: the slow estimate barely follows the fast truth and vice versa.
    assert corr(out["slow"][later], truth["fast"][later]) < 0.2
    assert corr(out["fast"][later], truth["slow"][later]) < 0.2
    assert min(ours["slow"], ours["fast"]) > 0.85


def test_sudden_event_is_flagged_at_its_frame_and_place():
    frames, _ = synthetic_movie(n_frames=120, seed=3)
    t_event, (cy, cx) = 90, (20, 44)
    frames[t_event:, cy - 4 : cy + 4, cx - 4 : cx + 4] += 80.0  # something appears and stays
    out, events, _ = run_engine(frames)
    assert [e["seq"] for e in events] == [t_event]
    event = events[0]
    assert event["kind"] == "novelty"
    assert abs(event["centroid"][0] - cy + 0.5) < 3 and abs(event["centroid"][1] - cx + 0.5) < 3
    y0, x0, y1, x1 = event["bbox"]
    assert y0 <= cy - 2 and y1 >= cy + 2 and x0 <= cx - 2 and x1 >= cx + 2
    assert (y1 - y0) * (x1 - x0) <= 32 * 32
    assert out["novelty"][t_event] > 5 * np.median(out["novelty"][20:t_event])


def _state_bytes(engine):
    """Everything the instance holds: arrays by their bytes, containers by their length."""
    total = 0
    for v in vars(engine).values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, (list, tuple, dict, set)) or hasattr(v, "maxlen"):
            total += 8 * len(v)
    return total


def test_memory_is_bounded_over_a_long_stream():
    rng = np.random.default_rng(1)
    engine = create_engine("decompose", background_window=32, background_samples=8)
    engine.setup(StreamSpec(shape=(16, 16), interval_s=0.5))
    sizes = []
    for t in range(600):
        frame = rng.poisson(100, (16, 16)).astype(np.uint16)
        engine.process(frame, FrameInfo(seq=t, timestamp=0.5 * t))
        if t in (100, 300, 599):
            sizes.append((_state_bytes(engine), engine.state_nbytes()))
    assert sizes[0] == sizes[1] == sizes[2], sizes
    # ring (2 * 8 + 1), history (8), background (sharp, as output and as compared) and
    # accumulator: frames of 16x16 float32
    assert sizes[0][1] == (17 + 8 + 4) * 16 * 16 * 4


def test_bleaching_does_not_read_as_slow():
    frames, truth = synthetic_movie(n_frames=200, n_slow=0, bleach_tau=80.0, seed=2)
    later = slice(60, None)
    corrected, _, _ = run_engine(frames)
    plain, _, _ = run_engine(frames, bleach_correction=False)
    rms = {k: float(np.sqrt(np.mean(o["slow"][later] ** 2))) for k, o in (("on", corrected), ("off", plain))}
    # Without correction the fading filaments show up in `slow` (the test can fail) ...
    assert rms["off"] > 3.0, rms
    # ... with it `slow` keeps near zero, and the fitted decay matches the bleach.
    assert rms["on"] < 0.25 * rms["off"], rms
    np.testing.assert_allclose(corrected["bleach"][later], np.exp(-np.arange(200)[later] / 80.0), rtol=0.05)
    # The background follows the fading filaments better, and the particles lose nothing.
    scores = {
        name: {k: corr(o[k][later], truth[k][later]) for k in ("background", "fast")}
        for name, o in (("on", corrected), ("off", plain))
    }
    assert scores["on"]["background"] > max(0.995, scores["off"]["background"]), scores
    assert scores["on"]["fast"] > scores["off"]["fast"] - 0.01, scores


def test_bleach_correction_leaves_the_camera_offset_alone():
    # Bleaching scales the light, not the camera's offset: with the offset scaled too, the
    # correction made a constant that grew with it, which read as `slow` everywhere.
    frames, truth = synthetic_movie(n_frames=160, n_slow=0, bleach_tau=60.0, seed=4)
    frames += 100.0  # the camera's offset
    engine = create_engine("decompose")
    engine.setup(StreamSpec(shape=frames.shape[1:], dtype="float32", interval_s=1.0, camera_offset=100.0))
    out = [engine.process(f, FrameInfo(seq=t, timestamp=float(t))) for t, f in enumerate(frames)]
    later = slice(60, None)
    slow = np.stack([o["slow"] for o in out])[later]
    background = np.stack([o["background"] for o in out])[later]
    assert abs(float(np.mean(slow))) < 0.5, float(np.mean(slow))
    assert abs(float(np.mean(background - 100.0 - truth["background"][later]))) < 1.0
    assert corr(background, truth["background"][later]) > 0.995


def test_background_follows_stage_drift():
    from scipy import ndimage

    frames, truth = synthetic_movie(n_frames=96, shape=(96, 96), n_slow=2, n_fast=4, seed=3)
    rng = np.random.default_rng(3)
    v = np.array([0.12, -0.06])  # px per frame
    field = np.stack([ndimage.shift(truth["background"][0], v * t, order=1, mode="nearest") for t in range(96)])
    frames = (field + truth["slow"] + truth["fast"] + rng.normal(0, 5, field.shape)).astype(np.float32)
    later = slice(32, None)
    still, _, _ = run_engine(frames, follow_drift=False)
    follows, _, engine = run_engine(frames)  # follow_drift is on by default
    assert corr(still["background"][later], field[later]) < 0.5
    assert corr(follows["background"][later], field[later]) > 0.97
    np.testing.assert_allclose(engine._drift, v * 95, atol=0.6)  # measured from the first frames
    # A scene that does not drift never starts to follow (and never pays for it).
    _, _, engine = run_engine(synthetic_movie(n_frames=96, seed=5)[0], follow_drift=True)
    assert not engine._drift_on


def test_shift_linear_matches_scipy():
    from scipy import ndimage

    from livescope.engines.decompose import shift_linear

    a = np.random.default_rng(0).normal(size=(12, 15)).astype(np.float32)
    for d in ((0.3, -1.7), (-2.0, 0.5), (0.0, 0.0)):
        ref = ndimage.shift(a, d, order=1, mode="nearest")
        np.testing.assert_allclose(shift_linear(np, a, *d), ref, atol=1e-5)
        strict = pytest.importorskip("array_api_strict")
        np.testing.assert_allclose(np.from_dlpack(shift_linear(strict, strict.asarray(a), *d)), ref, atol=1e-5)


def test_lags_follow_timestamps_when_the_interval_changes():
    # Each frame is a flat image whose value is its own timestamp; the lagged frames the engine
    # picks then tell which times it used.
    times = [float(t) for t in range(20)] + [19.0 + 0.5 * k for k in range(1, 16)]
    engine = create_engine("decompose", bleach_correction=False)
    engine.setup(StreamSpec(shape=(8, 8), interval_s=1.0))
    for seq, ts in enumerate(times):
        engine.process(np.full((8, 8), ts, np.float32), FrameInfo(seq=seq, timestamp=ts))
    now = times[-1] + 0.5  # the interval has halved: lags still reach 1, 2, 4, 8 s back
    picked = [float(f[0, 0]) for f in engine._lagged(now)]
    assert picked == [now - 1, now - 2, now - 4, now - 8]
    assert engine.describe()["time_base"] == "seconds"


def test_frames_without_timestamps_count_frames():
    engine = create_engine("decompose", bleach_correction=False)
    engine.setup(StreamSpec(shape=(8, 8)))
    for seq in range(12):
        engine.process(np.full((8, 8), seq, np.float32), FrameInfo(seq=seq))
    assert [float(f[0, 0]) for f in engine._lagged(12.0)] == [11, 10, 8, 4]
    assert engine.describe()["time_base"] == "frames"


def test_array_api_strict_matches_numpy():
    xp = pytest.importorskip("array_api_strict")
    frames, _ = synthetic_movie(n_frames=30, shape=(32, 32))
    frames[25:, 8:16, 8:16] += 100.0
    ref, ref_events, _ = run_engine(frames, background_window=16, background_samples=4)
    engine = create_engine("decompose", background_window=16, background_samples=4)
    engine.setup(StreamSpec(shape=(32, 32), dtype="float32", interval_s=1.0))
    for t, frame in enumerate(frames):
        res = engine.process(xp.asarray(frame), FrameInfo(seq=t, timestamp=float(t)))
        for k in (*COMPONENTS, "residual"):
            np.testing.assert_allclose(np.from_dlpack(res[k]), ref[k][t], atol=2e-3)
        assert res["novelty"] == pytest.approx(ref["novelty"][t], rel=1e-4, abs=1e-6)
        assert [e["seq"] for e in res["events"]] == [e["seq"] for e in ref_events if e["seq"] == t]


def test_array_api_strict_follows_drift_as_numpy():
    xp = pytest.importorskip("array_api_strict")
    from scipy import ndimage

    frames, truth = synthetic_movie(n_frames=40, shape=(48, 48), n_slow=1, n_fast=2, seed=6)
    field = np.stack([ndimage.shift(truth["background"][0], (0.3 * t, 0.0), order=1) for t in range(40)])
    frames = (frames - truth["background"] + field).astype(np.float32)
    kw = {"background_window": 16, "background_samples": 4, "follow_drift": True}
    ref, _, ref_engine = run_engine(frames, **kw)
    assert ref_engine._drift_on
    engine = create_engine("decompose", **kw)
    engine.setup(StreamSpec(shape=(48, 48), dtype="float32", interval_s=1.0))
    for t, frame in enumerate(frames):
        res = engine.process(xp.asarray(frame), FrameInfo(seq=t, timestamp=float(t)))
        for k in (*COMPONENTS, "residual"):
            np.testing.assert_allclose(np.from_dlpack(res[k]), ref[k][t], atol=5e-3)


def test_parameters_describe_and_errors():
    engine = create_engine("decompose", lags="1,3,9", event_threshold=5)
    params = engine.describe()["parameters"]
    assert params["lags"] == [1, 3, 9] and params["event_threshold"] == 5.0
    engine.set_param("event_threshold", "7.5")
    assert engine.event_threshold == 7.5
    engine.set_param("bleach_correction", "false")
    assert engine.bleach_correction is False
    with pytest.raises(KeyError, match="event_threshold"):
        engine.set_param("nonsense", 1)
    with pytest.raises(EngineError, match="rolling"):
        create_engine("decompose", method="nonsense")
    with pytest.raises(EngineError, match="positive"):
        create_engine("decompose", lags=(0, 2))


def test_real_time_lapse_runs_with_few_false_alarms():
    import tifffile

    movie = tifffile.imread(REAL_DATA / "cancer_cell_migration_crop.tif")
    out, events, _ = run_engine(movie)
    total = out["background"] + out["slow"] + out["fast"] + out["residual"]
    np.testing.assert_allclose(total, movie.astype(np.float32), rtol=1e-5, atol=0.1)
    assert np.all(np.isfinite(out["novelty"]))
    assert len(events) <= 2  # 48 frames of cells migrating: nothing sudden
