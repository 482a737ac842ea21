"""The denoising engine: model file, normalisation, tiling, backends, fitting, hot swap."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from livescope.engines import FrameInfo, StreamSpec, create_engine, inference, modelfile  # noqa: E402
from livescope.engines import denoise as denoise_mod  # noqa: E402
from livescope.engines.fit import crappify, fit, n2v_mask  # noqa: E402
from livescope.engines.inference import (  # noqa: E402
    Normalisation,
    OnnxRuntimeBackend,
    Runner,
    TorchBackend,
    estimate_noise,
    open_backend,
    run_tiled,
    trt_cache_key,
)
from livescope.engines.modelfile import ModelFile, ModelFileError  # noqa: E402
from livescope.engines.unet import UNet  # noqa: E402
from tests.conftest import REAL_DATA, W2S_PAIRS  # noqa: E402


def _model(k: int = 0, depth: int = 2, base: int = 8, seed: int = 0) -> ModelFile:
    torch.manual_seed(seed)
    net = UNet(1 + k, base=base, depth=depth)
    with torch.no_grad():  # randomise biases too, so models differ visibly
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ModelFile.from_net(net, {"training": {"data": "random weights (test)"}})


def _scene(shape=(64, 64), t=1, seed=0) -> np.ndarray:
    """Smooth blobs drifting by a pixel per frame: (t, y, x) in photons."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    cy, cx = rng.uniform(8, shape[0] - 8, 12), rng.uniform(8, shape[1] - 8, 12)
    frames = []
    for i in range(t):
        img = np.full(shape, 2.0, np.float32)
        for y, x in zip(cy, cx, strict=True):
            img += 40.0 * np.exp(-((yy - y - 0.5 * i) ** 2 + (xx - x) ** 2) / (2 * 3.0**2))
        frames.append(img)
    return np.stack(frames)


def _camera(photons: np.ndarray, rng, gain=2.0, offset=100.0, read=3.0) -> np.ndarray:
    adu = gain * rng.poisson(photons) + rng.normal(offset, read, photons.shape)
    return np.clip(np.round(adu), 0, 65535).astype(np.uint16)


# ------------------------------------------------------------------ model file


def test_model_file_roundtrip(tmp_path):
    m = _model()
    path = m.save(tmp_path / "m.lsmodel")
    back = modelfile.load(path)
    assert back.hash == m.hash and back.k == 0 and back.multiple == 4
    assert set(back.weights) == set(m.weights)
    assert back.metadata["sha256"]["weights.npz"]


