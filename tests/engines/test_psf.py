"""PSFs: models, the measured bead PSF, cleaning, resampling and refusal of bad ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livescope.engines import psf as P
from livescope.engines.base import EngineError
from tests.conftest import REAL_DATA

BEADS_PSF = REAL_DATA / "psf_from_beads.tif"


def centroid(a: np.ndarray) -> np.ndarray:
    g = np.indices(a.shape).reshape(a.ndim, -1)
    return (g * a.ravel()).sum(axis=1) / a.sum()


def test_gaussian_psf_is_normalised_centred_and_has_the_right_width() -> None:
    psf = P.gaussian_psf(2.0)
    assert psf.shape[0] % 2 == 1 and psf.shape[1] % 2 == 1
    assert psf.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(centroid(psf), np.array(psf.shape) // 2, atol=1e-9)
    # pixel integration widens a sampled Gaussian a little: FWHM^2 ~ (2.355 sigma)^2 + 1/12 * 2.355^2
    fwhm = P.fwhm_px(psf)
    assert fwhm[0] == pytest.approx(P.FWHM_PER_SIGMA * 2.0, rel=0.03)
    psf3 = P.gaussian_psf((2.0, 1.0, 1.0), ndim=3)
    assert psf3.ndim == 3 and P.fwhm_px(psf3)[0] > 1.8 * P.fwhm_px(psf3)[1]


def test_widefield_model_matches_the_airy_width_and_is_sampled_by_binning() -> None:
    # Airy FWHM = 0.51 lambda / NA
    psf = P.widefield_psf(1.4, 520, 1.515, 0.04)
    expected = 0.51 * 0.520 / 1.4 / 0.04
    assert P.fwhm_px(psf)[1] == pytest.approx(expected, rel=0.08)
    assert psf.sum() == pytest.approx(1.0)
    # twice the pixel size: half the width in pixels (the model integrates over the pixel)
    coarse = P.widefield_psf(1.4, 520, 1.515, 0.08)
    assert P.fwhm_px(coarse)[1] == pytest.approx(max(1.0, expected / 2), rel=0.2)
    # 3-D: wider along z than laterally (in um)
    vol = P.widefield_psf(1.0, 520, 1.33, 0.1, z_step_um=0.2)
    fz, fy, _ = P.fwhm_px(vol)
    assert fz * 0.2 > 2 * fy * 0.1
    with pytest.raises(P.PSFError, match="na must be"):
        P.widefield_psf(1.6, 520, 1.515, 0.1)


def test_real_bead_psf_is_recentred_on_its_centroid() -> None:
    raw = P.load_psf(BEADS_PSF)
    peak = np.unravel_index(int(np.argmax(raw)), raw.shape)
    assert peak != tuple(n // 2 for n in raw.shape)  # the file's peak is off-centre
    psf = P.clean_psf(raw)
    assert psf.sum() == pytest.approx(1.0)
    assert psf.min() >= 0
    np.testing.assert_allclose(centroid(psf), np.array(psf.shape) // 2, atol=0.05)
    # the brightest voxel ends up closer to the centre (not on it: the bead PSF is asymmetric)
    new_peak = np.array(np.unravel_index(int(np.argmax(psf)), psf.shape))
    before = np.abs(np.array(peak) - np.array(raw.shape) // 2).max()
    assert np.abs(new_peak - np.array(psf.shape) // 2).max() < before
    # confocal bead PSF at 0.022 x 0.022 x 0.125 um voxels: ~0.2 um laterally, ~0.5 um axially
    fz, fy, fx = P.fwhm_px(psf)
    assert 0.1 < fy * 0.022 < 0.4 and 0.1 < fx * 0.022 < 0.4
    assert 0.3 < fz * 0.125 < 1.0
    # resampled to twice coarser lateral pixels: half the lateral width, same axial width
    half = P.resample_psf(psf, (0.125, 0.022, 0.022), (0.125, 0.044, 0.044))
    hz, hy, hx = P.fwhm_px(half)
    assert hy == pytest.approx(max(1.0, fy / 2), rel=0.25)
    assert hz == pytest.approx(fz, rel=0.25)
    # 3-D -> 2-D: the in-focus plane is narrower than the projection's wide skirt holds
    plane = P.psf_to_2d(psf, "plane")
    proj = P.psf_to_2d(psf, "projection")
    assert plane.ndim == proj.ndim == 2
    assert plane.max() > proj.max()


def test_clean_psf_removes_background_and_noise() -> None:
    rng = np.random.default_rng(3)
    bead = P.gaussian_psf(2.0)
    img = np.zeros((41, 41))
    img[10 : 10 + bead.shape[0], 14 : 14 + bead.shape[1]] = bead * 5000  # off-centre bead
    img += 100 + rng.normal(0, 2, img.shape)  # camera offset and read noise
    psf = P.clean_psf(img)
    assert psf.sum() == pytest.approx(1.0)
    assert P.fwhm_px(psf)[0] == pytest.approx(P.fwhm_px(bead)[0], rel=0.1)
    np.testing.assert_allclose(centroid(psf), np.array(psf.shape) // 2, atol=0.05)
    # the background left over after cleaning carries almost no flux
    r = psf.shape[0] // 2
    yy, xx = np.indices(psf.shape) - r
    assert psf[(yy**2 + xx**2) > 9**2].sum() < 0.01


@pytest.mark.parametrize(
    ("psf", "message"),
    [
        (np.full((9, 9), np.nan), "NaN"),
        (np.zeros((9, 9)), "empty"),
        (np.zeros((0, 5)), "empty"),
        (-P.gaussian_psf(1.5) + 1e-4, "negative"),
        (np.ones(7), "2-D"),
        (np.array([["a"]]), "real numbers"),
    ],
)
def test_bad_psfs_are_refused_with_a_reason(psf: np.ndarray, message: str) -> None:
    with pytest.raises(P.PSFError, match=message):
        P.clean_psf(psf)


def test_psf_error_is_an_engine_error_and_missing_file_is_named(tmp_path: Path) -> None:
    assert issubclass(P.PSFError, EngineError)
    with pytest.raises(P.PSFError, match="does not exist"):
        P.load_psf(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(P.PSFError, match="cannot read"):
        P.load_psf(bad)


def test_flat_noise_without_a_bead_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(P.PSFError, match="no signal|empty"):
        P.clean_psf(100 + rng.normal(0, 1, (21, 21)) * 0)  # perfectly flat: nothing above background
