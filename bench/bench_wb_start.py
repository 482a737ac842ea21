"""Where Richardson-Lucy starts: a flat estimate (livescope) or the image itself (Guo et al.'s code).

From a flat start the first iteration is one back projection of the data (2 transforms); from
the image it is a full step (4 transforms). Which start restores better is measured here on real
data, for the Wiener-Butterworth (WB, alpha 0.01, the engine's) and the classic (RL) back
projector, at 1, 2, 3 and 5 iterations:

a. the real bead z-stack (41x150x150, confocal, 0.022 x 0.022 x 0.125 um) deconvolved with the
   PSF measured from those beads: lateral and axial FWHM of 3-D Gaussians fitted to every bead
   found in the raw stack (median over the beads);
b. the real line grid (21x150x150, 0-8 counts: low light), same PSF: the line profile's
   contrast (max - min) / (max + min) and its modulation at the grid's own frequency (brightest
   plane, averaged along the lines), and the FRC resolution of two restored photon halves;
c. real 2-D images as ground truth (the two W2S 400-frame averages and the nuclei frame of
   bench_selftune.py), blurred by Gaussian PSFs of sigma 1.5 and 2.5 px, 50 / 400 / 4000 photons
   at the brightest pixel, Poisson noise, offset 100: PSNR after an affine fit to the truth
   (bench_selftune's scoring), at 1, 2, 3, 5 iterations and each start's best count (RL 1-48,
   WB 1-6; chosen with the truth), and what the self-tuner picks when both starts are its
   candidates;
d. time per frame / stack for each start (the engine, warm; best of 3).

    python bench/bench_wb_start.py              # everything (~4 min on the 2-core VM)
    python bench/bench_wb_start.py --part c     # one part
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage, optimize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deconvolve import timed  # noqa: E402  (best of 3 after a warm-up run)
from bench_selftune import images, psnr_fit  # noqa: E402

from livescope.engines import FrameInfo, StreamSpec, create_engine  # noqa: E402
from livescope.engines import psf as P  # noqa: E402
from livescope.engines.rl import forward, make_plan, rl_iterates  # noqa: E402
from livescope.engines.selftune import (  # noqa: E402
    Candidate,
    frc_resolution,
    split_photons,
    to_photons,
    tune_deconvolution,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "real"
STARTS = ("flat", "image")
METHODS = ("wb", "rl")
ITS = (1, 2, 3, 5)
VOXEL = (0.125, 0.022, 0.022)  # um, z y x
FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


def real(name: str) -> np.ndarray:
    path = DATA / name if (DATA / name).exists() else REPO_DATA / name
    return tifffile.imread(path).astype(np.float32)


class Volume:
    """The deconvolve engine on a stack, one per back projector; iterations and start set live."""

    def __init__(self, psf: np.ndarray, offset: float, shape: tuple[int, ...]) -> None:
        self.engines = {}
        for method in METHODS:
            eng = create_engine("deconvolve", psf=psf, volume=True, method=method, offset=offset)
            eng.setup(StreamSpec(shape=shape))
            self.engines[method] = eng

    def run(self, stack: np.ndarray, method: str, its: int, start: str, repeat: int = 0) -> tuple[np.ndarray, float]:
        eng = self.engines[method]
        eng.set_param("iterations", its)
        eng.set_param("start", start)

        def call() -> np.ndarray:
            return eng.process(stack, FrameInfo(seq=0))["deconvolved"]

        if repeat:
            return timed(call, repeat)
        return call(), float("nan")


# -- a. beads -------------------------------------------------------------------------------------
def find_beads(stack: np.ndarray, box: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    smooth = ndimage.gaussian_filter(stack.astype(np.float64), (1.0, 2.0, 2.0))
    bg = float(np.median(smooth))
    peaks = (smooth == ndimage.maximum_filter(smooth, size=(9, 21, 21))) & (smooth > bg + 0.15 * (smooth.max() - bg))
    out = []
    for z, y, x in zip(*np.nonzero(peaks), strict=True):
        if all(b <= c < n - b for c, n, b in zip((z, y, x), stack.shape, box, strict=True)):
            out.append((int(z), int(y), int(x)))
    return out


def _gauss3(coords: np.ndarray, a: float, z0: float, y0: float, x0: float, sz: float, sy: float, sx: float,
            c: float) -> np.ndarray:  # fmt: skip
    z, y, x = coords
    return a * np.exp(-((z - z0) ** 2 / (2 * sz**2) + (y - y0) ** 2 / (2 * sy**2) + (x - x0) ** 2 / (2 * sx**2))) + c


def fit_bead(stack: np.ndarray, centre: tuple[int, int, int], box: tuple[int, int, int]) -> tuple[float, float]:
    """Lateral and axial FWHM (um) of a 3-D Gaussian (with a constant) fitted around one bead
    (re-centred on the brightest voxel within 2 voxels of where it was found); nan where the
    fit fails."""
    near = tuple(slice(c - 2, c + 3) for c in centre)
    off = np.unravel_index(int(np.argmax(stack[near])), stack[near].shape)
    centre = tuple(c - 2 + int(o) for c, o in zip(centre, off, strict=True))
    sl = tuple(slice(c - b, c + b + 1) for c, b in zip(centre, box, strict=True))
    v = stack[sl].astype(np.float64)
    coords = np.indices(v.shape).reshape(3, -1).astype(np.float64)
    base = float(np.percentile(v, 10))
    p0 = (v.max() - base, box[0], box[1], box[2], 2.0, 3.0, 3.0, base)
    lo = (0, box[0] - 2, box[1] - 2, box[2] - 2, 0.3, 0.3, 0.3, -np.inf)
    hi = (np.inf, box[0] + 2, box[1] + 2, box[2] + 2, 2 * box[0], 2 * box[1], 2 * box[2], np.inf)
    try:
        p, _ = optimize.curve_fit(_gauss3, coords, v.ravel(), p0=p0, bounds=(lo, hi), maxfev=2000)
    except RuntimeError:
        return float("nan"), float("nan")
    lateral = FWHM * 0.5 * (p[5] + p[6]) * VOXEL[1]
    return float(lateral), float(FWHM * p[4] * VOXEL[0])


def bead_fwhm(stack: np.ndarray, beads: list[tuple[int, int, int]], box: tuple[int, int, int]) -> tuple[str, str]:
    """Median lateral and axial FWHM over the beads, each with the spread (max - min) of the beads:
    a wide spread says the fits failed (beads sharpened to a voxel or two, ringing)."""
    fits = np.array([fit_bead(stack, b, box) for b in beads])
    return tuple(f"{np.nanmedian(f):.3f} ({np.nanmax(f) - np.nanmin(f):.3f})" for f in fits.T)  # type: ignore[return-value]


def part_a(psf: np.ndarray) -> None:
    beads = real("Bead_Image1_crop.tif")
    box = (6, 12, 12)
    found = find_beads(beads, box)
    offset = float(np.median(beads))  # the flat background, mostly offset
    lat, ax = bead_fwhm(beads, found, box)
    print(f"\n### a. Bead stack {beads.shape}: median FWHM of {len(found)} beads (3-D Gaussian fits), um\n")
    print("(in brackets: max - min over the beads)\n")
    print("| back projector | iterations | flat: lateral | flat: axial | image: lateral | image: axial "
          "| flat s | image s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| raw | | {lat} | {ax} | | | | |")
    vol = Volume(psf, offset, beads.shape)
    for method in METHODS:
        for its in ITS:
            cells, secs = [], []
            for start in STARTS:
                out, t = vol.run(beads, method, its, start, repeat=1)
                cells.append(bead_fwhm(out, found, box))
                secs.append(t)
            print(
                f"| {method.upper()} | {its} | {cells[0][0]} | {cells[0][1]} | {cells[1][0]} "
                f"| {cells[1][1]} | {_s(secs[0])} | {_s(secs[1])} |",
                flush=True,
            )


def _s(t: float) -> str:
    return "" if np.isnan(t) else f"{t:.2f}"


# -- b. line grid ---------------------------------------------------------------------------------
def _profile(v: np.ndarray, z: int) -> np.ndarray:
    return v[z].astype(np.float64).mean(axis=0)  # vertical lines: along x, averaged over y


def contrast(v: np.ndarray, z: int) -> float:
    prof = _profile(v, z)
    return float((prof.max() - prof.min()) / (prof.max() + prof.min()))


def modulation(v: np.ndarray, z: int, k: int) -> float:
    """Twice the profile's Fourier amplitude at the grid frequency over its mean: 1 = full."""
    spec = np.abs(np.fft.rfft(_profile(v, z)))
    return float(2.0 * spec[k] / spec[0])


