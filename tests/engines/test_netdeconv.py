"""Learned deconvolution: a tiny network taught by per-region WB-RL on a field-varying blur.

Known objects are real images: nuclei frames of the CC BY migration movie (in the repository) and,
where the shared data is, the W2S 400-frame averages (tests marked w2s); the blur is a Gaussian
whose sigma grows from 1 px at the field centre to 3 px in the corners, applied by blending
blurred copies. The network is fitted once per source on crops of some images and judged on
crops of others (the movie: its middle against both ends, after the cells have moved on).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from livescope.engines import FrameInfo, StreamSpec, create_engine, modelfile
from livescope.engines import netdeconv as N
from livescope.engines.psf import gaussian_psf
from tests.conftest import REAL_DATA, W2S_PAIRS

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

FIELD = 96  # px, square field of view
S0, S1 = 1.0, 3.0  # blur sigma at the centre and in the corners (px)
OFFSET = 100.0
PEAK = 200.0  # photons at the object's brightest
# the teacher: per-region RL stopped at 3 iterations. At 200 photons early-stopped RL regularises
# the noise far better than WB 2 it. (per-region: 30.4 vs 25.0 dB against the object on the
# held-back frames); its cost is paid once at fit time, not per frame
TEACHER = {"method": "rl", "iterations": 3}


def sigma_map(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    y, x = np.mgrid[:h, :w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    return S0 + (S1 - S0) * ((y - cy) ** 2 + (x - cx) ** 2) / (cy**2 + cx**2)


def field_blur(obj: np.ndarray) -> np.ndarray:
    """Blur growing towards the corners: each pixel interpolates between the two blurred copies
    whose sigma brackets its own."""
    sig = sigma_map(obj.shape)
    levels = np.linspace(S0, S1, 5)
    copies = np.stack([ndimage.gaussian_filter(obj, s, mode="reflect") for s in levels])
    pos = np.clip((sig - S0) / (levels[1] - levels[0]), 0, len(levels) - 1 - 1e-9)
    i = pos.astype(int)
    f = pos - i
    yy, xx = np.indices(obj.shape)
    return (1 - f) * copies[i, yy, xx] + f * copies[i + 1, yy, xx]


def psf_grid(shape: tuple[int, int], n: int = 3) -> np.ndarray:
    """The per-region teacher's PSFs: the Gaussian at each region's centre (what a bead there
    would show)."""
    sig = sigma_map(shape)
    cy = ((np.arange(n) + 0.5) * shape[0] / n - 0.5).round().astype(int)
    cx = ((np.arange(n) + 0.5) * shape[1] / n - 0.5).round().astype(int)
    ks = [[gaussian_psf(sig[a, b]) for b in cx] for a in cy]
    size = max(k.shape[0] for row in ks for k in row)
    return np.array([[np.pad(k, (size - k.shape[0]) // 2) for k in row] for row in ks])


def load_object(name: str) -> np.ndarray:
    """A known object in photons (2 to ~PEAK): a W2S 400-frame average (``035_1``, ``085_1``), or
    frames of the nuclei movie, (t, y, x): ``cells_train`` (frames 0-13, 34-47) or ``cells_held``
    (frames 18-29)."""
    import tifffile

    if name.startswith("cells"):
        movie = tifffile.imread(REAL_DATA / "cancer_cell_migration_crop.tif").astype(np.float64)
        # near noise-free, as the W2S averages are: 3-frame means, smoothed by 0.7 px
        movie = ndimage.gaussian_filter((movie[:-2] + movie[1:-1] + movie[2:]) / 3, (0, 0.7, 0.7))
        low, high = np.percentile(movie, [1.0, 99.9])
        movie = np.clip((movie - low) / (high - low), 0, 1) * PEAK + 2
        # the cells multiply (mean brightness 31 -> 56): fit on both ends, judge on the middle,
        # at least 5 frames from any fitted one (frames 5 apart correlate at 0.5 on average)
        return np.concatenate([movie[:12], movie[34:]]) if name == "cells_train" else movie[18:28]
    return tifffile.imread(W2S_PAIRS / f"target_avg400_{name}.tif").astype(np.float64) / 255 * PEAK + 2


# per source: the fitted and the held-back objects, the fit's steps (`trained`, `restore_fit`),
# the margin (dB) by which the net must beat single-PSF WB-RL at its best iteration count, and
# those of the restore network over the raw frame and over the chain `denoise,deconvolve`.
# The nuclei, smooth blobs, gain less from a field-varying PSF than the W2S fields: there the
# per-region teacher itself is only 1.3 dB above the best single PSF (32.07 vs 30.74 dB), and the
# net needs 600 steps to come near it (31.58). The shipped denoiser was trained on this very movie
# (3-frame means), so on the nuclei the chain is not held out and wins (see the restore test)
SOURCES = {
    "cells": {
        "objects": ("cells_train", "cells_held"),
        "steps": (600, 600),
        "margin_db": 0.5,
        "restore_over_raw_db": 3.0,
        "restore_over_chain_db": -1.0,
    },
    "w2s": {
        "objects": ("035_1", "085_1"),
        "steps": (300, 600),
        "margin_db": 1.0,
        "restore_over_raw_db": 5.0,
        "restore_over_chain_db": 0.5,
    },
}


@pytest.fixture(scope="module", params=["cells", pytest.param("w2s", marks=pytest.mark.w2s)])
def source(request) -> dict:
    return {"name": request.param, **SOURCES[request.param]}


@pytest.fixture(scope="module")
def objects(source) -> tuple[np.ndarray, np.ndarray]:
    return tuple(load_object(name) for name in source["objects"])


def _field_of_view(obj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random FIELD x FIELD crop (of a random frame, when ``obj`` is a movie)."""
    if obj.ndim == 3:
        obj = obj[rng.integers(0, obj.shape[0])]
    y0, x0 = rng.integers(0, obj.shape[0] - FIELD + 1, 2)
    return obj[y0 : y0 + FIELD, x0 : x0 + FIELD]