def test_corrupt_or_incompatible_model_refused(tmp_path):
    good = _model().save(tmp_path / "good.lsmodel")
    data = good.read_bytes()

    truncated = tmp_path / "truncated.lsmodel"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt"):
        modelfile.load(truncated)

    notzip = tmp_path / "notzip.lsmodel"
    notzip.write_bytes(b"\x00" * 1000)
    with pytest.raises(ModelFileError):
        modelfile.load(notzip)

    def rewrite(name: str, edit) -> Path:
        out = tmp_path / name
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
            for item in src.namelist():
                dst.writestr(item, edit(item, src.read(item)))
        return out

    def flip_weight(item, blob):
        if item != "model.onnx":
            return blob
        blob = bytearray(blob)
        blob[len(blob) // 2] ^= 0xFF
        return bytes(blob)

    with pytest.raises(ModelFileError, match="sha256"):
        modelfile.load(rewrite("flipped.lsmodel", flip_weight))

    import json

    def newer(item, blob):
        if item != "metadata.json":
            return blob
        meta = json.loads(blob)
        meta["format_version"] = modelfile.FORMAT_VERSION + 1
        return json.dumps(meta).encode()

    with pytest.raises(ModelFileError, match="upgrade livescope"):
        modelfile.load(rewrite("newer.lsmodel", newer))
    with pytest.raises(ModelFileError, match="does not exist"):
        modelfile.load(tmp_path / "missing.lsmodel")


def test_model_suffix_is_no_image_format_and_old_files_still_load(tmp_path):
    import tifffile

    assert modelfile.default_model_path().suffix == modelfile.MODEL_SUFFIX == ".lsmodel"
    old = _model().save(tmp_path / "written-before-the-rename.lsm")  # the earlier suffix
    assert modelfile.load(old).hash == modelfile.load(_model().save(tmp_path / "new.lsmodel")).hash
    # a Zeiss confocal .lsm (a TIFF) given as a model is named for what it is
    image = tmp_path / "cells.lsm"
    tifffile.imwrite(image, np.zeros((8, 8), np.uint16))
    with pytest.raises(ModelFileError, match="TIFF image.*not a livescope model.*lsmodel"):
        modelfile.load(image)


def test_shipped_model_loads_and_is_small():
    path = modelfile.default_model_path()
    assert path.stat().st_size < 4 * 2**20
    m = modelfile.load(None)
    assert m.metadata["training"]["data"]
    assert m.metadata["normalisation"]["vst"] in (True, False)


def test_denoise_module_does_not_import_torch():
    code = (
        "import sys, livescope.engines.denoise as d, livescope.engines.inference as i;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "from livescope.engines import modelfile;"
        "b = i.open_backend(modelfile.load(None), 'onnxruntime');"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------ normalisation


def test_noise_model_and_normalisation_roundtrip():
    rng = np.random.default_rng(1)
    photons = np.tile(np.linspace(5, 400, 256, dtype=np.float32), (256, 1))
    raw = _camera(photons, rng, gain=2.0, offset=100.0, read=3.0)
    a, b = estimate_noise(raw)
    assert a == pytest.approx(2.0, rel=0.15)
    norm = Normalisation.estimate(raw)
    n = norm.forward(raw)
    assert -0.2 < n.min() and n.max() < 1.3
    # after the variance-stabilising transform the noise no longer grows with brightness
    resid = n - norm.forward(2.0 * photons + 100.0)
    scale = norm.high - norm.low
    dark, bright = resid[:, :64].std() * scale, resid[:, -64:].std() * scale
    assert dark == pytest.approx(1.0, rel=0.25) and bright == pytest.approx(1.0, rel=0.25)
    back = norm.inverse(norm.forward(2.0 * photons + 100.0))
    assert np.abs(back - (2.0 * photons + 100.0)).max() < 0.05 * 2 * 400


# ------------------------------------------------------------------ inference


def test_onnx_matches_torch():
    m = _model(k=1, depth=2, base=8)
    x = np.random.default_rng(0).random((1, 2, 64, 96), dtype=np.float32)
    y_torch = TorchBackend(m).run(x)
    y_onnx = OnnxRuntimeBackend(m).run(x)
    assert y_torch.shape == (1, 1, 64, 96)
    np.testing.assert_allclose(y_onnx, y_torch, atol=1e-4, rtol=0)


def test_unshuffled_unet_roundtrips_and_matches_torch(tmp_path):
    """The shipped architecture: pixel unshuffle at the input (the levels at half resolution on
    4x the channels), shuffled back at the head. Size multiple counts the unshuffle."""
    torch.manual_seed(1)
    net = UNet(1, base=8, depth=2, unshuffle=2)
    assert net.depth == 3 and net.levels == 2
    m = ModelFile.from_net(net, {"training": {"data": "random weights (test)"}})
    assert m.arch["unshuffle"] == 2 and m.multiple == 8
    back = modelfile.load(m.save(tmp_path / "u2.lsmodel"))
    x = np.random.default_rng(0).random((1, 1, 48, 72), dtype=np.float32)
    y_torch = TorchBackend(back).run(x)  # rebuilt from the file's architecture and weights
    with torch.no_grad():
        y_net = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_torch, y_net, atol=1e-5, rtol=0)
    np.testing.assert_allclose(OnnxRuntimeBackend(back).run(x), y_torch, atol=1e-4, rtol=0)
    assert y_torch.shape == (1, 1, 48, 72)


def test_added_skips_roundtrip_and_cost_less(tmp_path):
    """skip="add": the decoder blocks see upsampled + skip (w channels, not 2w). The file
    records it, every backend rebuilds it, and it has fewer FLOPs than concatenated skips."""
    from livescope.engines.unet import build, flops_and_traffic

    torch.manual_seed(2)
    net = UNet(1, base=8, depth=2, unshuffle=2, skip="add")
    m = ModelFile.from_net(net, {"training": {"data": "random weights (test)"}})
    assert m.arch["skip"] == "add"
    assert "skip" not in ModelFile.from_net(UNet(1, base=8, depth=2), {}).arch  # old readers
    back = modelfile.load(m.save(tmp_path / "add.lsmodel"))
    x = np.random.default_rng(3).random((1, 1, 40, 56), dtype=np.float32)
    with torch.no_grad():
        y_net = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(TorchBackend(back).run(x), y_net, atol=1e-5, rtol=0)
    np.testing.assert_allclose(OnnxRuntimeBackend(back).run(x), y_net, atol=1e-4, rtol=0)
    cat = flops_and_traffic(build({**m.arch, "skip": "cat"}), 64, 64)["flops"]
    assert flops_and_traffic(net, 64, 64)["flops"] < 0.9 * cat
    with pytest.raises(ValueError, match="'cat' or 'add'"):
        UNet(1, skip="sum")


def test_tiles_stitch_without_seams():
    m = _model(depth=2, base=8)
    backend = OnnxRuntimeBackend(m)
    x = np.random.default_rng(2).random((1, 150, 203), dtype=np.float32)
    whole = run_tiled(backend.run, x, multiple=m.multiple, tile=0)
    tiled = run_tiled(backend.run, x, multiple=m.multiple, tile=64, overlap=48)
    assert tiled.shape == whole.shape == (150, 203)
    # overlap margin (24 px) wider than this depth-2 net's receptive radius: equal to float error
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    # and a margin too small does show seams: the comparison above can fail
    seamy = run_tiled(backend.run, x, multiple=m.multiple, tile=64, overlap=8)
    assert np.abs(seamy - whole).max() > 1e-4


def test_trt_cache_key_changes_with_every_part():
    base = ("abc123", "NVIDIA H100", "10.3.0", (1, 1, 512, 512), True)
    key = trt_cache_key(*base)
    assert key == trt_cache_key(*base) and key.endswith(".engine")
    for i, other in enumerate(["abc124", "NVIDIA A100", "10.4.0", (1, 1, 512, 1024), False]):
        changed = list(base)
        changed[i] = other
        assert trt_cache_key(*changed) != key


class _Broken:
    name = "tensorrt"

    def __init__(self, model, **_):
        raise RuntimeError("no GPU in this test")


class _FailsAtRun:
    name = "tensorrt"

    def __init__(self, model, **_):
        pass

    def run(self, x):
        raise RuntimeError("device lost")


def test_backend_fallback_logged(monkeypatch, caplog):
    m = _model()
    monkeypatch.setitem(inference.BACKENDS, "tensorrt", _Broken)
    monkeypatch.setattr(inference, "_SAID", set())
    with caplog.at_level(logging.INFO, logger=inference.__name__):
        b = open_backend(m, "auto")
        open_backend(m, "auto")
    assert b.name == "onnxruntime"
    # the automatic chain passing over a backend this machine lacks: said once, at INFO
    passed_over = [r for r in caplog.records if "no GPU in this test" in r.getMessage()]
    assert [r.levelno for r in passed_over] == [logging.INFO]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=inference.__name__):
        assert open_backend(m, "tensorrt").name == "onnxruntime"  # asked for by name: a warning
    assert any(r.levelno == logging.WARNING and "no GPU in this test" in r.getMessage() for r in caplog.records)
    # a backend that fails mid-stream hands over to the next one, the frame is not lost
    monkeypatch.setitem(inference.BACKENDS, "tensorrt", _FailsAtRun)
    runner = Runner(m, "tensorrt")
    x = np.zeros((1, 1, 32, 32), np.float32)
    y = runner.run(x)
    assert runner.name == "onnxruntime" and y.shape == (1, 1, 32, 32)
    with pytest.raises(Exception, match="unknown backend"):
        open_backend(m, "tpu")


