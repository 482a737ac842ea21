"""Registration engine: known shifts, stabilised streams, outliers, stage feedback sign."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.fft as sfft

from livescope.engines.base import EngineError, FrameInfo, StreamSpec, create_engine
from livescope.engines.register import (
    Register,
    apply_shift,
    drift_to_stage_um,
    estimate_shift,
)
from tests.conftest import REAL_DATA, W2S_PAIRS

CELLS = REAL_DATA / "cancer_cell_migration_crop.tif"
BEADS = REAL_DATA / "Bead_Image1_crop.tif"
W2S = W2S_PAIRS / "target_avg400_035_1.tif"  # optional (shared data): tests marked w2s


def _read(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path).astype(np.float64)


class Scene:
    """A real image seen through a window that the sample drifts under.

    ``view(shift)`` is the centre crop of the (reflect-padded) image after a Fourier shift of
    its content by ``shift`` pixels: sub-pixel shifts are exact, and the crop edges are real
    image edges, not a circular wrap.
    """

    def __init__(self, image: np.ndarray, size: int | tuple[int, ...], pad: int = 32) -> None:
        size = (size,) * image.ndim if isinstance(size, int) else tuple(size)
        self.size = size
        pads = [min(pad, n // 2) for n in image.shape]
        big = np.pad(image, [(p, p) for p in pads], mode="reflect")
        self.spectrum = sfft.fftn(big)
        self.freqs = [sfft.fftfreq(n) for n in big.shape]
        self.crop = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(big.shape, size, strict=True))

    def view(self, shift) -> np.ndarray:
        f = self.spectrum
        for axis, (k, s) in enumerate(zip(self.freqs, shift, strict=True)):
            shape = [1] * f.ndim
            shape[axis] = k.size
            f = f * np.exp(-2j * np.pi * k * s).reshape(shape)
        return np.clip(sfft.ifftn(f).real[self.crop], 0.0, None)


@pytest.fixture(scope="module", params=["cells", pytest.param("w2s", marks=pytest.mark.w2s)])
def images(request) -> tuple[np.ndarray, np.ndarray]:
    """The real image the sample drifts under, and an unrelated one (a moving cell's texture).

    cells (in the repository): nuclei frames of the CC BY migration movie, t = 0 and t = 24
    (correlation 0.1: the cells have moved), scaled to the W2S field's range. w2s (optional shared
    data): a denser 320 px widefield field, seen through a 256 px window.
    """
    if request.param == "w2s":
        w2s = _read(W2S)
        return w2s[128:448, 128:448], w2s[::-1, ::-1][:320, :320]
    movie = _read(CELLS)
    low, high = np.percentile(movie, [0.0, 99.9])
    scaled = np.clip((movie - low) / (high - low), 0, None) * 213.0  # the W2S field's 99th percentile
    return scaled[0], scaled[24][::-1, ::-1]


@pytest.fixture(scope="module")
def scene(images) -> Scene:
    image = images[0]
    return Scene(image, 256 if min(image.shape) >= 320 else 128)


def _n_particles(size: int) -> int:
    return max(3, round(12 * (size / 256) ** 2))  # 12 in a 256 px window, at the same density elsewhere


def _particles(rng, n: int, size: int, amplitude: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size))
    for _ in range(n):
        cy, cx = rng.uniform(8, size - 8, 2)
        out += amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2))
    return out


def _photons(rng, img: np.ndarray, scale: float) -> np.ndarray:
    return rng.poisson(img * scale).astype(np.uint16)


# -- pure functions --------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(0.0, 0.0), (3.0, -5.0), (0.3, -0.7), (-2.45, 1.15), (7.6, 4.35)])
def test_estimate_shift_known_shifts_with_noise_and_moving_particles(scene, shift):
    rng = np.random.default_rng(abs(hash(shift)) % 2**32)
    size = scene.size[0]
    # Particles at unrelated places in the two frames: they move, the sample only drifts.
    ref = _photons(rng, scene.view((0, 0)) + _particles(rng, _n_particles(size), size, 300.0), 5.0)
    frame = _photons(rng, scene.view(shift) + _particles(rng, _n_particles(size), size, 300.0), 5.0)
    got = estimate_shift(ref, frame)
    assert np.abs(np.array(got) - shift).max() < 0.1, (got, shift)


def test_apply_shift_is_a_fourier_shift_and_registers(scene):
    img = scene.view((0, 0)).astype(np.float32)
    inner = (slice(12, -12), slice(12, -12))
    # Integer shifts are exact moves of the content.
    moved = apply_shift(img, (3, -4), fill="wrap")
    np.testing.assert_allclose(moved, np.roll(img, (3, -4), axis=(0, 1)), atol=1e-2)
    # Sub-pixel: matches the scene's own shifted view away from the edges.
    s = (1.3, -2.7)
    moved = apply_shift(img, s)
    truth = scene.view(s)
    err = np.abs(moved[inner] - truth[inner]).max() / truth.max()
    assert err < 0.02, err
    # Undoing a measured drift gives back the reference.
    back = apply_shift(truth, [-v for v in estimate_shift(img, truth)])
    err = np.abs(back[inner] - img[inner]).max() / img.max()
    assert err < 0.02, err
    assert moved.dtype == np.float32
    # The wrapped-in strip is filled, not left as content from the opposite edge.
    zero = apply_shift(img, (0, 5.5), fill="zero")
    assert np.all(zero[:, :6] == 0) and np.all(zero[:, 6:] != 0)
    nearest = apply_shift(img, (0, -5.5), fill="nearest")
    np.testing.assert_array_equal(nearest[:, -6:], np.repeat(nearest[:, -7:-6], 6, axis=1))


def test_estimate_shift_3d_bead_stack():
    beads = _read(BEADS)  # (41, 150, 150) z, y, x
    stack = Scene(beads, beads.shape, pad=16)
    for shift in [(1.3, -2.6, 0.45), (-0.4, 3.0, -1.75)]:
        got = estimate_shift(stack.view((0, 0, 0)), stack.view(shift))
        assert np.abs(np.array(got) - shift).max() < 0.1, (got, shift)


def _nuclei_stack(seed: int, shape=(24, 64, 64), pad: int = 12) -> np.ndarray:
    """Textured nuclei filling a stack, cut by its top and bottom planes; z planes 3x pixels."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    big = [n + 2 * pad for n in shape]
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in big], indexing="ij")
    vol = np.zeros(big)
    for _ in range(25):
        c = [rng.uniform(0, n) for n in big]
        r = [rng.uniform(3, 5), rng.uniform(6, 10), rng.uniform(6, 10)]
        d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        vol += rng.uniform(0.5, 1.5) / (1 + np.exp(np.minimum((d - 1) * 8, 50)))
    tex = ndi.gaussian_filter(rng.normal(size=big), (0.7, 2, 2))
    vol = np.clip(vol * (1 + 0.75 * tex / tex.std()), 0, None)
    return ndi.gaussian_filter(vol, (1.2, 1.5, 1.5)) + 0.1


