from __future__ import annotations

import numpy as np

from livescope.bridges.sim import SimConfig, SimMicroscope, SimSample


def test_mda_on_unimmcore_renders_reproducible_frames_with_indices():
    scope = SimMicroscope(SimConfig(shape=(64, 80), seed=3))
    got = []
    scope.core.mda.events.frameReady.connect(lambda img, ev, meta: got.append((img.copy(), dict(ev.index), meta)))
    seq = scope.sequence(frames=3, channels=("GFP", "mCherry"), z_planes=3)
    scope.core.mda.run(seq)
    assert len(got) == 3 * 2 * 3
    assert got[0][0].shape == (64, 80) and got[0][0].dtype == np.uint16
    assert [(i["t"], i["c"], i["z"]) for _, i, _ in got[:4]] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    assert got[0][2]["pixel_size_um"] == 0.1
    sample = SimSample(SimConfig(shape=(64, 80), seed=3))
    for img, idx, _ in got:
        z_um = (idx["z"] - 1) * 0.5
        np.testing.assert_array_equal(img, sample.render(idx["t"], idx["c"], idx["z"], z_um))


def test_truth_components_noise_and_bit_depth():
    cfg = SimConfig(shape=(96, 96), seed=1, bits=10)
    s = SimSample(cfg)
    comp = s.components(5)
    assert set(comp) == {"background", "slow", "fast"}
    assert all(c.shape == (96, 96) for c in comp.values())
    # fast particles move much more between frames than slow cells
    d_fast = np.abs(s.fast_positions(6) - s.fast_positions(5)).mean()
    d_slow = np.abs(s.slow_positions(6) - s.slow_positions(5)).mean()
    assert d_fast > 5 * d_slow
    frames = np.stack([s.render(t) for t in range(3)]).astype(float)
    clean = s.clean(0) + cfg.offset
    # Poisson-Gaussian: the residual's variance follows signal/gain + read noise
    resid = frames[0] - clean
    assert abs(resid.mean()) < 0.5
    assert frames.max() <= 2**10 - 1
    expected_var = (s.clean(0) / cfg.gain).mean() + (cfg.read_noise / cfg.gain) ** 2 + 1 / 12
    assert 0.8 < resid.var() / expected_var < 1.25


def test_stage_compensates_drift():
    cfg = SimConfig(shape=(64, 64), seed=2, drift=(0.5, -0.25), n_fast=0, n_slow=0)
    s = SimSample(cfg)
    t = 20
    drifted = s.clean(t)
    # moving the stage by the drift (in um) brings the sample back where it was at t=0
    dy, dx = s.drift_px(t) * cfg.pixel_size_um
    back = s.clean(t, stage_yx_um=(dy, dx))
    ref = s.clean(0)
    assert np.abs(back - ref).mean() < 0.1 * np.abs(drifted - ref).mean()
    assert cfg.test_psf_sigma != cfg.psf_sigma  # engines' tests get a mismatched PSF


def _spot_sigma(img: np.ndarray, y: int, x: int, r: int = 10) -> float:
    """rms width (px, per axis) of a spot centred at (y, x)."""
    win = img[y - r : y + r + 1, x - r : x + r + 1].astype(float)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return float(np.sqrt((win * (yy**2 + xx**2)).sum() / win.sum() / 2))


def test_field_varying_psf_grows_towards_the_corners():
    shape = (97, 97)
    plain = SimSample(SimConfig(shape=shape, seed=4, n_slow=0, n_fast=0))
    varying = SimSample(SimConfig(shape=shape, seed=4, n_slow=0, n_fast=0, psf_sigma=1.2, psf_sigma_corner=3.0))
    sig = varying.psf_sigma_map()
    assert sig[48, 48] == 1.2 and sig[0, 0] == sig[-1, -1] == 3.0
    assert 1.2 < sig[48, 20] < sig[20, 20] < 3.0
    assert np.allclose(plain.psf_sigma_map(), 1.6)
    assert np.allclose(varying.psf_sigma_map(1.0)[48, 48], np.hypot(1.2, 2.0))
    # beads at the centre and near a corner: each shows the sigma of its place
    beads = np.zeros(shape, np.float32)
    for y, x in ((48, 48), (12, 12), (12, 84)):
        beads[y, x] = 1000.0
    img = varying.blur(beads)
    assert abs(_spot_sigma(img, 48, 48) - 1.2) < 0.05
    for y, x in ((12, 12), (12, 84)):
        assert abs(_spot_sigma(img, y, x) - sig[y, x]) < 0.1, (_spot_sigma(img, y, x), sig[y, x])
    np.testing.assert_allclose(img.sum(), beads.sum(), rtol=1e-2)  # flux is kept (to 0.4 %: sigma is per output pixel)
    # off by default: one Gaussian, the frames of before
    from scipy import ndimage

    np.testing.assert_allclose(plain.blur(beads), ndimage.gaussian_filter(beads, 1.6, mode="reflect"))
    # the truth is the scene before the optics, as for a single PSF; the rendered frame follows the blur
    assert set(varying.components(0)) == {"background", "slow", "fast"}
    np.testing.assert_allclose(varying.clean(0), varying.blur(varying.components(0)["background"]) / 2.0, rtol=1e-5)
    assert np.abs(varying.clean(0) - plain.clean(0)).max() > 1.0


_EXIT_SCRIPT = """
import time
from livescope.bridges.sim import SimConfig, SimMicroscope
scope = SimMicroscope(SimConfig(shape=(32, 32)))
core = scope.core  # held on to, as napari-micromanager's window or a script holds it
core.events.systemConfigurationLoaded.connect(lambda: time.sleep(0.5))  # a client's slow slot
scope.close()  # unloads: MMCore posts "system configuration loaded" to its notification thread
print("exiting")
"""


def test_python_exits_cleanly_after_close_while_a_notification_is_delivered():
    """MMCore 12 delivers notifications into Python from a thread of its own; one in flight while
    the interpreter finalizes aborted the process (rc 134, "terminate called without an active
    exception" / "exception not rethrown"), as seen at the end of test runs. close() joins that
    thread. Without it this script aborted in 6 of 10 runs here; six runs at once."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _EXIT_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    results = [(*p.communicate(timeout=60), p.returncode) for p in procs]
    assert [rc for _, _, rc in results] == [0] * 6, [err[-500:] for _, err, _ in results]
    assert all(out.strip() == "exiting" for out, _, _ in results)