def test_no_backend_at_all_says_how_to_fix(monkeypatch):
    for name in inference.ORDER:
        monkeypatch.setitem(inference.BACKENDS, name, _Broken)
    with pytest.raises(Exception, match="pip install livescope"):
        open_backend(_model(), "auto")


def test_tensorrt_build_in_background_then_swapped_in(monkeypatch):
    """While TensorRT builds, frames are served by the next backend; then it takes over."""
    release = threading.Event()

    class SlowTensorRT:
        name = "tensorrt"

        def __init__(self, model, **_):
            self.inner = OnnxRuntimeBackend(model)
            assert release.wait(20)

        def run(self, x):
            return self.inner.run(x)

    monkeypatch.setattr(denoise_mod, "_tensorrt_installed", lambda: True)
    monkeypatch.setitem(inference.BACKENDS, "tensorrt", SlowTensorRT)
    eng = create_engine("denoise", backend="auto", tile=0)
    eng.setup(StreamSpec(shape=(64, 64)))
    frame = np.full((64, 64), 500, np.uint16)
    eng.process(frame, FrameInfo(seq=0))
    assert eng.describe()["backend_running"] == "onnxruntime"
    release.set()
    eng._builder.join(20)
    eng.process(frame, FrameInfo(seq=1))
    assert eng.describe()["backend_running"] == "tensorrt"