def acquire(obj: np.ndarray, rng: np.random.Generator, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n raw frames (offset, Poisson, read noise 2 ADU) of random fields of view, and the objects."""
    raws, objs = [], []
    for _ in range(n):
        o = _field_of_view(obj, rng)
        b = field_blur(o)
        raws.append(rng.poisson(np.maximum(b, 0)) + rng.normal(0, 2.0, b.shape) + OFFSET)
        objs.append(o)
    return np.stack(raws).astype(np.float32), np.stack(objs)


def psnr(est: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(ref.max() ** 2 / np.mean((np.asarray(est, float) - ref) ** 2)))


@pytest.fixture(scope="module")
def trained(source, objects, tmp_path_factory):
    rng = np.random.default_rng(0)
    train, _ = acquire(objects[0], rng, 20)
    held, held_obj = acquire(objects[1], rng, 6)
    grid = psf_grid((FIELD, FIELD))
    t0 = time.perf_counter()
    res = N.fit_deconvolution(
        train,
        psf=grid,
        teacher_params=TEACHER,
        steps=source["steps"][0],
        offset=OFFSET,
        base=8,
        depth=2,
        patch=32,
        batch=8,
        lr=3e-3,
        threads=2,
    )
    fit_s = time.perf_counter() - t0
    path = res.model.save(tmp_path_factory.mktemp("netdeconv") / "deconv.lsmodel")
    return {
        "model": res.model,
        "path": path,
        "grid": grid,
        "held": held,
        "held_obj": held_obj,
        "losses": res.losses,
        "fit_s": fit_s,
    }


def offset_free(raw: np.ndarray) -> np.ndarray:
    return np.maximum(raw - OFFSET, 0)


def test_psf_field_weights_and_single_psf_blur() -> None:
    grid = psf_grid((40, 52), 3)
    field = N.PSFField.of(grid)
    w = field.weights((40, 52))
    np.testing.assert_allclose(w.sum(axis=(0, 1)), 1.0, atol=1e-6)
    assert w[0, 0, 0, 0] == pytest.approx(1.0) and w[1, 1, 20, 26] > 0.9
    # one PSF: the field blur is plain convolution with reflected edges
    img = np.random.default_rng(1).random((40, 52))
    one = N.PSFField.of(gaussian_psf(1.5))
    np.testing.assert_allclose(one.blur(img), ndimage.convolve(img, one.kernels[0, 0], mode="reflect"), atol=1e-5)
    assert one.symmetric() and not field.symmetric()


def test_restore_targets_deconvolve_the_temporal_mean() -> None:
    rng = np.random.default_rng(2)
    obj = ndimage.gaussian_filter(rng.random((32, 32)) * 100, 1) + 5
    frames = rng.poisson(np.broadcast_to(obj, (6, 32, 32))).astype(np.float32)
    field = N.PSFField.of(gaussian_psf(1.0))
    teacher = N._teacher_params(None)
    targets = N.teacher_targets(frames, field, teacher, task="restore", window=3)
    np.testing.assert_allclose(targets[2], N.teacher_deconvolve(frames[1:4].mean(0), field, teacher), rtol=1e-5)
    with pytest.raises(Exception, match="time-lapse"):
        N.teacher_targets(frames[:1], field, teacher, task="restore")


def test_net_reproduces_teacher_on_held_back_frames(trained) -> None:
    field = N.PSFField.of(trained["grid"])
    teacher = N._teacher_params(TEACHER)
    net = N.NetDeconvolver(trained["model"], backend="onnxruntime", tile=0)
    net_err, raw_err = [], []
    for raw in trained["held"]:
        d = offset_free(raw)
        target = N.teacher_deconvolve(d, field, teacher)
        net_err.append(psnr(net.restore(d, check=False)[0], target))
        raw_err.append(psnr(d, target))
    # measured: the net against its teacher vs the raw frame against it (held-back image)
    assert np.mean(net_err) > np.mean(raw_err) + 1.0, (net_err, raw_err)
    assert np.mean(trained["losses"][-20:]) < 0.7 * np.mean(trained["losses"][:20])


def _quality(trained) -> dict[str, float]:
    field = N.PSFField.of(trained["grid"])
    net = N.NetDeconvolver(trained["model"], backend="onnxruntime", tile=0)
    singles = {s: N.PSFField.of(gaussian_psf(s)) for s in (1.0, 1.5, 2.0, 2.5, 3.0)}
    classical = {"wb2": {"iterations": 2}, "wb1": {"iterations": 1}, "rl3": {"method": "rl", "iterations": 3}}
    res: dict[str, list[float]] = {"net": [], "teacher": [], "regional_wb2": []}
    per: dict[tuple[str, float], list[float]] = {(c, s): [] for c in classical for s in singles}
    for raw, obj in zip(trained["held"], trained["held_obj"], strict=True):
        d = offset_free(raw)
        res["net"].append(psnr(net.restore(d, check=False)[0], obj))
        res["teacher"].append(psnr(N.teacher_deconvolve(d, field, N._teacher_params(TEACHER)), obj))
        res["regional_wb2"].append(psnr(N.teacher_deconvolve(d, field, N._teacher_params(None)), obj))
        for (c, s), v in per.items():
            v.append(psnr(N.teacher_deconvolve(d, singles[s], N._teacher_params(classical[c])), obj))
    out = {k: float(np.mean(v)) for k, v in res.items()}
    out["centre"] = float(np.mean(per[("wb2", S0)]))
    for c in classical:  # the best single PSF, tuned against the object (which a user cannot do)
        out[f"best_single_{c}"] = max(float(np.mean(v)) for (cc, _), v in per.items() if cc == c)
    return out


@pytest.fixture(scope="module")
def quality(source, trained) -> dict[str, float]:
    return {**_quality(trained), "margin_db": source["margin_db"]}


def test_net_beats_centre_psf_wb_on_field_varying_blur(quality) -> None:
    # single-PSF WB-RL with the PSF a bead in the field centre shows
    assert quality["net"] >= quality["centre"] + 1.0, quality


def test_net_beats_best_single_psf_wb_by_1db(quality) -> None:
    """The issue's goal: against WB-RL as the deconvolve engine runs it (2 iterations) with the
    single PSF that does best against the known object. Measured: net 28.57, best single-PSF
    WB 2 it. 26.97 (sigma 3), i.e. +1.6 dB; the per-region WB 2 it. 25.0."""
    assert quality["net"] >= quality["best_single_wb2"] + 1.0, quality


def test_net_beats_single_psf_wb_at_its_best_iteration_count(quality) -> None:
    """WB-RL with one PSF at 1 iteration does better than at 2 on these noisy frames; the net
    beats that too, by 1 dB on W2S (measured: net 29.96, best single-PSF WB 1 it. 28.40, +1.56
    dB), by 0.5 dB on the nuclei (measured: 31.58 vs 30.74, +0.84; the teacher 32.07)."""
    best = max(quality["best_single_wb1"], quality["best_single_wb2"])
    assert quality["net"] >= best + quality["margin_db"], quality
    assert quality["net"] >= quality["teacher"] - 1.0, quality  # measured 0.46 dB below it


@pytest.mark.xfail(
    strict=True,
    reason="measured: net 29.96 dB vs single-PSF RL stopped at 3 it. 31.24 (sigma "
    "2.5, tuned against the object): at 200 photons regularising the noise matters more than "
    "the field-varying blur; the per-region RL 3 it. teacher itself reaches only 30.42 "
    "(docs/learned_deconvolution.md)",
)
def test_net_beats_single_psf_early_stopped_rl(quality) -> None:
    assert quality["net"] >= quality["best_single_rl3"] + 1.0, quality


def still_fields(obj: np.ndarray, rng: np.random.Generator, n_fields: int, n_frames: int) -> tuple[list, list]:
    """Time-lapses of still fields of view: the same blurred object, fresh noise every frame."""
    movies, objs = [], []
    for _ in range(n_fields):
        o = _field_of_view(obj, rng)
        b = np.maximum(field_blur(o), 0)
        movies.append(
            np.stack([rng.poisson(b) + rng.normal(0, 2.0, b.shape) + OFFSET for _ in range(n_frames)]).astype(
                np.float32
            )
        )
        objs.append(o)
    return movies, objs


@pytest.fixture(scope="module")
def restore_fit(source, objects):
    """task='restore' fitted on 10 still fields x 4 frames of the fitted objects (the teacher
    deconvolves the 4-frame mean), judged on single frames of fields of the held-back ones."""
    train, _ = still_fields(objects[0], np.random.default_rng(10), 10, 4)
    held, held_obj = still_fields(objects[1], np.random.default_rng(11), 6, 1)
    res = N.fit_deconvolution(
        train,
        psf=psf_grid((FIELD, FIELD)),
        teacher_params=TEACHER,
        task="restore",
        restore_window=4,
        steps=source["steps"][1],
        offset=OFFSET,
        base=8,
        depth=2,
        patch=32,
        batch=8,
        lr=3e-3,
        threads=2,
    )
    return {"model": res.model, "held": [m[0] for m in held], "held_obj": held_obj, "source": source}


def test_restore_beats_denoise_then_deconvolve_at_lower_cost(restore_fit) -> None:
    """The combined network against livescope's own chain `denoise,deconvolve` (the shipped
    denoiser, then WB-RL with the single PSF and iteration count that do best against the
    known object, which a user cannot choose), on held-back frames of another image; cost in
    FLOPs per 512x512 frame (deterministic: speed itself is measured in bench/). Measured with
    the shipped supervised denoiser: +0.95 dB on W2S, held out from it. The nuclei are not (the
    denoiser was trained on this movie): there the chain wins, and the net must come within 1 dB
    of it at a fifth of its cost."""
    from livescope.engines import unet

    if not modelfile.default_model_path().is_file():
        pytest.skip("the shipped denoising model is not built here")
    net = N.NetDeconvolver(restore_fit["model"], backend="onnxruntime", tile=0)
    den = create_engine("denoise", backend="onnxruntime")
    den.setup(StreamSpec(shape=(FIELD, FIELD), camera_offset=OFFSET))
    restored, chain = [], {}
    for i, (raw, obj) in enumerate(zip(restore_fit["held"], restore_fit["held_obj"], strict=True)):
        restored.append(psnr(net.restore(offset_free(raw), check=False)[0], obj))
        denoised = den.process(raw.astype(np.uint16), FrameInfo(seq=i))["denoised"]  # camera units
        for sigma in (1.0, 1.5, 2.0, 2.5, 3.0):
            for its in (1, 2):
                dec = create_engine("deconvolve", psf_sigma=sigma, iterations=its)
                dec.setup(StreamSpec(shape=(FIELD, FIELD), camera_offset=OFFSET))
                out = dec.process(denoised, FrameInfo(seq=i))["deconvolved"]
                chain.setdefault((sigma, its), []).append(psnr(out, obj))
    best_chain = max(float(np.mean(v)) for v in chain.values())
    ours = float(np.mean(restored))
    pairs = zip(restore_fit["held"], restore_fit["held_obj"], strict=True)
    raw_psnr = float(np.mean([psnr(offset_free(r), o) for r, o in pairs]))
    source = restore_fit["source"]
    # it learned (the fit that sat at identity did not)
    assert ours >= raw_psnr + source["restore_over_raw_db"], (ours, raw_psnr)
    # measured on W2S: 31.53 vs 30.58 dB with the shipped supervised denoiser (+0.95; +3.3 against
    # the earlier Noise2Void model), raw 23.54; cost 3.3 vs 17.1 GFLOP for the denoiser alone.
    # On the nuclei, which the shipped denoiser was trained on: 31.07 vs 31.62 (-0.55), raw 26.73
    assert ours >= best_chain + source["restore_over_chain_db"], (ours, best_chain, raw_psnr)
    cost = unet.flops_and_traffic(restore_fit["model"].build_torch())["flops"]
    denoiser = unet.flops_and_traffic(modelfile.load(modelfile.default_model_path()).build_torch())["flops"]
    assert cost < denoiser, (cost, denoiser)  # and the chain runs a deconvolution on top


def test_onnx_matches_torch(trained) -> None:
    d = offset_free(trained["held"][0])
    a = N.NetDeconvolver(trained["model"], backend="onnxruntime", tile=0)
    b = N.NetDeconvolver(trained["model"], backend="torch", tile=0)
    assert a.runner.name == "onnxruntime" and b.runner.name == "torch"
    ya, yb = a.restore(d, check=False)[0], b.restore(d, check=False)[0]
    np.testing.assert_allclose(ya, yb, atol=1e-4 * float(np.abs(yb).max()))


def test_consistency_flags_a_frame_of_different_structure(trained) -> None:
    eng = create_engine("restore", model=str(trained["path"]), backend="onnxruntime", tile=0)
    eng.setup(StreamSpec(shape=(FIELD, FIELD), camera_offset=OFFSET))
    thr = trained["model"].metadata["consistency"]["threshold"]
    for i, raw in enumerate(trained["held"]):  # another image, same kind of sample: no alarm
        out = eng.process(raw.astype(np.uint16), FrameInfo(seq=i))
        assert out["restored"].shape == (FIELD, FIELD) and out["restored"].dtype == np.float32
        assert out["consistency"] < thr and "events" not in out
    rng = np.random.default_rng(5)
    beads = np.full((FIELD, FIELD), 2.0)
    pts = rng.integers(5, FIELD - 5, (25, 2))
    beads[pts[:, 0], pts[:, 1]] = 3000.0
    raw = rng.poisson(field_blur(beads)) + rng.normal(0, 2.0, beads.shape) + OFFSET
    out = eng.process(raw.astype(np.uint16), FrameInfo(seq=99))
    assert out["consistency"] > thr
    (event,) = out["events"]
    assert event["kind"] == "consistency" and event["seq"] == 99 and event["score"] == out["consistency"]


def test_deconvolve_engine_method_net_and_model_file(trained) -> None:
    eng = create_engine("deconvolve", method="net", model=str(trained["path"]))
    eng.setup(StreamSpec(shape=(FIELD, FIELD), camera_offset=OFFSET))
    raw = trained["held"][1]
    out = eng.process(raw.astype(np.uint16), FrameInfo(seq=0))
    net = N.NetDeconvolver(trained["path"], backend="auto", tile=0)
    direct = net.restore(offset_free(raw.astype(np.uint16).astype(np.float32)), check=False)[0]
    np.testing.assert_allclose(out["deconvolved"], direct, rtol=1e-4, atol=1e-3)
    assert set(out) <= {"deconvolved", "events"}
    loaded = modelfile.load(trained["path"])
    assert loaded.task == "deconvolve" and loaded.k == 0 and loaded.metadata["inputs"]["coordinates"] == 2
    with pytest.raises(Exception, match="model=PATH"):
        create_engine("deconvolve", method="net")
    # and the denoiser refuses a deconvolution model (its normalisation and output differ)
    den = create_engine("denoise", model=str(trained["path"]), backend="onnxruntime")
    with pytest.raises(Exception, match="not a denoiser"):
        den.setup(StreamSpec(shape=(FIELD, FIELD), camera_offset=OFFSET))
        den.process(raw.astype(np.uint16), FrameInfo(seq=0))


def test_old_model_files_still_load_as_denoisers() -> None:
    path = modelfile.default_model_path()
    if not path.is_file():
        pytest.skip("the shipped denoising model is not built here")
    model = modelfile.load(path)
    assert model.task == "denoise"
    with pytest.raises(Exception, match="not deconvolution"):
        N.NetDeconvolver(model)


def test_z_stacks_are_restored_plane_by_plane(trained) -> None:
    """volume=True: a (z, y, x) stack in, each plane through the 2-D network, the stack's
    consistency is its worst plane's and an event names the plane."""
    eng = create_engine("restore", model=str(trained["path"]), backend="onnxruntime", tile=0, volume=True)
    assert eng.needs_volume
    eng.setup(StreamSpec(shape=(3, FIELD, FIELD), camera_offset=OFFSET))
    rng = np.random.default_rng(6)
    beads = np.full((FIELD, FIELD), 2.0)
    pts = rng.integers(5, FIELD - 5, (25, 2))
    beads[pts[:, 0], pts[:, 1]] = 3000.0
    bead_plane = rng.poisson(field_blur(beads)) + rng.normal(0, 2.0, beads.shape) + OFFSET
    stack = np.stack([trained["held"][0], trained["held"][1], bead_plane]).astype(np.uint16)
    out = eng.process(stack, FrameInfo(seq=7))
    net = N.NetDeconvolver(trained["path"], backend="onnxruntime", tile=0)
    planes = [net.restore(offset_free(p.astype(np.float32))) for p in stack]
    assert out["restored"].shape == (3, FIELD, FIELD)
    for z, (img, _score) in enumerate(planes):
        np.testing.assert_allclose(out["restored"][z], img, rtol=1e-4, atol=1e-3)
    assert out["consistency"] == pytest.approx(max(s for _, s in planes))
    assert [e["z"] for e in out["events"]] == [2]
    dec = create_engine("deconvolve", method="net", model=str(trained["path"]), volume=True)
    assert dec.needs_volume
    dec.setup(StreamSpec(shape=(3, FIELD, FIELD), camera_offset=OFFSET))
    np.testing.assert_allclose(
        dec.process(stack, FrameInfo(seq=8))["deconvolved"], out["restored"], rtol=1e-4, atol=1e-3
    )
