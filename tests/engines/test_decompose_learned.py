"""The learned multi-lag predictors (method="learned"): fitted on a movie with known components,
each lag's share must correlate best with its own component."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livescope.engines.base import EngineError, FrameInfo, StreamSpec, create_engine

from .movies import COMPONENTS, corr, lag_movie

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from livescope.engines import modelfile  # noqa: E402
from livescope.engines.multilag import MultiLagPredictor, fit_multilag, octave_inputs  # noqa: E402

# The shared fit takes ~15 s on an idle 2-core machine; torch's threads slow down many times over
# when other processes load the cores, so the module gets more than the suite's 300 s per test.
pytestmark = pytest.mark.timeout(900)

LAGS = (8, 4, 2, 1)  # longest first, as the model takes them
OWN = ("background", "slow", "slow", "fast")  # the component each lag's share stands for


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    frames, _ = lag_movie(300, shape=(64, 64), seed=1)
    model = fit_multilag(frames, steps=1000, seed=0)
    path = tmp_path_factory.mktemp("multilag") / "decompose.lsmodel"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def test_movie():
    return lag_movie(120, shape=(64, 64), seed=2)


FIRST = 15  # the first frame with all of the longest lag's octave (t-8 ... t-15) behind it


def lag_shares(predictor, frames):
    return np.stack([predictor.predict(octave_inputs(frames, t, LAGS)) for t in range(FIRST, len(frames))])


def test_each_lag_explains_its_own_component(fitted, test_movie):
    frames, truth = test_movie
    predictor = MultiLagPredictor(modelfile.load(fitted), "onnxruntime")
    shares = lag_shares(predictor, frames)
    matrix = np.array([[corr(shares[:, j], truth[k][FIRST:]) for j in range(len(LAGS))] for k in COMPONENTS])
    best = [COMPONENTS[i] for i in np.argmax(matrix, axis=0)]
    assert best == list(OWN), f"rows {COMPONENTS}, columns lags {LAGS}:\n{np.round(matrix, 3)}"
    # the cascade's prediction explains the movie down to about the noise (sigma 5)
    resid = frames[FIRST:] - shares.sum(axis=1)
    assert resid.std() < 8.0


def test_onnx_matches_torch(fitted, test_movie):
    frames, _ = test_movie
    model = modelfile.load(fitted)
    lagged = octave_inputs(frames, 20, LAGS)
    a = MultiLagPredictor(model, "onnxruntime").predict(lagged)
    b = MultiLagPredictor(model, "torch").predict(lagged)
    assert np.allclose(a, b, atol=1e-3 * float(np.abs(b).max()))


def run(engine, frames):
    engine.setup(StreamSpec(shape=frames.shape[1:], dtype="float32", interval_s=1.0))
    outs = []
    for t, frame in enumerate(frames):
        outs.append(engine.process(frame, FrameInfo(seq=t, timestamp=float(t))))
    return outs


def test_learned_engine_adds_up_separates_and_flags_events(fitted, test_movie):
    frames, truth = test_movie
    frames = frames.copy()
    frames[80, 20:30, 36:46] += 150.0  # a sudden event nothing in the past predicts
    engine = create_engine("decompose", method="learned", model=str(fitted))
    assert engine.describe()["model_hash"] == modelfile.load(fitted).hash
    outs = run(engine, frames)
    for t in (10, 80, 119):
        total = sum(outs[t][k] for k in (*COMPONENTS, "residual"))
        assert np.allclose(total, frames[t], atol=1e-3)
    est = {k: np.stack([o[k] for o in outs[FIRST:]]) for k in COMPONENTS}
    keep = np.arange(len(est["slow"])) != 80 - FIRST  # leave the event frame out
    truth = {k: truth[k][FIRST:][keep] for k in COMPONENTS}
    est = {k: est[k][keep] for k in COMPONENTS}
    # each component is closer to its own truth than to the other moving one's
    assert corr(est["slow"], truth["slow"]) > corr(est["slow"], truth["fast"]) + 0.1
    assert corr(est["fast"], truth["fast"]) > corr(est["fast"], truth["slow"]) + 0.1
    assert corr(est["background"], truth["background"]) > 0.9
    events = [(t, e) for t, o in enumerate(outs) for e in o["events"]]
    assert [t for t, _ in events] == [80], events
    y0, x0, y1, x1 = events[0][1]["bbox"]
    assert y0 <= 22 and y1 >= 28 and x0 <= 38 and x1 >= 44


def test_online_fit_switches_between_frames(tmp_path):
    frames, _ = lag_movie(80, shape=(48, 48), seed=3)
    out = tmp_path / "online.lsmodel"
    engine = create_engine("decompose", method="learned", fit_frames=40, fit_steps=15, fit_seconds=30, fit_out=str(out))
    engine.setup(StreamSpec(shape=(48, 48), dtype="float32", interval_s=1.0))
    states = []
    for t in range(60):
        res = engine.process(frames[t % 80], FrameInfo(seq=t, timestamp=float(t)))
        states.append(engine.describe()["fit"])
        if t == 40:  # the fit runs on its own thread: wait for it instead of racing it
            deadline = time.monotonic() + 60
            while engine._fitted is None and time.monotonic() < deadline:
                time.sleep(0.05)
    assert states[0] == "collecting" and states[39] == "fitting"
    assert states[-1].startswith("fitted "), states[-1]
    assert engine.describe()["model_hash"] == modelfile.load(out).hash
    total = sum(res[k] for k in (*COMPONENTS, "residual"))
    assert np.allclose(total, frames[59], atol=1e-3)


def test_swap_and_refusals(fitted, tmp_path):
    engine = create_engine("decompose")
    engine.setup(StreamSpec(shape=(32, 32), dtype="float32", interval_s=1.0))
    engine.set_param("model", str(fitted))  # the daemon's swap_model / set path
    assert engine.method == "learned" and engine.describe()["model_hash"]
    with pytest.raises(EngineError, match="fit --task decompose"):
        engine.set_param("model", str(modelfile.default_model_path()))  # a denoising model
    assert engine.describe()["model_hash"] == modelfile.load(fitted).hash  # the old one stays
    bad = tmp_path / "bad.lsmodel"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EngineError, match="corrupt"):
        create_engine("decompose", method="learned", model=str(bad))
    with pytest.raises(EngineError, match="fit_frames"):
        create_engine("decompose", method="learned", fit_frames=10)