def test_estimate_shift_3d_nuclei_no_taper_bias():
    # Content slides under the static taper of a short z axis: a single phase correlation
    # underestimates z by up to a third here (0.46 of 1.0 plane with the plane defaults); the
    # stack defaults (partial whitening, one pass on the registered stack) remove it.
    stack = Scene(_nuclei_stack(3), (24, 64, 64), pad=0)
    rng = np.random.default_rng(4)
    ref = _photons(rng, stack.view((0, 0, 0)), 500.0)
    spacing = (0.3, 0.1, 0.1)
    errs, old = [], []
    for shift in [(1.0, 0.5, -0.7), (-1.6, -1.2, 0.4)]:
        frame = _photons(rng, stack.view(shift), 500.0)
        errs.append(np.abs(np.array(estimate_shift(ref, frame, spacing=spacing)) - shift).max())
        plain = estimate_shift(ref, frame, spacing=spacing, whiten=1.0, refine_passes=0)
        old.append(np.abs(np.array(plain) - shift).max())
    assert max(errs) < 0.06, errs
    assert max(old) > 2 * max(errs), (old, errs)  # the case does exercise the bias


def test_portable_core_on_array_api_strict(scene):
    xps = pytest.importorskip("array_api_strict")
    ref = scene.view((0, 0))[:128, :128].astype(np.float32)
    frame = scene.view((1.4, -0.6))[:128, :128].astype(np.float32)
    want = estimate_shift(ref, frame)
    got = estimate_shift(xps.asarray(ref), xps.asarray(frame))
    np.testing.assert_allclose(got, want, atol=1e-3)
    moved = apply_shift(xps.asarray(ref), (0.5, -1.25))
    np.testing.assert_allclose(np.asarray(moved), apply_shift(ref, (0.5, -1.25)), atol=1e-3)
    # The engine itself runs on the strict namespace too.
    eng = Register()
    eng.setup(StreamSpec(shape=(128, 128)))
    eng.process(xps.asarray(ref), FrameInfo(seq=0))
    out = eng.process(xps.asarray(frame), FrameInfo(seq=1))
    np.testing.assert_allclose([out["shift_y"], out["shift_x"]], want, atol=1e-3)