def part_b(psf: np.ndarray) -> None:
    grid = real("DeconvolutionSampleVerticalGrid1AU-crop.tif")
    offset = float(np.percentile(grid, 1))
    z = int(np.argmax(grid.reshape(grid.shape[0], -1).mean(axis=1)))
    k = int(np.argmax(np.abs(np.fft.rfft(_profile(grid, z)))[2:])) + 2  # the lines' own frequency
    halves = split_photons(np.rint(np.maximum(grid - offset, 0)), 0.5, np.random.default_rng(3))
    vol = Volume(psf, offset, grid.shape)
    half_vol = Volume(psf, 0.0, grid.shape)
    print(f"\n### b. Line grid {grid.shape}: plane {z}, grid period {grid.shape[2] / k:.1f} px\n")
    print("contrast = (max - min) / (max + min) of the line profile; modulation = at the grid's frequency;")
    print("FRC = resolution (px) shared by the two restored photon halves of the stack (plane z)\n")
    print("| back projector | iterations | flat: contrast | flat: modulation | flat: FRC px | image: contrast "
          "| image: modulation | image: FRC px | flat s | image s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    frc_raw = frc_resolution(halves[0][z], halves[1][z])
    print(f"| raw | | {contrast(grid, z):.3f} | {modulation(grid, z, k):.3f} | {frc_raw:.2f} | | | | | |")
    for method in METHODS:
        for its in ITS:
            cells, secs = [], []
            for start in STARTS:
                out, t = vol.run(grid, method, its, start, repeat=1)
                ra = half_vol.run(halves[0], method, its, start)[0]
                rb = half_vol.run(halves[1], method, its, start)[0]
                cells.append((contrast(out, z), modulation(out, z, k), frc_resolution(ra[z], rb[z])))
                secs.append(t)
            f, i = cells
            print(
                f"| {method.upper()} | {its} | {f[0]:.3f} | {f[1]:.3f} | {f[2]:.2f} | {i[0]:.3f} | {i[1]:.3f} "
                f"| {i[2]:.2f} | {_s(secs[0])} | {_s(secs[1])} |",
                flush=True,
            )


# -- c. real 2-D images with ground truth ---------------------------------------------------------
MAX_ITS = {"rl": 48, "wb": 6}


def sweep(counts: np.ndarray, psf: np.ndarray, truth: np.ndarray, method: str, start: str) -> dict[int, float]:
    plan = make_plan(psf, counts.shape, method, np, boundary="dct")
    data = counts.astype(np.float32)
    return {
        k: psnr_fit(np.asarray(e), truth)
        for k, e in enumerate(rl_iterates(data, plan, MAX_ITS[method], start=start), 1)
    }


def part_c() -> None:
    rng = np.random.default_rng(1)
    print("\n### c. Real 2-D images as truth: PSNR dB (affine fit), flat / image start\n")
    print("| image | sigma | photons | raw | WB 1 | WB 2 | WB 3 | WB 5 | RL 1 | RL 2 | RL 3 | RL 5 "
          "| WB best (it.) | RL best (it.) | tuner, flat only | tuner, both starts |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    wins: dict[str, list[float]] = {}
    for name, img in images(False).items():
        img = img - np.percentile(img, 1)
        img = np.maximum(img, 0) / img.max()
        for sigma in (1.5, 2.5):
            psf = P.gaussian_psf(sigma)
            for peak in (50, 400, 4000):
                truth = img * peak
                blurred = np.maximum(
                    forward(truth.astype(np.float32), make_plan(psf, truth.shape, "rl", np, boundary="dct")), 0
                )
                counts = to_photons(rng.poisson(blurred) + 100.0, gain=1.0, offset=100.0)
                res = {(m, s): sweep(counts, psf, truth, m, s) for m in METHODS for s in STARTS}
                cells = []
                for m in METHODS:
                    for k in ITS:
                        f, i = res[(m, "flat")][k], res[(m, "image")][k]
                        wins.setdefault(f"{m} {k}", []).append(i - f)
                        cells.append(f"{f:.2f} / {i:.2f}")
                best = []
                for m in METHODS:
                    parts = []
                    for s in STARTS:
                        kb = max(res[(m, s)], key=lambda k, m=m, s=s: res[(m, s)][k])
                        parts.append(f"{res[(m, s)][kb]:.2f} ({kb})")
                    wins.setdefault(f"{m} best", []).append(
                        max(res[(m, "image")].values()) - max(res[(m, "flat")].values())
                    )
                    best.append(" / ".join(parts))
                tuned = []
                for starts in (("flat",), STARTS):
                    t = tune_deconvolution(counts, psf, rng=np.random.default_rng(7), starts=starts)
                    tuned.append(f"{_short(t.best)} {_score(t.best, counts, psf, truth):.2f}")
                print(
                    f"| {name} | {sigma} | {peak} | {psnr_fit(counts, truth):.2f} | " + " | ".join(cells)
                    + " | " + " | ".join(best) + " | " + " | ".join(tuned) + " |",
                    flush=True,
                )  # fmt: skip
    print("\nimage - flat, dB, over the 18 cases: min / median / max\n")
    print("| setting | min | median | max | image better in |")
    print("|---|---|---|---|---|")
    for key, d in wins.items():
        a = np.array(d)
        print(
            f"| {key} | {a.min():+.2f} | {np.median(a):+.2f} | {a.max():+.2f} | {int((a > 0.05).sum())} of {a.size} |"
        )


def _score(c: Candidate, counts: np.ndarray, psf: np.ndarray, truth: np.ndarray) -> float:
    plan = make_plan(psf, counts.shape, c.method, np, boundary="dct", **({"alpha": c.alpha} if c.alpha else {}))
    *_, est = rl_iterates(counts.astype(np.float32), plan, c.iterations, start=c.start)
    return psnr_fit(np.asarray(est), truth)


def _short(c: Candidate) -> str:
    return (
        f"{c.method} {c.iterations}" + (f" a={c.alpha:g}" if c.alpha else "") + ("" if c.start == "flat" else " image")
    )


# -- d. time per frame ----------------------------------------------------------------------------
def part_d() -> None:
    print("\n### d. Time per 512x512 frame (engine, Gaussian PSF sigma 1.5 px, dct boundary; best of 5, warm)\n")
    print("| back projector | iterations | flat s | image s | image / flat |")
    print("|---|---|---|---|---|")
    frame = np.random.default_rng(0).poisson(200.0, (512, 512)).astype(np.float32)
    for method in METHODS:
        eng = create_engine("deconvolve", method=method, offset=0)
        eng.setup(StreamSpec(shape=frame.shape))
        for its in ITS:
            ts = []
            for start in STARTS:
                eng.set_param("iterations", its)
                eng.set_param("start", start)
                ts.append(timed(lambda eng=eng: eng.process(frame, FrameInfo(seq=0)), repeat=5)[1])
            print(f"| {method.upper()} | {its} | {ts[0] * 1e3:.1f} ms | {ts[1] * 1e3:.1f} ms | {ts[1] / ts[0]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", action="append", choices=["a", "b", "c", "d"])
    args = ap.parse_args()
    parts = args.part or ["a", "b", "c", "d"]
    psf = P.clean_psf(real("psf_from_beads.tif"))
    if "a" in parts:
        part_a(psf)
    if "b" in parts:
        part_b(psf)
    if "c" in parts:
        part_c()
    if "d" in parts:
        part_d()


if __name__ == "__main__":
    main()