@pytest.mark.gpu
def test_tensorrt_backend_on_gpu(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT not installed (needs an NVIDIA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    m = _model()
    x = np.random.default_rng(0).random((1, 1, 128, 128), dtype=np.float32)
    trt_b = inference.TensorRTBackend(m, shape=x.shape, cache_dir=tmp_path)
    np.testing.assert_allclose(trt_b.run(x), TorchBackend(m, device="cpu").run(x), atol=2e-2)
    assert list(tmp_path.glob("*.engine"))


# ------------------------------------------------------------------ fitting


def test_n2v_mask_replaces_with_neighbours():
    rng = np.random.default_rng(0)
    p = rng.random((4, 32, 32)).astype(np.float32)
    masked, mask = n2v_mask(p, 0.03, rng)
    assert 0.01 < mask.mean() < 0.06
    assert np.array_equal(masked[~mask], p[~mask])
    assert (masked[mask] != p[mask]).mean() > 0.95  # replaced by another pixel's value


def _mse_after_fit(result: ModelFile, raw: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    eng = create_engine("denoise", backend="onnxruntime", tile=0)
    path = Path(result._saved)
    eng.model_path = str(path)
    eng.setup(StreamSpec(shape=raw.shape[-2:]))
    out = eng.process(raw, FrameInfo(seq=0))["denoised"]
    return float(np.mean((out - truth) ** 2)), float(np.mean((raw.astype(np.float32) - truth) ** 2))


@pytest.mark.parametrize("mode", ["noise2void+temporal", "supervised"])
def test_fitting_reduces_error_against_ground_truth(mode, tmp_path):
    rng = np.random.default_rng(3)
    photons = _scene((64, 64), t=6, seed=3)
    raw = _camera(photons, rng)
    truth = 2.0 * photons[-1] + 100.0
    kwargs = dict(base=8, depth=2, steps=200, batch=8, patch=32, lr=3e-3, progress=False, seed=0)
    if mode == "supervised":
        clean = [2.0 * _scene((64, 64), seed=s)[0] + 100.0 for s in (10, 11)]
        res = fit(None, clean=clean, **kwargs)
    else:
        res = fit(raw[:-1], **kwargs)  # the evaluated frame is not among the fitted ones
    assert len(res.losses) == 200 and np.mean(res.losses[-25:]) < np.mean(res.losses[:25])
    feats = res.model.training_features  # for the trust engine's distance from the training data
    if mode == "supervised":
        assert feats is None  # two 64x64 images: 18 tiles of 32 px, too few for 8 features (logged)
    else:
        assert feats["tiles"] == 5 * 9 and len(feats["mean"]) == 8 and feats["z_quantiles"]["99"] > 0
    res.model._saved = res.model.save(tmp_path / "fitted.lsmodel")
    assert modelfile.load(res.model._saved).training_features == feats
    fitted, noisy = _mse_after_fit(res.model, raw[-1], truth)
    # a tiny net after 200 steps: measured 0.59 (supervised ~0.4, Noise2Void+pairs 0.6-0.72) of
    # the noise power left; require a clear reduction
    assert fitted < 0.8 * noisy, (fitted, noisy)


def test_fit_continued_from_the_shipped_model_keeps_its_quality(tmp_path):
    # what `livescope fit` and the live fit do by default: start from the shipped model at a
    # lower peak learning rate (5e-4). Measured on this scene: MSE 0.857 -> 0.708 after 40 steps
    # (100 steps: 0.533); at the from-scratch 2e-3 it got worse (1.088)
    rng = np.random.default_rng(4)
    photons = _scene((128, 128), t=6, seed=4)
    raw = _camera(photons, rng)
    truth = 2.0 * photons[-1] + 100.0
    shipped = modelfile.load(None)
    shipped._saved = shipped.save(tmp_path / "shipped.lsmodel")
    before, noisy = _mse_after_fit(shipped, raw[-1], truth)
    res = fit(raw[:-1], model=modelfile.load(None), steps=40, batch=8, patch=64, progress=False, seed=0)
    assert res.model.metadata["training"]["lr"] == 5e-4
    assert (
        fit(raw[:-1], base=8, depth=2, steps=1, batch=2, patch=32, progress=False).model.metadata["training"]["lr"]
        == 2e-3
    )
    res.model._saved = res.model.save(tmp_path / "continued.lsmodel")
    after, _ = _mse_after_fit(res.model, raw[-1], truth)
    assert before < 0.1 * noisy and after < 0.95 * before, (noisy, before, after)


def test_crappify_makes_noise_that_scales_with_signal():
    rng = np.random.default_rng(0)
    clean = np.tile(np.linspace(0, 1000, 128, dtype=np.float32), (128, 1))
    noisy = crappify(clean, rng, photons=(20, 20), read_sigma=0.0)
    assert noisy.shape == clean.shape
    assert np.std(noisy[:, -16:] - clean[:, -16:]) > 2 * np.std(noisy[:, 4:20] - clean[:, 4:20])


# ------------------------------------------------------------------ the engine


def test_engine_end_to_end_on_uint16_frames():
    rng = np.random.default_rng(5)
    photons = _scene((96, 128), t=1, seed=5)[0]
    eng = create_engine("denoise", backend="onnxruntime")
    eng.setup(StreamSpec(shape=(96, 128), camera_offset=100.0))
    raw = _camera(photons, rng)
    out = eng.process(raw, FrameInfo(seq=0))
    assert set(out) == {"denoised"}
    y = out["denoised"]
    assert y.dtype == np.float32 and y.shape == (96, 128) and np.isfinite(y).all()
    truth = 2.0 * photons + 100.0
    assert np.mean((y - truth) ** 2) < np.mean((raw - truth) ** 2)
    d = eng.describe()
    assert d["backend_running"] == "onnxruntime" and d["model_hash"] and d["normalisation"]["offset"] == 100.0


def test_swap_model_between_frames_loses_no_frame(tmp_path):
    path_b = _model(seed=7).save(tmp_path / "b.lsmodel")
    eng = create_engine("denoise", backend="onnxruntime", tile=0)
    eng.setup(StreamSpec(shape=(64, 64)))
    rng = np.random.default_rng(0)
    frames = [_camera(_scene((64, 64), seed=i)[0], rng) for i in range(40)]
    outputs: list[np.ndarray] = []
    started = threading.Event()

    def stream():
        for i, f in enumerate(frames):
            outputs.append(eng.process(f, FrameInfo(seq=i))["denoised"])
            started.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert started.wait(30)
    eng.swap_model(path_b)
    worker.join(60)
    assert len(outputs) == len(frames)

    # each output is entirely one model's: compare with fresh engines fixed on each model
    refs = {}
    for name, path in (("a", None), ("b", path_b)):
        ref = create_engine("denoise", backend="onnxruntime", tile=0, model=path)
        ref.setup(StreamSpec(shape=(64, 64)))
        ref._norm = eng._norm  # the same stream normalisation
        refs[name] = [ref.process(f, FrameInfo(seq=i))["denoised"] for i, f in enumerate(frames)]
    which = []
    for i, y in enumerate(outputs):
        match = [n for n in refs if np.allclose(y, refs[n][i], atol=1e-3)]
        assert len(match) == 1, f"frame {i} matches {match}"
        which.append(match[0])
    assert which[0] == "a" and which[-1] == "b"
    assert which == sorted(which)  # once swapped, never back

    # a bad model file is refused and the running model stays
    bad = tmp_path / "bad.lsmodel"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelFileError):
        eng.swap_model(bad)
    assert eng.describe()["model_hash"] == modelfile.load(path_b).hash


# ------------------------------------------------------------------ real data


def _psnr_affine(x: np.ndarray, target: np.ndarray) -> float:
    x = x.astype(np.float64).ravel()
    t = target.astype(np.float64).ravel()
    a = np.stack([x, np.ones_like(x)], 1)
    coef, *_ = np.linalg.lstsq(a, t, rcond=None)
    return float(10 * np.log10(255.0**2 / np.mean((a @ coef - t) ** 2)))


def _held_out_w2s():
    tifffile = pytest.importorskip("tifffile")
    from scipy import ndimage

    pairs = W2S_PAIRS
    meta = modelfile.load(None).metadata["training"]
    held_out = [k for k in ("035_1", "085_1") if k not in meta["data"]]
    # the shipped (supervised) model was trained on neither W2S image: both pairs are held out
    assert held_out == ["035_1", "085_1"], f"the shipped model must leave both W2S pairs out ({meta['data']})"
    scores = {}
    for key in held_out:
        noisy = tifffile.imread(pairs / f"input_avg1_{key}.tif")
        target = tifffile.imread(pairs / f"target_avg400_{key}.tif")
        eng = create_engine("denoise", backend="onnxruntime")
        eng.setup(StreamSpec(shape=noisy.shape, bits=8, dtype="uint8"))
        ours = _psnr_affine(eng.process(noisy, FrameInfo(seq=0))["denoised"], target)
        gauss = max(
            _psnr_affine(ndimage.gaussian_filter(noisy.astype(np.float32), s), target)
            for s in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
        )
        scores[key] = (ours, gauss, _psnr_affine(noisy, target))
    return scores


@pytest.mark.w2s
def test_shipped_model_denoises_held_out_w2s():
    for key, (ours, gauss, raw) in _held_out_w2s().items():
        assert ours > raw + 10.0, (key, ours, raw)
        assert ours > gauss - 1.0, (key, ours, gauss)


@pytest.mark.w2s
def test_shipped_model_beats_best_gaussian_on_both_w2s_pairs():
    # PSNR after an affine fit to the 400-frame average, against the Gaussian whose sigma was
    # chosen on that target; measured in docs/denoising.md (The shipped default model)
    scores = _held_out_w2s()
    assert set(scores) == {"035_1", "085_1"}
    for key, (ours, gauss, _) in scores.items():
        assert ours > gauss, (key, ours, gauss)


def test_shipped_model_denoises_held_out_real_photon_counts():
    """The W2S checks on data in the repository: real low-light noise the shipped model never saw
    (neither this image nor its kind: confocal planes of fluorescent vertical lines, 0-8 counts
    per pixel). The lines run along y, so a plane's mean over its 150 rows is its clean image.
    On the in-focus plane and those 2 planes either side it gains > 9 dB over the raw plane and
    beats the best Gaussian (its sigma chosen against the target, which a user cannot do)."""
    import tifffile
    from scipy import ndimage

    assert "VerticalGrid" not in str(modelfile.load(None).metadata["training"]["data"])
    stack = tifffile.imread(REAL_DATA / "DeconvolutionSampleVerticalGrid1AU-crop.tif")
    focus = int(np.argmax(stack.mean(axis=(1, 2))))
    for z in (focus - 2, focus, focus + 2):
        noisy = stack[z]
        target = np.broadcast_to(noisy.mean(axis=0, dtype=np.float64), noisy.shape)
        eng = create_engine("denoise", backend="onnxruntime")
        eng.setup(StreamSpec(shape=noisy.shape, bits=8, dtype="uint8"))
        ours = _psnr_affine(eng.process(noisy, FrameInfo(seq=0))["denoised"], target)
        gauss = max(
            _psnr_affine(ndimage.gaussian_filter(noisy.astype(np.float32), s), target)
            for s in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
        )
        raw = _psnr_affine(noisy, target)
        # measured (focus 10): ours - raw 10.5 / 10.7 / 10.6 dB, ours - gauss 0.36 / 0.75 / 0.61 dB
        assert ours > raw + 9.0, (z, ours, raw)
        assert ours > gauss, (z, ours, gauss)


def test_engine_with_past_frames(tmp_path):
    path = _model(k=2, seed=4).save(tmp_path / "k2.lsmodel")
    eng = create_engine("denoise", model=str(path), backend="onnxruntime", tile=0)
    eng.setup(StreamSpec(shape=(48, 40)))
    assert eng.window == 2
    rng = np.random.default_rng(0)
    outs = [eng.process(_camera(_scene((48, 40), seed=i)[0], rng), FrameInfo(seq=i))["denoised"] for i in range(4)]
    assert all(o.shape == (48, 40) and np.isfinite(o).all() for o in outs)
    # the past frames are inputs: the same current frame after different pasts gives different output
    f = _camera(_scene((48, 40), seed=9)[0], rng)
    a = eng.process(f, FrameInfo(seq=4))["denoised"]
    eng.process(np.zeros_like(f), FrameInfo(seq=5))
    b = eng.process(f, FrameInfo(seq=6))["denoised"]
    assert not np.allclose(a, b)


# ------------------------------------------------------------------ camera calibration


def _blob_scene(rng, shape=(128, 128)) -> np.ndarray:
    """Smooth cells in photons, 2 to ~40 per pixel: the low-light range where the transform matters."""
    from scipy import ndimage

    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    img = np.full(shape, 2.0, np.float32)
    for _ in range(25):
        cy, cx = rng.uniform(0, shape[0], 2)
        s = rng.uniform(2, 6)
        img += rng.uniform(10, 40) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return ndimage.gaussian_filter(img, 1.0)


def _engine(spec=None, **kw):
    eng = create_engine("denoise", backend="onnxruntime", tile=0, **kw)
    eng.setup(spec or StreamSpec(shape=(128, 128)))
    return eng


def test_calibration_sets_the_variance_stabilising_transform():
    from livescope.engines.calibrate import NoiseModel

    rng = np.random.default_rng(7)
    gain, offset, read = 2.0, 100.0, 3.0
    photons = np.tile(np.linspace(1, 400, 128, dtype=np.float32), (128, 1))
    raw = _camera(photons, rng, gain=gain, offset=offset, read=read)
    truth = gain * photons + offset

    def stabilised_noise(eng):
        eng.process(raw, FrameInfo(seq=0))
        n = eng._norm
        r = (n.forward(raw) - n.forward(truth)) * (n.high - n.low)
        return float(r[:, :16].std()), float(r[:, -16:].std())  # dark, bright

    right = _engine(gain=gain, offset=offset, read_noise=read)
    dark, bright = stabilised_noise(right)
    assert dark == pytest.approx(1.0, abs=0.08) and bright == pytest.approx(1.0, abs=0.08)
    d = right.describe()
    assert d["noise_source"] == "gain, offset, read_noise parameters"
    assert d["normalisation"]["gain"] == gain and d["normalisation"]["offset"] == offset
    assert d["normalisation"]["read_var"] == pytest.approx(read**2 + 1 / 12)
    # a gain 4x too high over-compresses the bright end: its noise comes out at about half
    _, bright_wrong = stabilised_noise(_engine(gain=4 * gain, offset=offset, read_noise=read))
    assert bright_wrong < 0.65
    # the same camera as a calibration (livescope calibrate's dict, a JSON file, the stream's)
    cal = NoiseModel.from_camera(gain, offset, read).as_dict()
    for eng in (
        _engine(calibration=cal),
        _engine(spec=StreamSpec(shape=(128, 128), extra={"calibration": cal})),
        _engine(
            spec=StreamSpec(shape=(128, 128), camera_gain=gain, camera_offset=offset, extra={"camera_read_noise": read})
        ),
    ):
        assert stabilised_noise(eng) == pytest.approx((dark, bright), abs=1e-4)
    # without dark frames a calibration knows only the line's intercept: the same transform
    line = NoiseModel(gain=gain, intercept=read**2 + 1 / 12 - gain * offset).as_dict()
    assert stabilised_noise(_engine(calibration=line)) == pytest.approx((dark, bright), abs=0.02)
    # an EMCCD's excess noise: the transform takes the photon-transfer slope gain * F^2
    em = _engine(gain=1.0, offset=offset, read_noise=read, excess_noise=2**0.5)
    em.process(raw, FrameInfo(seq=0))
    assert em._norm.gain == pytest.approx(2.0)
    # set live: the next frame uses it
    right.set_param("gain", str(4 * gain))
    assert right._norm is None and stabilised_noise(right)[1] == pytest.approx(bright_wrong)
    with pytest.raises(Exception, match="livescope calibrate"):
        _engine(calibration="/nonexistent/cal.json")


def test_right_calibration_denoises_better_than_a_wrong_one():
    rng = np.random.default_rng(0)
    gain, offset, read = 2.0, 100.0, 3.0
    cases = {
        "right": dict(gain=gain, offset=offset, read_noise=read),
        "fitted": {},
        "gain x4": dict(gain=4 * gain, offset=offset, read_noise=read),
        "read noise x4": dict(gain=gain, offset=offset, read_noise=4 * read),
        "offset +30": dict(gain=gain, offset=offset + 30, read_noise=read),
    }
    engines = {k: _engine(**kw) for k, kw in cases.items()}
    err = {k: 0.0 for k in cases}
    for _ in range(2):
        photons = _blob_scene(rng)
        raw = _camera(photons, rng, gain=gain, offset=offset, read=read)
        truth = gain * photons + offset
        for k, eng in engines.items():
            eng._norm = None  # each frame a new stream
            err[k] += float(np.sqrt(np.mean((eng.process(raw, FrameInfo(seq=0))["denoised"] - truth) ** 2)))
    # measured (rms error, ADU): right 1.75, fitted 1.74, gain x4 2.04, read noise x4 2.13,
    # offset +30 17 (the offset clips the dark background); raw 6.0
    assert err["right"] < 0.92 * err["gain x4"] and err["right"] < 0.92 * err["read noise x4"]
    assert err["right"] < 0.3 * err["offset +30"]
    assert err["right"] < 1.05 * err["fitted"]  # no worse than fitting the noise on the frame itself


def test_a_degenerate_fitted_gain_gives_no_overflow(monkeypatch):
    """A nearly flat, low-count frame can fit a gain of ~1e-16 (seen in about 1 of 3000 training
    crops); the transform must then fall back to no VST instead of overflowing float32."""
    from livescope.engines import inference

    monkeypatch.setattr(inference, "estimate_noise", lambda frame: (1e-16, 0.5))
    frame = np.random.default_rng(0).poisson(2.0, (64, 64)).astype(np.float32)
    norm = inference.Normalisation.estimate(frame)
    assert norm.gain == 0.0
    y = norm.forward(frame)
    assert np.isfinite(y).all() and np.isfinite(norm.inverse(y)).all()