def test_cupy_matches_numpy(scene):
    cp = pytest.importorskip("cupy", reason="cupy is not installed (no NVIDIA GPU here)")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy present, no usable GPU
        pytest.skip(f"no usable GPU: {exc}")
    ref = scene.view((0, 0)).astype(np.float32)
    frame = scene.view((1.4, -0.6)).astype(np.float32)
    got = estimate_shift(cp.asarray(ref), cp.asarray(frame))
    np.testing.assert_allclose(got, estimate_shift(ref, frame), atol=1e-3)


# -- the engine ------------------------------------------------------------------------------


def _run(eng: Register, frames) -> list[dict]:
    return [eng.process(f, FrameInfo(seq=i)) for i, f in enumerate(frames)]


@pytest.mark.parametrize("reference", ["first", "rolling"])
def test_engine_stabilises_a_drifting_stream(scene, reference):
    rng = np.random.default_rng(7)
    n = 24
    # Thermal drift: a slow, smooth walk of several pixels.
    drift = np.cumsum(rng.normal(0.0, 0.15, (n, 2)) + [0.12, -0.08], axis=0)
    drift -= drift[0]
    frames = [_photons(rng, scene.view(d), 5.0) for d in drift]
    eng = create_engine("register", reference=reference)
    eng.setup(StreamSpec(shape=scene.size))
    outs = _run(eng, frames)
    measured = np.array([[o["shift_y"], o["shift_x"]] for o in outs])
    assert np.abs(measured - drift).max() < 0.1
    assert np.abs(drift[-1]).max() > 2.0  # the test would notice an engine that does nothing
    # Stabilised: the registered frames no longer move against the first one.
    first = outs[0]["registered"]
    for o in outs[-3:]:
        residual = estimate_shift(first, o["registered"])
        assert np.abs(residual).max() < 0.1, residual
        assert o["registered"].dtype == np.float32
    assert not any(o["events"] for o in outs)  # feedback is off by default


