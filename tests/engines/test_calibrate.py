"""Camera noise calibration: photon-transfer gain, dark offset and read noise, sCMOS maps, EMCCD."""

from __future__ import annotations

import json

import numpy as np
import pytest

from livescope.engines.calibrate import (
    Calibrator,
    NoiseModel,
    calibrate_file,
    calibrate_stack,
    dark_calibration,
    fit_ptc,
    pair_points,
)


def _camera_stream(n=12, shape=(128, 128), gain=2.2, offset=400.0, read_e=1.5, seed=0, em=False):
    """A static scene of blobs (0..300 photons) with one bright blob moving 2 px per frame,
    rendered through a camera: ``gain`` ADU/e-, ``offset`` ADU, ``read_e`` e- rms; ``em``
    multiplies electrons with an EMCCD-like gamma gain (excess noise factor sqrt 2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    scene = np.full(shape, 3.0, np.float32)
    for _ in range(25):
        cy, cx, s = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 8)
        scene += rng.uniform(30, 300) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    frames = []
    for t in range(n):
        img = scene + 200 * np.exp(-((yy - 30 - 2 * t) ** 2 + (xx - 60) ** 2) / (2 * 4.0**2))
        e = rng.poisson(img).astype(np.float64)
        if em:  # stochastic multiplication: each electron's gain ~ Exponential(1): F^2 = 2
            e = rng.gamma(np.maximum(e, 1e-9), 1.0) * (e > 0)
        e = e + rng.normal(0, read_e, shape)
        frames.append(np.clip(np.rint(gain * e + offset), 0, 65535).astype(np.uint16))
    return np.stack(frames)


def _darks(n=20, shape=(128, 128), gain=2.2, offset=400.0, read_e=1.5, seed=1):
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.normal(offset, gain * read_e, (n, *shape))), 0, 65535).astype(np.uint16)


def test_gain_from_a_stream_within_5_percent():
    frames = _camera_stream()
    m = calibrate_stack(frames)
    assert m.gain == pytest.approx(2.2, rel=0.05)
    # the intercept is the combination read_var - slope * offset
    expected = (2.2 * 1.5) ** 2 + 1 / 12 - 2.2 * 400
    assert m.intercept == pytest.approx(expected, rel=0.05)
    assert m.offset is None and m.read_var is None  # not separable without darks


def test_gain_from_the_sim_microscope_within_5_percent():
    sim = pytest.importorskip("livescope.bridges.sim")
    cfg = sim.SimConfig(shape=(128, 128), seed=2)  # gain 2 e-/ADU = 0.5 ADU/e-, read noise 1.6 e-
    s = sim.SimSample(cfg)
    frames = np.stack([s.render(t) for t in range(12)])
    m = calibrate_stack(frames, saturation=2**cfg.bits - 1)
    assert m.gain == pytest.approx(1 / cfg.gain, rel=0.05)


def test_offset_and_read_noise_from_darks_within_5_percent():
    frames, darks = _camera_stream(), _darks()
    m = calibrate_stack(frames, darks)
    d = m.as_dict()
    assert d["offset_adu"] == pytest.approx(400.0, rel=0.05)
    assert d["read_noise_adu"] == pytest.approx(2.2 * 1.5, rel=0.05)
    assert d["read_noise_e"] == pytest.approx(1.5, rel=0.05)
    assert m.gain == pytest.approx(2.2, rel=0.05)


def test_read_noise_below_one_adu_corrects_quantisation():
    # 0.8 ADU rms read noise: rounding adds 1/12 ADU^2 (+6 %), which Sheppard's correction removes
    darks = _darks(gain=0.5, read_e=1.6, offset=100.0)
    cal = dark_calibration(darks)
    assert np.sqrt(cal["read_var"]) > 0.8 * 1.05
    m = fit_ptc(
        *pair_points(*_camera_stream(2, gain=0.5, offset=100.0, read_e=1.6)),
        offset=cal["offset"],
        read_var=cal["read_var"],
    )
    assert m.as_dict()["read_noise_adu"] == pytest.approx(0.8, rel=0.05)


def test_scmos_maps_find_per_pixel_offsets_and_noisy_pixels():
    rng = np.random.default_rng(3)
    shape = (64, 64)
    offsets = rng.normal(100, 3, shape)
    sigma = np.full(shape, 1.2)
    hot = rng.random(shape) < 0.01
    sigma[hot] = 6.0  # random-telegraph-noise pixels
    darks = np.rint(rng.normal(offsets, sigma, (200, *shape)))
    cal = Calibrator()
    cal.add_dark(darks[:100])
    for d in darks[100:]:
        cal.add_dark(d)  # incremental, one frame at a time
    dk = cal.dark()
    assert dk["frames"] == 200
    assert np.corrcoef(dk["offset_map"].ravel(), offsets.ravel())[0, 1] > 0.98
    flagged = dk["var_map"] > 10
    assert flagged[hot].mean() > 0.95 and flagged[~hot].mean() < 0.01
    # the map-based noise model gives each pixel its own variance
    m = NoiseModel(
        gain=1.0, intercept=0.0, offset=100.0, read_var=1.44, offset_map=dk["offset_map"], var_map=dk["var_map"]
    )
    v = m.variance(np.asarray(dk["offset_map"]))
    assert np.median(v[hot]) > 20 and np.median(v[~hot]) < 2


def test_emccd_excess_noise_doubles_the_apparent_gain():
    frames = _camera_stream(em=True, gain=0.8, read_e=0.5)
    naive = calibrate_stack(frames)
    assert naive.gain == pytest.approx(1.6, rel=0.07)  # the slope shows gain * F^2
    m = calibrate_stack(frames, excess_noise=np.sqrt(2))
    assert m.gain == pytest.approx(0.8, rel=0.05)
    assert m.slope == pytest.approx(naive.slope)


def test_calibrator_updates_as_frames_arrive_and_bounds_its_memory():
    frames = _camera_stream(n=10)
    cal = Calibrator(max_points=1000)
    cal.add_frame(frames[0])
    first = cal.model()
    assert "single frame" in first.source
    assert first.gain == pytest.approx(2.2, rel=0.25)  # one frame: rougher
    for f in frames[1:]:
        cal.add_frame(f)
    m = cal.model()
    assert cal.pairs <= 1000 // 225 + 1 and m.points <= 1000 + 225
    assert m.gain == pytest.approx(2.2, rel=0.05)


def test_fit_refuses_a_flat_scene():
    rng = np.random.default_rng(0)
    a, b = (rng.poisson(50, (64, 64)) for _ in range(2))
    with pytest.raises(ValueError, match="range of signal"):
        fit_ptc(*pair_points(a, b))
    with pytest.raises(ValueError, match="no frame"):
        Calibrator().model()


def test_stabilise_gives_unit_variance_noise():
    m = NoiseModel.from_camera(2.2, 400.0, 3.3)
    rng = np.random.default_rng(0)
    for photons in (5.0, 20.0, 500.0):  # the Anscombe transform is known to drift below ~3 photons
        x = 2.2 * rng.poisson(photons, 200_000) + rng.normal(400, 3.3, 200_000)
        assert np.var(m.stabilise(x)) == pytest.approx(1.0, abs=0.06)
        # and the model's variance matches the empirical one
        assert float(m.variance(np.float64(x.mean()))) == pytest.approx(np.var(x), rel=0.03)


def test_variance_runs_on_array_api_strict():
    xp = pytest.importorskip("array_api_strict")
    m = NoiseModel.from_camera(2.0, 100.0, 1.0)
    v = m.variance(xp.asarray([100.0, 150.0, 50.0]))
    assert np.allclose(np.asarray(v), [1 + 1 / 12, 101 + 1 / 12, 1 + 1 / 12])
    m2 = NoiseModel(gain=2.0, intercept=-199.0)
    assert np.allclose(np.asarray(m2.variance(xp.asarray([150.0]))), [101.0])


def test_calibrate_file_with_dark(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "movie.tif", _camera_stream(n=8))
    tifffile.imwrite(tmp_path / "dark.tif", _darks(n=10))
    d = calibrate_file(tmp_path / "movie.tif", dark=tmp_path / "dark.tif")
    json.dumps(d)  # plain numbers, printable by the CLI
    assert d["frames"] == 8 and d["gain_adu_per_e"] == pytest.approx(2.2, rel=0.05)
    assert d["offset_adu"] == pytest.approx(400, rel=0.01)
    assert d["var_map"]["shape"] == [128, 128]
    one = calibrate_file(tmp_path / "movie.tif")
    assert one["offset_adu"] is None and one["gain_adu_per_e"] == pytest.approx(2.2, rel=0.05)
    back = NoiseModel.from_dict(d)
    assert back.gain == pytest.approx(d["gain_adu_per_e"]) and back.offset == pytest.approx(d["offset_adu"])
    (tmp_path / "cal.json").write_text(json.dumps(d))
    assert NoiseModel.from_dict(tmp_path / "cal.json").intercept == pytest.approx(d["intercept_adu2"])
