"""Self-tuning deconvolution by photon splitting, and FRC resolution (engines/selftune.py), on a
real image (tests/data/real: the cancer-cell nuclei, CC BY 4.0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from livescope.engines.psf import gaussian_psf
from livescope.engines.rl import forward, make_plan, richardson_lucy, rl_iterates
from livescope.engines.selftune import (
    Candidate,
    candidates,
    frc_resolution,
    split_photons,
    to_photons,
    tune_deconvolution,
)

REAL = Path(__file__).resolve().parents[1] / "data" / "real" / "cancer_cell_migration_crop.tif"


def _truth() -> np.ndarray:
    img = tifffile.imread(REAL)[0].astype(np.float64)
    img = np.maximum(img - np.percentile(img, 1), 0)
    return img / img.max()


def _blur(x: np.ndarray, psf: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(forward(x.astype(np.float32), make_plan(psf, x.shape, "rl", np, boundary="dct"))), 0)


def _psnr(x, truth):
    a = np.vstack([x.ravel(), np.ones(x.size)]).T
    coef, *_ = np.linalg.lstsq(a, truth.ravel(), rcond=None)
    return 10 * np.log10(np.ptp(truth) ** 2 / np.mean((truth - (coef[0] * x + coef[1])) ** 2))


def test_splitting_keeps_every_photon_and_shares_them_by_p():
    counts = np.random.default_rng(0).poisson(30.0, (64, 64))
    a, b = split_photons(counts, 0.8, np.random.default_rng(1))
    np.testing.assert_array_equal(a + b, counts)
    assert abs(a.sum() / counts.sum() - 0.8) < 0.01
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_photons(counts, 1.0)
    with pytest.raises(ValueError, match="livescope calibrate"):
        to_photons(counts, gain=0.0, offset=100.0)
    np.testing.assert_array_equal(to_photons(counts * 2.0 + 100, gain=2.0, offset=100.0), counts)


def test_each_iterate_is_what_that_many_iterations_give():
    data = _blur(_truth() * 200, gaussian_psf(2.0)).astype(np.float32)
    plan = make_plan(gaussian_psf(2.0), data.shape, "wb", np, boundary="dct")
    its = [np.array(e) for e in rl_iterates(data, plan, 4)]
    for k in (1, 4):
        np.testing.assert_allclose(its[k - 1], np.asarray(richardson_lucy(data, plan, k)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("sigma", "peak"), [(1.5, 50), (2.5, 400)])
def test_the_setting_picked_from_the_frame_alone_is_within_0_2_db_of_the_best_in_hindsight(sigma, peak):
    truth, psf = _truth() * peak, gaussian_psf(sigma)
    counts = np.random.default_rng(3).poisson(_blur(truth, psf)).astype(np.float64)
    res = tune_deconvolution(counts, psf, rng=np.random.default_rng(4))
    cands = candidates()
    scores = {}
    for c in cands:
        plan = make_plan(psf, counts.shape, c.method, np, boundary="dct", **({"alpha": c.alpha} if c.alpha else {}))
        scores[c] = _psnr(np.asarray(richardson_lucy(counts.astype(np.float32), plan, c.iterations)), truth)
    best = max(scores.values())
    assert scores[res.best] > best - 0.2, (res.best, scores[res.best], best)
    assert scores[res.best] > scores[Candidate("wb", 2, 0.01)] + 0.3  # better than the fixed default
    assert res.summary()["best"] == res.best.params()


def test_frc_resolution_follows_the_psf_width_and_reads_in_nm():
    truth = _truth() * 400
    rng = np.random.default_rng(5)
    res = []
    for sigma in (1.0, 2.0, 3.0):
        a, b = split_photons(rng.poisson(_blur(truth, gaussian_psf(sigma))), 0.5, rng)
        res.append(frc_resolution(a, b))
    assert res[0] < res[1] < res[2], res
    a, b = split_photons(rng.poisson(_blur(truth, gaussian_psf(2.0))), 0.5, rng)
    assert frc_resolution(a, b, pixel_size_nm=100.0) == pytest.approx(100.0 * frc_resolution(a, b), rel=1e-6)
    noise = rng.poisson(5.0, (2, 64, 64)).astype(float)  # two images sharing nothing
    assert np.isnan(frc_resolution(noise[0], noise[1]))


def test_the_start_is_a_candidate_only_when_asked_and_each_iterate_follows_its_start():
    from livescope.engines import selftune

    assert {c.start for c in candidates()} == {"flat"} == set(selftune.STARTS)  # docs/selftune.md: measured
    both = candidates(rl_counts=(1, 2), wb_counts=(1,), wb_alphas=(0.01,), starts=("flat", "image"))
    assert {(c.method, c.start) for c in both} == {(m, s) for m in ("rl", "wb") for s in ("flat", "image")}
    assert Candidate("rl", 2).params() == {"method": "rl", "iterations": 2}  # what the daemon sets today
    assert Candidate("rl", 2, start="image").params() == {"method": "rl", "iterations": 2, "start": "image"}
    truth, psf = _truth() * 400, gaussian_psf(1.5)
    counts = np.random.default_rng(3).poisson(_blur(truth, psf)).astype(np.float64)
    plan = make_plan(psf, counts.shape, "wb", np, boundary="dct")
    its = [np.array(e) for e in rl_iterates(counts.astype(np.float32), plan, 3, start="image")]
    ref = np.asarray(richardson_lucy(counts.astype(np.float32), plan, 3, start="image"))
    np.testing.assert_allclose(its[-1], ref, rtol=1e-5, atol=1e-4)
    res = tune_deconvolution(counts, psf, rng=np.random.default_rng(4), rl_counts=(1, 2, 4), wb_counts=(1, 2),
                             wb_alphas=(0.01,), starts=("flat", "image"))  # fmt: skip
    assert {c.start for c in res.scores} == {"flat", "image"} and len(res.scores) == 10
    with pytest.raises(Exception, match="start must be one of"):
        tune_deconvolution(counts, psf, starts=("zero",))


@pytest.mark.parametrize(("peak", "denoise_first"), [(50, True), (4000, False)])
def test_the_split_decides_whether_to_denoise_before_deconvolving(peak, denoise_first):
    """With the shipped denoiser as a candidate input: at 50 photons deconvolving the denoised
    frame wins (measured +0.7 dB here), at 4000 the raw one (denoising first costs 0.3 dB); the
    criterion sees it from the frame alone, and its pick is the better of the two in hindsight."""
    from livescope.engines import FrameInfo, StreamSpec, create_engine

    eng = create_engine("denoise", backend="onnxruntime", tile=0, gain=1.0, offset=0.0)

    def denoiser(x):
        eng.setup(StreamSpec(shape=x.shape, camera_offset=0.0, camera_gain=1.0))
        return eng.process(x.astype(np.float32), FrameInfo(seq=0))["denoised"]

    truth, psf = _truth() * peak, gaussian_psf(1.5)
    counts = np.random.default_rng(1).poisson(_blur(truth, psf)).astype(np.float64)
    counts_rl = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
    res = tune_deconvolution(counts, psf, rng=np.random.default_rng(7), denoiser=denoiser, wb_counts=())
    assert res.best.denoised is denoise_first and res.summary()["denoise_first"] is denoise_first
    assert {c.denoised for c in res.scores} == {False, True}
    plan = make_plan(psf, counts.shape, "rl", np, boundary="dct")
    best = {}
    for flag, source in ((False, counts), (True, np.maximum(denoiser(counts), 0))):
        best[flag] = max(
            _psnr(np.asarray(e), truth)
            for k, e in enumerate(rl_iterates(np.asarray(source, np.float32), plan, 48), start=1)
            if k in counts_rl
        )
    assert best[denoise_first] > best[not denoise_first], best