def test_bright_moving_cell_does_not_drag_the_estimate(scene, images):
    rng = np.random.default_rng(3)
    size = scene.size[0]
    yy, xx = np.mgrid[:size, :size]
    texture = Scene(images[1], size).view((0, 0))
    n = 14
    drift = np.stack([0.1 * np.arange(n), -0.07 * np.arange(n)], axis=1)
    frames = []
    for t in range(n):
        # a cell 30 times brighter, moving 3.6 px per frame (from (80, 90) in a 256 px window)
        cy, cx = round(80 * size / 256) + 3 * t, round(90 * size / 256) + 2 * t
        cell = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 10.0**2))
        cell = 30 * cell * np.roll(texture, (cy - size // 2, cx - size // 2), axis=(0, 1))
        frames.append(_photons(rng, 0.5 * scene.view(drift[t]) + cell, 5.0))
    # Plain phase correlation of the raw frames follows the cell: the case is a hard one.
    naive = estimate_shift(frames[0], frames[-1], log_offset=None)
    assert np.abs(np.array(naive) - drift[-1]).max() > 5.0
    eng = Register()
    eng.setup(StreamSpec(shape=(size, size)))
    measured = np.array([[o["shift_y"], o["shift_x"]] for o in _run(eng, frames)])
    assert np.abs(measured - drift).max() < 0.15


def test_glitch_frame_is_rejected_and_a_real_jump_is_followed(scene):
    rng = np.random.default_rng(11)
    eng = Register(relock_frames=4)
    eng.setup(StreamSpec(shape=scene.size))
    drift = [(0.1 * t, 0.05 * t) for t in range(8)]
    frames = [_photons(rng, scene.view(d), 5.0) for d in drift]
    frames[5] = _photons(rng, scene.view((31.0, -24.0)), 5.0)  # one frame from elsewhere
    outs = _run(eng, frames)
    got = np.array([[o["shift_y"], o["shift_x"]] for o in outs])
    np.testing.assert_array_equal(got[5], got[4])  # held: the previous drift
    assert np.abs(got[[0, 1, 2, 3, 4, 6, 7]] - np.array(drift)[[0, 1, 2, 3, 4, 6, 7]]).max() < 0.1
    # A jump that stays (the stage was bumped) is followed after relock_frames frames.
    jumped = [_photons(rng, scene.view((12.0, -9.0)), 5.0) for _ in range(5)]
    outs = [eng.process(f, FrameInfo(seq=8 + i)) for i, f in enumerate(jumped)]
    got = np.array([[o["shift_y"], o["shift_x"]] for o in outs])
    assert np.abs(got[:3] - got[0]).max() == 0.0  # held while it might be a glitch
    assert np.abs(got[3:] - [12.0, -9.0]).max() < 0.1


def test_volume_engine_reports_z_shift():
    beads = _read(BEADS)
    stack = Scene(beads, beads.shape, pad=16)
    eng = create_engine("register", volume=True)
    assert eng.needs_volume and eng.outputs == ("registered", "shift_z", "shift_y", "shift_x")
    eng.setup(StreamSpec(shape=beads.shape, pixel_size_um=0.022, z_step_um=0.125))
    shifts = [(0, 0, 0), (0.4, -0.3, 0.2), (0.9, -0.8, 0.5)]
    outs = _run(eng, [stack.view(s) for s in shifts])
    got = np.array([[o["shift_z"], o["shift_y"], o["shift_x"]] for o in outs])
    assert np.abs(got - shifts).max() < 0.1
    assert outs[-1]["registered"].shape == beads.shape
    with pytest.raises(EngineError, match="volume"):
        Register().process(np.zeros((4, 32, 32), np.uint16), FrameInfo(seq=0))


def test_parameters_describe_and_errors():
    eng = Register()
    eng.setup(StreamSpec(shape=(64, 64)))
    assert eng.describe()["parameters"]["reference"] == "first"
    eng.set_param("reference", "rolling")
    eng.set_param("upsample", "20")  # the CLI hands strings
    assert eng.reference == "rolling" and eng.upsample == 20
    with pytest.raises(KeyError, match="no parameter"):
        eng.set_param("colour", 1)
    with pytest.raises(EngineError, match="reference"):
        Register(reference="last")
    with pytest.raises(EngineError, match="volume"):
        eng.set_param("volume", True)
    feedback = Register(feedback=True)
    with pytest.raises(EngineError, match="pixel size"):
        feedback.setup(StreamSpec(shape=(64, 64)))


# -- stage feedback --------------------------------------------------------------------------


def test_drift_to_stage_um_units_and_sign():
    # Camera axes = stage axes, 0.5 um pixels: a drift of (dy, dx) = (2, -4) px is undone by
    # moving the stage by +A @ (dx, dy) = (-2, +1) um (x, y).
    assert drift_to_stage_um((2.0, -4.0), 0.5) == pytest.approx((-2.0, 1.0))
    # Micro-Manager's uncalibrated identity affine falls back to the pixel size.
    assert drift_to_stage_um((2.0, -4.0), 0.5, (1, 0, 0, 0, 1, 0)) == pytest.approx((-2.0, 1.0))
    # Camera rotated 90 degrees: stage_x = -0.5 y_px, stage_y = 0.5 x_px.
    rotated = (0.0, -0.5, 0.0, 0.5, 0.0, 0.0)
    assert drift_to_stage_um((2.0, -4.0), 0.5, rotated) == pytest.approx((-1.0, -2.0))
    # Camera mirrored in x: stage_x = -0.5 x_px.
    flipped = (-0.5, 0.0, 10.0, 0.0, 0.5, -3.0)  # translations do not enter a relative move
    assert drift_to_stage_um((2.0, -4.0), 0.5, flipped) == pytest.approx((2.0, 1.0))
    # Affine scale disagreeing with the pixel size by >10 % is distrusted, as in Micro-Manager.
    assert drift_to_stage_um((2.0, -4.0), 0.5, (0.1, 0, 0, 0, 0.1, 0)) == pytest.approx((-2.0, 1.0))
    with pytest.raises(ValueError, match="pixel size"):
        drift_to_stage_um((1.0, 1.0), None)


def _closed_loop(scene, affine, sign: float, n: int = 30) -> np.ndarray:
    """Residual drift (px) per frame with the engine's stage moves applied (times ``sign``).

    Camera model, Micro-Manager's convention: the pixel p shows the stage point
    s + A (p - c), where s is the stage position. A sample drifting by w (um) on the stage
    therefore appears displaced by d = A^-1 (w - s) pixels.
    """
    rng = np.random.default_rng(5)
    a = np.array([[affine[0], affine[1]], [affine[3], affine[4]]])
    velocity = np.array([0.09, -0.05])  # um per frame, in stage (x, y)
    stage = np.zeros(2)
    eng = Register(feedback=True, feedback_threshold_px=1.0, stage_affine=affine)
    eng.setup(StreamSpec(shape=scene.size, pixel_size_um=0.2))
    residual = []
    for t in range(n):
        w = velocity * t
        dx, dy = np.linalg.solve(a, w - stage)
        residual.append(math.hypot(dx, dy))
        out = eng.process(_photons(rng, scene.view((dy, dx)), 5.0), FrameInfo(seq=t))
        for ev in out["events"]:
            assert ev["kind"] == "drift" and ev["seq"] == t and ev["stage_axes"] == ["x", "y"]
            stage = stage + sign * np.array(ev["stage_um"])
    return np.array(residual)


def _pixels(affine, stage_um) -> float:
    a = np.array([[affine[0], affine[1]], [affine[3], affine[4]]])
    return float(np.hypot(*np.linalg.solve(a, stage_um)))


_ROT = 0.5  # radians


@pytest.mark.parametrize(
    "affine",
    [
        (0.2, 0.0, 0.0, 0.0, 0.2, 0.0),  # camera axes = stage axes
        (0.0, 0.2, 0.0, 0.2, 0.0, 0.0),  # transposed camera (x and y swapped)
        # rotated and mirrored camera
        (0.2 * math.cos(_ROT), -0.2 * math.sin(_ROT), 0.0,
         -0.2 * math.sin(_ROT), -0.2 * math.cos(_ROT), 0.0),
    ],
)  # fmt: skip
def test_closed_loop_stage_feedback_brings_the_sample_back(scene, affine):
    corrected = _closed_loop(scene, affine, +1.0)
    assert _pixels(affine, [0.09 * 29, -0.05 * 29]) > 10.0  # where it would be uncorrected
    # A sawtooth: the drift (0.5 px per frame) grows past the 1 px threshold, one move takes
    # it back to about one frame's drift, the hold-off frames let it grow again.
    assert corrected.max() < 2.5
    assert corrected[-10:].min() < 0.8
    # The same loop with the opposite sign runs away, faster than no correction at all.
    wrong = _closed_loop(scene, affine, -1.0, n=20)
    assert wrong[-1] > 1.5 * _pixels(affine, [0.09 * 19, -0.05 * 19])
