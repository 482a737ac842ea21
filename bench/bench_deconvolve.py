"""Deconvolution benchmark: livescope's WB / RL against scikit-image's richardson_lucy.

Run:  python bench/bench_deconvolve.py  [--quick] [--part 1 --part 2 ...]
Prints markdown tables (copied into docs/deconvolution.md). Data: ../shared/data (real images).

1. A real 2-D image (W2S widefield target, averaged over 400 frames, 512x512) taken as the
   object, blurred with a known widefield PSF (NA 0.8, 520 nm, 0.1 um pixels) and given Poisson
   noise: PSNR / SSIM against the object versus iterations and seconds; the time each method
   needs to reach the best PSNR scikit-image reaches; head to head, interleaved, both of
   livescope's boundaries (dct: no padding, mirror-symmetric PSFs; reflect: padded FFT).
2. Time per 512x512 and 2048x2048 frame, and per 64x512x512 stack (64 planes, and as one 3-D
   volume), with the engine's defaults.
3. Real 3-D data without ground truth: the bead image deconvolved with the PSF measured from
   those beads (bead FWHM before / after), and the line grid (line contrast before / after).
4. WB parameters (alpha, order, beta, cutoff) against matched RL's best error on the synthetic
   sparse scene of the tests, and where the remaining error lies by spatial frequency.

scikit-image's RL needs its input normalised to [0, 1] and ``clip=False`` (its default clip=True
clips the estimate to [-1, 1] each iteration, which breaks RL on unnormalised data).

RedLionfish (parts 1-3) runs in a venv of its own through bench/redlionfish_worker.py
(``--redlionfish-python``, default /tmp/rlf-venv/bin/python; left out with a message where that
is missing): its OpenCL RL, which on a machine without a GPU runs on pocl's CPU driver, and its
scipy RL, both classic RL with periodic boundaries; each call timed inside its worker.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.signal
import tifffile

from livescope.engines import FrameInfo, StreamSpec, create_engine
from livescope.engines import deconvolve as D
from livescope.engines import psf as P

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def timed(fn, repeat: int = 3, warm: bool = True):
    """Best of ``repeat`` runs, after one untimed warm-up run (caches, plans, allocator) unless
    ``warm=False`` (slow runs, and runs that are meant to include the first call's setup)."""
    out = fn() if warm else None
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


class RedLionfish:
    """RedLionfish (Rosalind Franklin Institute) in its own venv, through bench/redlionfish_worker.py:
    its OpenCL RL (on pocl's CPU driver where no GPU is present) and its scipy RL. Inputs go over
    as .npy files once per ``load``; each call is timed inside the worker."""

    def __init__(self, python: str) -> None:
        import json
        import subprocess
        import tempfile

        self._json = json
        self.dir = Path(tempfile.mkdtemp(prefix="rlf-"))
        worker = Path(__file__).with_name("redlionfish_worker.py")
        self.proc = subprocess.Popen(
            [python, str(worker), str(self.dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.device = self._reply()["opencl_device"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the RedLionfish worker died (see its traceback above)")
        return self._json.loads(line)

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(self._json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def load(self, data: np.ndarray, psf: np.ndarray) -> None:
        """RedLionfish takes 3-D arrays only, and along an axis of size 1 it leaves the PSF
        uncirculated (``circulify3D`` skips the whole array), which shifts every convolution by
        half the frame: a 2-D frame goes over as two identical planes (a z-period of 2, which
        the 1-plane PSF's convolution leaves unchanged), and plane 0 comes back."""
        data = np.asarray(data, np.float32)
        self.planar = data.ndim == 2
        if self.planar:
            data = np.stack([data, data])
        np.save(self.dir / "data.npy", data)
        np.save(self.dir / "psf.npy", np.asarray(psf, np.float32).reshape((-1, *psf.shape[-2:])))
        self._ask(load=True)

    def seconds(self, path: str, niter: int) -> float:
        return float(self._ask(path=path, niter=niter)["seconds"])

    def result(self, path: str, niter: int) -> tuple[np.ndarray, float]:
        """The estimate, and the seconds its call took."""
        t = float(self._ask(path=path, niter=niter, save=True)["seconds"])
        out = np.load(self.dir / "out.npy")
        return (out[0] if self.planar else out), t

    def close(self) -> None:
        import shutil

        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redlionfish(python: str | None) -> RedLionfish | None:
    if not python:
        return None
    if not Path(python).exists():
        print(f"\n(RedLionfish not run: no interpreter at {python}; see bench/redlionfish_worker.py)\n")
        return None
    return RedLionfish(python)


def blur(obj: np.ndarray, psf: np.ndarray) -> np.ndarray:
    p = max(psf.shape)
    out = scipy.signal.fftconvolve(np.pad(obj, p, mode="symmetric"), psf, mode="same")
    return out[(slice(p, -p),) * obj.ndim]


def quality(est: np.ndarray, obj: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = float(obj.max() - obj.min())
    est = np.asarray(est, dtype=np.float64)
    return (
        peak_signal_noise_ratio(obj, est, data_range=rng),
        structural_similarity(obj, est, data_range=rng),
    )


def part1(quick: bool, rlf: RedLionfish | None = None) -> None:
    from skimage.restoration import richardson_lucy

    obj = tifffile.imread(DATA / "w2s_pairs" / "target_avg400_085_1.tif").astype(np.float64)
    obj = obj / obj.max() * 2000.0 + 20.0  # photons: a bright widefield frame on a dim background
    psf = P.widefield_psf(0.8, 520, 1.33, 0.1)
    rng = np.random.default_rng(0)
    data = rng.poisson(blur(obj, psf)).astype(np.float32)
    print("\n### 1. Real image (W2S 085_1 as object), widefield PSF NA 0.8, Poisson noise, 512x512\n")
    q0 = quality(data, obj)
    print(f"blurred + noisy input: PSNR {q0[0]:.2f} dB, SSIM {q0[1]:.4f}\n")
    print("| method | iterations | seconds (best of 5-15, warm) | PSNR dB | SSIM |")
    print("|---|---|---|---|---|")
    rows = []
    wb = D.wb_parameters(psf)
    fp, pad = D._reaches(psf, "wb", wb, (1e-3, D.PAD_MASS))
    fp_rl, pad_rl = D._reaches(psf, "rl", wb, (1e-3, D.PAD_MASS))
    plans_wb: dict = {}
    plans_rl: dict = {}
    # every method in float32 and warm (timed() runs once first); fast runs best of 15, slow of 3
    for it in [1, 2, 3, 5]:
        out, t = timed(
            lambda it=it: D.deconvolve_array(data, psf, iterations=it, wb=wb, plans=plans_wb, footprint=fp, pad=pad),
            repeat=15,
        )
        rows.append(("livescope WB", it, t, *quality(out, obj)))
    for it in [3, 5, 10, 20, 40] if quick else [3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 60]:
        out, t = timed(
            lambda it=it: D.deconvolve_array(
                data, psf, iterations=it, method="rl", wb=wb, plans=plans_rl, footprint=fp_rl, pad=pad_rl
            ),
            repeat=1 if it > 20 else 5,
        )
        rows.append(("livescope RL", it, t, *quality(out, obj)))
    scale = float(data.max())
    psf32 = psf.astype(np.float32)  # skimage casts the PSF to the image's float32 anyway
    # skimage's best iteration count is chosen by PSNR, so the sweep starts at 1 iteration
    for it in [1, 2, 3, 5, 10, 20] if quick else [1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 60]:
        out, t = timed(
            lambda it=it: richardson_lucy(data / scale, psf32, num_iter=it, clip=False), repeat=1 if it > 10 else 5
        )
        rows.append(("skimage RL", it, t, *quality(out * scale, obj)))
    rlf_paths = {"opencl-warm": "RedLionfish RL, OpenCL (plan kept)", "scipy": "RedLionfish RL, scipy"}
    if rlf is not None:
        rlf.load(data, psf32)
        for path, name in rlf_paths.items():
            for it in [1, 2, 3, 5, 10, 20] if quick else [1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 40]:
                out, t = rlf.result(path, it)
                t = min([t] + [rlf.seconds(path, it) for _ in range(0 if it > 10 else 4)])
                rows.append((name, it, t, *quality(out, obj)))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.2f} | {r[4]:.4f} |")
    sk = [r for r in rows if r[0] == "skimage RL"]
    sk_best = max(sk, key=lambda r: r[3])
    print(f"\nBest skimage PSNR {sk_best[3]:.2f} dB at {sk_best[1]} iterations, {sk_best[2]:.4f} s.")
    for name in ("livescope WB", "livescope RL", *(rlf_paths.values() if rlf else ())):
        reach = [r for r in rows if r[0] == name and r[3] >= sk_best[3] - 0.01]
        if reach:
            r = min(reach, key=lambda r: r[2])
            print(f"{name} reaches it in {r[2]:.4f} s ({r[1]} iterations): {sk_best[2] / r[2]:.1f}x less time.")
        else:
            best = max((r for r in rows if r[0] == name), key=lambda r: r[3])
            print(f"{name} does not reach it; its best is {best[3]:.2f} dB at {best[1]} iterations.")
    # head to head: on a shared machine a sweep's timings drift with the load, so the contenders
    # (skimage at its best iteration count, WB 1 and 2, and the FFT floor) run interleaved,
    # round after round, and each keeps its best and its median round
    domain = D.padded_shape(data.shape, pad)
    contenders = {
        f"skimage RL {sk_best[1]} it (its best)": lambda: richardson_lucy(
            data / scale, psf32, num_iter=sk_best[1], clip=False
        ),
    }
    for boundary in ("dct", "reflect"):
        for it in (1, 2):
            contenders[f"livescope WB {it} it, {boundary} boundary"] = lambda it=it, b=boundary: D.deconvolve_array(
                data, psf, iterations=it, wb=wb, plans=plans_wb, footprint=fp, pad=pad, boundary=b
            )
    remote = {}  # contenders timed inside the RedLionfish worker: name -> (path, iterations)
    if rlf is not None:
        for path, name, swept in (
            ("opencl-warm", rlf_paths["opencl-warm"], "opencl-warm"),
            ("opencl", "RedLionfish RL, OpenCL, its API call", "opencl-warm"),
            ("scipy", rlf_paths["scipy"], "scipy"),
        ):
            sweep = [r for r in rows if r[0] == rlf_paths[swept]]
            it = max(sweep, key=lambda r: r[3])[1]
            remote[f"{name} {it} it (its best)"] = (path, it)
    contenders[f"floor of WB 1 it, dct: dctn + idctn {data.shape[0]}x{data.shape[1]}"] = dct_pair(data.shape)
    contenders[f"floor of WB 1 it, reflect: rfft + irfft {domain[0]}x{domain[1]}"] = fft_pair(domain)
    contenders[f"FFT pair on the bare {data.shape[0]}x{data.shape[1]} frame"] = fft_pair(data.shape)
    q = {k: quality(np.asarray(fn(), float) * (scale if k.startswith("skimage") else 1.0), obj)[0]
         for k, fn in contenders.items() if "floor" not in k and "pair" not in k}  # fmt: skip
    q.update({k: quality(rlf.result(*pi)[0], obj)[0] for k, pi in remote.items()})
    times: dict[str, list[float]] = {k: [] for k in (*contenders, *remote)}
    for fn in contenders.values():
        fn()
    for _ in range(10 if quick else 30):
        for k, fn in contenders.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        for k, pi in remote.items():
            times[k].append(rlf.seconds(*pi))
    sk_key = next(iter(contenders))
    sk_min, sk_med = min(times[sk_key]), float(np.median(times[sk_key]))
    print(f"\nHead to head, interleaved, {len(times[sk_key])} rounds:\n")
    print("| run | PSNR dB | best (s) | median (s) | skimage's best / this (best; median) |")
    print("|---|---|---|---|---|")
    for k, ts in times.items():
        b, m = min(ts), float(np.median(ts))
        qk = f"{q[k]:.2f}" if k in q else ""
        print(f"| {k} | {qk} | {b:.4f} | {m:.4f} | {sk_min / b:.1f}x; {sk_med / m:.1f}x |")


def dct_pair(shape: tuple[int, ...]):
    """The two transforms one WB iteration needs at least under the dct boundary: dctn of the
    bare frame and idctn of its product with the back projector (float32, as the engine)."""
    import scipy.fft

    a = np.random.default_rng(0).random(shape, dtype=np.float32)
    w = D.fft_workers(shape)
    lam = np.random.default_rng(1).random(shape, dtype=np.float32)

    def pair():
        c = scipy.fft.dctn(a, type=2, workers=w)
        c *= lam
        scipy.fft.idctn(c, type=2, workers=w, overwrite_x=True)

    return pair


def fft_pair(shape: tuple[int, ...]):
    """The two FFTs one WB iteration from a flat start needs at least: rfft of the (padded)
    frame and irfft of its product with the back projector (float32, worker threads)."""
    import scipy.fft

    a = np.random.default_rng(0).random(shape, dtype=np.float32)
    w = D.fft_workers(shape)  # as the engine does
    spec = scipy.fft.rfftn(a, workers=w)

    def pair():
        s = scipy.fft.rfftn(a, workers=w)
        s *= spec
        scipy.fft.irfftn(s, s=shape, workers=w, overwrite_x=True)

    return pair


def part2(quick: bool, rlf: RedLionfish | None = None) -> None:
    print("\n### 2. Time with the engine's defaults (WB, 2 iterations, Gaussian PSF sigma 1.5 px)\n")
    # RedLionfish's faster path on this CPU (scipy; its OpenCL on pocl is ~10x slower, part 1)
    cols = " RedLionfish RL, scipy, 10 iterations (s) |" if rlf else ""
    print(f"| data | livescope WB (s) | skimage RL, 10 iterations (s) |{cols}")
    print("|---|---|---|" + ("---|" if rlf else ""))
    from skimage.restoration import richardson_lucy

    rng = np.random.default_rng(1)
    psf = P.gaussian_psf(1.5)

    def rlf_cell(data: np.ndarray, psf: np.ndarray) -> str:
        if rlf is None:
            return ""
        rlf.load(data, psf)
        return f" {min(rlf.seconds('scipy', 10) for _ in range(1 if data.size > 2**22 else 3)):.3f} |"

    for shape in [(512, 512), (2048, 2048)]:
        frame = rng.poisson(200, shape).astype(np.uint16)
        eng = create_engine("deconvolve", offset=0)
        eng.setup(StreamSpec(shape=shape))
        eng.process(frame, FrameInfo(seq=0))  # OTF computed here, once
        _, t = timed(lambda eng=eng, frame=frame: eng.process(frame, FrameInfo(seq=1)), repeat=5)
        f = frame.astype(np.float32) / frame.max()
        _, tsk = timed(lambda f=f: richardson_lucy(f, psf, num_iter=10, clip=False), repeat=1, warm=False)
        print(f"| frame {shape[0]}x{shape[1]} | {t:.4f} | {tsk:.3f} |{rlf_cell(frame, P.crop_psf(psf))}")
    nz = 16 if quick else 64
    stack = rng.poisson(200, (nz, 512, 512)).astype(np.uint16)
    eng = create_engine("deconvolve", offset=0)
    eng.setup(StreamSpec(shape=(512, 512)))
    eng.process(stack[0], FrameInfo(seq=0))
    _, t = timed(lambda: [eng.process(p, FrameInfo(seq=1)) for p in stack], repeat=1, warm=False)
    print(f"| stack {nz}x512x512, plane by plane | {t:.2f} | |" + (" |" if rlf else ""))
    vol = create_engine("deconvolve", offset=0, volume=True)
    vol.setup(StreamSpec(shape=stack.shape))
    _, t_first = timed(lambda: vol.process(stack, FrameInfo(seq=0)), repeat=1, warm=False)
    _, t = timed(lambda: vol.process(stack, FrameInfo(seq=1)), repeat=1, warm=False)
    # the same 3-D Gaussian the engine's volume default builds (sigma 1.5 px laterally, 2 planes in z)
    cell = rlf_cell(stack, P.crop_psf(P.gaussian_psf((2.0, 1.5, 1.5), ndim=3)))
    print(
        f"| stack {nz}x512x512 as one 3-D volume (sigma_z 2 planes) | {t:.2f} (first, with OTF: {t_first:.2f}) "
        f"| |{cell}"
    )


def fwhm_of_brightest(vol: np.ndarray) -> tuple[float, float]:
    from scipy import ndimage

    v = ndimage.gaussian_filter(vol.astype(np.float64), 0.5)
    z, y, x = np.unravel_index(int(np.argmax(v)), v.shape)
    box = vol[max(0, z - 10) : z + 11, max(0, y - 20) : y + 21, max(0, x - 20) : x + 21].astype(np.float64)
    box = box - np.median(vol)
    fz, fy, fx = P.fwhm_px(np.clip(box, 0, None))
    return fy * 0.022, fz * 0.125


def part3(quick: bool, rlf: RedLionfish | None = None) -> None:
    from skimage.restoration import richardson_lucy

    print("\n### 3. Real 3-D data, PSF measured from the same beads (voxel 0.022 x 0.022 x 0.125 um)\n")
    beads = tifffile.imread(DATA / "Bead_Image1_crop.tif").astype(np.float32)
    grid = tifffile.imread(DATA / "DeconvolutionSampleVerticalGrid1AU-crop.tif").astype(np.float32)
    psf = P.clean_psf(tifffile.imread(DATA / "psf_from_beads.tif"))
    print("| data | method | seconds (first call, with the OTF and plans) | result |")
    print("|---|---|---|---|")
    fy, fz = fwhm_of_brightest(beads)
    print(f"| beads {beads.shape} | input | | brightest bead FWHM {fy:.3f} um lateral, {fz:.3f} um axial |")
    offset = float(np.median(beads))  # the bead image's flat background, mostly offset
    # periodic: the beads' borders are empty, so the bare stack can be the period (no padding)
    for method, its, boundary in (("wb", 2, "auto"), ("rl", 20, "auto"), ("wb", 2, "periodic"), ("rl", 20, "periodic")):
        eng = create_engine(
            "deconvolve", psf=psf, volume=True, method=method, iterations=its, offset=offset, boundary=boundary
        )
        eng.setup(StreamSpec(shape=beads.shape))
        out, t = timed(lambda eng=eng: eng.process(beads, FrameInfo(seq=0))["deconvolved"], repeat=1, warm=False)
        _, tw = timed(lambda eng=eng: eng.process(beads, FrameInfo(seq=1)), repeat=1, warm=False)
        fy, fz = fwhm_of_brightest(out)
        print(
            f"| beads | livescope {method.upper()} {its} it, {eng.describe()['boundary_used']} | {t:.2f} "
            f"(next stack {tw:.2f}) "
            f"| FWHM {fy:.3f} um lateral, {fz:.3f} um axial |"
        )
    b = np.clip(beads - offset, 0, None)
    sc = float(b.max())
    out, t = timed(lambda: richardson_lucy(b / sc, psf, num_iter=20, clip=False), repeat=1, warm=False)
    fy, fz = fwhm_of_brightest(out * sc)
    print(f"| beads | skimage RL 20 it | {t:.2f} | FWHM {fy:.3f} um lateral, {fz:.3f} um axial |")
    if rlf is not None:  # OpenCL with its plan kept (made at load), and its scipy call
        rlf.load(b, psf)
        for path in ("opencl-warm", "scipy"):
            out, t = rlf.result(path, 20)
            fy, fz = fwhm_of_brightest(out)
            print(f"| beads | RedLionfish RL 20 it, {path} | {t:.2f} | FWHM {fy:.3f} um lateral, {fz:.3f} um axial |")

    def contrast(v: np.ndarray) -> float:
        # vertical lines: the profile along x of the brightest plane, averaged over y
        z = int(np.argmax(v.reshape(v.shape[0], -1).mean(axis=1)))
        prof = v[z].mean(axis=0)
        return float((prof.max() - prof.min()) / (prof.max() + prof.min()))

    print(f"| line grid {grid.shape} | input | | line contrast {contrast(grid):.3f} |")
    g_off = float(np.percentile(grid, 1))
    for method, its in (("wb", 2), ("rl", 20)):
        eng = create_engine("deconvolve", psf=psf, volume=True, method=method, iterations=its, offset=g_off)
        eng.setup(StreamSpec(shape=grid.shape))
        out, t = timed(lambda eng=eng: eng.process(grid, FrameInfo(seq=0))["deconvolved"], repeat=1, warm=False)
        _, tw = timed(lambda eng=eng: eng.process(grid, FrameInfo(seq=1)), repeat=1, warm=False)
        print(
            f"| line grid | livescope {method.upper()} {its} it | {t:.2f} (next stack {tw:.2f}) "
            f"| line contrast {contrast(out):.3f} |"
        )
    g = np.clip(grid - g_off, 0, None)
    out, t = timed(lambda: richardson_lucy(g / g.max(), psf, num_iter=20, clip=False), repeat=1, warm=False)
    print(f"| line grid | skimage RL 20 it | {t:.2f} | line contrast {contrast(out):.3f} |")
    if rlf is not None:
        rlf.load(g, psf)
        for path in ("opencl-warm", "scipy"):
            out, t = rlf.result(path, 20)
            print(f"| line grid | RedLionfish RL 20 it, {path} | {t:.2f} | line contrast {contrast(out):.3f} |")


def part4(quick: bool, rlf: RedLionfish | None = None) -> None:  # noqa: ARG001  RedLionfish has no WB
    """Issue #4 goal (b): WB 2 iterations against matched RL at its best on the synthetic scene of
    tests/engines/test_deconvolve.py, over the back projector's parameters."""
    import itertools
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engines"))
    import test_deconvolve as T

    print("\n### 4. WB parameters vs matched RL's best, synthetic sparse scene (96x96, Airy NA 0.8)\n")
    obj = T.scene()
    blurred = T.blur(obj, T.AIRY)
    data = T.noisy(blurred)
    rl = {i: T.rel_error(T.run(data, T.AIRY, i, "rl"), obj) for i in (5, 10, 15, 20, 30, 40)}
    rl_best = min(rl.values())
    print(f"matched RL relative error by iterations: { {k: round(v, 4) for k, v in rl.items()} }\n")
    base = D.wb_parameters(T.AIRY)
    grid = itertools.product(
        (1e-3, 1e-2, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2),
        (7, 10) if quick else (4, 7, 10),
        (None, 0.02) if quick else (None, 0.003, 0.02, 0.05),
        (1.0,) if quick else (0.9, 1.0, 1.1),
    )
    rows = []
    for alpha, order, beta, cut in grid:
        wb = D.wb_parameters(T.AIRY, alpha=alpha, order=order, beta=beta, cutoff=[c * cut for c in base["cutoff"]])
        errs = [T.rel_error(T.run(data, T.AIRY, i, "wb", wb=wb), obj) for i in (1, 2, 3)]
        rows.append((min(errs[:2]) / rl_best, alpha, order, beta, cut, errs))
    rows.sort(key=lambda r: r[0])
    default = next(r for r in rows if r[1:5] == (D.DEFAULT_ALPHA, D.DEFAULT_ORDER, None, 1.0))
    print(f"{len(rows)} settings; best WB (1-2 it) / RL's best, first five and the default:\n")
    print("| alpha | order | beta | cutoff x 1/FWHM | WB 1, 2, 3 it error | WB(1-2) / RL best |")
    print("|---|---|---|---|---|---|")
    for r in rows[:5] + [default]:
        beta = "OTF gain" if r[3] is None else r[3]
        print(f"| {r[1]:g} | {r[2]} | {beta} | {r[4]:g} | {', '.join(f'{e:.4f}' for e in r[5])} | {r[0]:.3f} |")

    n = obj.shape[0]
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))
    kc = base["cutoff"][0]
    total = float(np.sum(obj**2)) * n * n

    def bands(est: np.ndarray) -> list[float]:
        err = np.abs(np.fft.fft2(np.asarray(est, float) - obj)) ** 2
        masks = (k < kc / 2, (k >= kc / 2) & (k < kc), k >= kc)
        return [float(np.sqrt(err[m].sum() / total)) for m in masks]

    print("\nError by spatial frequency (relative to the object's energy; kc = 1 / FWHM):\n")
    print("| estimate | total | k < kc/2 | kc/2 .. kc | > kc |")
    print("|---|---|---|---|---|")
    best_rl = min(rl, key=rl.get)
    for name, est in (
        ("noisy input", data),
        (f"RL {best_rl} iterations (its best)", T.run(data, T.AIRY, best_rl, "rl")),
        ("WB 2 iterations", T.run(data, T.AIRY, 2)),
        ("WB 3 iterations", T.run(data, T.AIRY, 3)),
    ):
        b = bands(est)
        print(f"| {name} | {T.rel_error(est, obj):.3f} | {b[0]:.3f} | {b[1]:.3f} | {b[2]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations, a 16-plane stack")
    ap.add_argument("--part", type=int, choices=(1, 2, 3, 4), action="append", help="run only these parts")
    ap.add_argument(
        "--redlionfish-python",
        default="/tmp/rlf-venv/bin/python",
        help="interpreter of a venv with RedLionfish (see bench/redlionfish_worker.py); '' to leave it out",
    )
    args = ap.parse_args()
    parts = set(args.part or (1, 2, 3, 4))
    rlf = start_redlionfish(args.redlionfish_python) if parts & {1, 2, 3} else None
    import os
    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}")
    if rlf is not None:
        print(f"RedLionfish's OpenCL device: {rlf.device}")
    for n, part in ((1, part1), (2, part2), (3, part3), (4, part4)):
        if n in parts:
            part(args.quick, rlf)
    if rlf is not None:
        rlf.close()


if __name__ == "__main__":
    main()
