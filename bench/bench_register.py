"""Registration: livescope's `register` engine against scikit-image + scipy, side by side.

Real data with known sub-pixel drift: the W2S target (a 400-frame average of cells) is
reflect-padded, Fourier-shifted and centre-cropped (so the frame edges are real edges), then
Poisson noise is drawn at ``--photons`` photons for the brightest pixel; the bead z-stack is
shifted the same way in (z, y, x). The drift is a slow random walk, as a sample drifts.

z-stacks: the stack defaults were chosen on the bead stack (first stack row, and a nuclei
phantom with seed 123). Two held-out stacks check them: the bead stack with other noise
draws, half the photons and twice the drift steps, and a nuclei phantom (seed 7, 32x128x128,
z planes 3x the pixel size: textured ellipsoidal nuclei cut by the top and bottom planes,
anisotropic blur).

Peers: ``skimage.registration.phase_cross_correlation(ref, frame, upsample_factor=100)`` then
``scipy.ndimage.shift(frame, shift)`` (cubic spline). livescope: the engine's ``process`` per
frame (estimate + apply + reference update, all included) and the pure functions
``estimate_shift`` + ``apply_shift`` (no precomputation kept between calls).

    python bench/bench_register.py [--frames 20] [--photons 200]

Prints a markdown table: median ms per frame, and the largest, mean and RMS error of the
measured drift in pixels (per axis for max and mean, over all frames and axes).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import scipy.fft as sfft
import scipy.ndimage as ndi
import tifffile
from skimage.registration import phase_cross_correlation

from livescope.engines.base import FrameInfo, StreamSpec
from livescope.engines.register import Register, apply_shift, estimate_shift

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class Scene:
    def __init__(self, image: np.ndarray, size: tuple[int, ...], pad: int) -> None:
        pads = [min(pad, n // 2) for n in image.shape]
        big = np.pad(image.astype(np.float64), [(p, p) for p in pads], mode="reflect")
        self.spectrum = sfft.fftn(big, workers=2)
        self.freqs = [sfft.fftfreq(n) for n in big.shape]
        self.crop = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(big.shape, size, strict=True))

    def view(self, shift) -> np.ndarray:
        f = self.spectrum
        for axis, (k, s) in enumerate(zip(self.freqs, shift, strict=True)):
            shape = [1] * f.ndim
            shape[axis] = k.size
            f = f * np.exp(-2j * np.pi * k * s).reshape(shape)
        return np.clip(sfft.ifftn(f, workers=2).real[self.crop], 0.0, None)


def nuclei(seed: int, shape=(32, 128, 128), pad: int = 16) -> np.ndarray:
    """Textured ellipsoidal nuclei filling a stack; z planes 3x the pixel, anisotropic blur."""
    rng = np.random.default_rng(seed)
    big = [n + 2 * pad for n in shape]
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in big], indexing="ij")
    vol = np.zeros(big)
    for _ in range(70):
        c = [rng.uniform(0, n) for n in big]
        r = [rng.uniform(3, 6), rng.uniform(9, 16), rng.uniform(9, 16)]
        d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        vol += rng.uniform(0.5, 1.5) / (1 + np.exp(np.minimum((d - 1) * 8, 50)))
    tex = ndi.gaussian_filter(rng.normal(size=big), (0.7, 2, 2))
    vol = np.clip(vol * (1 + 0.75 * tex / tex.std()), 0, None)
    for _ in range(40):  # bright foci
        vol[tuple(int(rng.uniform(0, n)) for n in big)] += rng.uniform(5, 20)
    return ndi.gaussian_filter(vol, (1.2, 1.5, 1.5)) + 0.1


def stream(scene: Scene, ndim: int, n: int, photons: float, step: float, rng) -> tuple:
    drift = np.cumsum(rng.normal(0.0, step, (n, ndim)), axis=0)
    drift[0] = 0.0
    views = [scene.view(d) for d in drift]
    scale = photons / max(v.max() for v in views)
    frames = [rng.poisson(v * scale).astype(np.uint16) for v in views]
    return frames, drift


def run_skimage(frames):
    ref = frames[0].astype(np.float32)
    shifts, times = [], []
    for f in frames[1:]:
        t0 = time.perf_counter()
        fl = f.astype(np.float32)
        s, _, _ = phase_cross_correlation(ref, fl, upsample_factor=100)
        ndi.shift(fl, s)
        times.append(time.perf_counter() - t0)
        shifts.append(-s)  # skimage returns the correction; the drift is its opposite
    return np.array(shifts), times


def run_functions(frames, sizes):
    ref = frames[0].astype(np.float32)
    px = sizes.get("pixel_size_um")
    spacing = (sizes["z_step_um"], px, px) if sizes else None
    shifts, times = [], []
    for f in frames[1:]:
        t0 = time.perf_counter()
        s = estimate_shift(ref, f, spacing=spacing)
        apply_shift(f, [-v for v in s])
        times.append(time.perf_counter() - t0)
        shifts.append(s)
    return np.array(shifts), times


def run_engine(frames, sizes):
    volume = bool(sizes)
    eng = Register(volume=volume)
    # The stack's voxel size, as the acquisition reports it.
    eng.setup(StreamSpec(shape=frames[0].shape, **sizes))
    axes = ["shift_z", "shift_y", "shift_x"] if volume else ["shift_y", "shift_x"]
    eng.process(frames[0], FrameInfo(seq=0))
    shifts, times = [], []
    for i, f in enumerate(frames[1:], 1):
        t0 = time.perf_counter()
        out = eng.process(f, FrameInfo(seq=i))
        times.append(time.perf_counter() - t0)
        shifts.append([out[a] for a in axes])
    return np.array(shifts), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--photons", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    w2s = tifffile.imread(DATA / "w2s_pairs" / "target_avg400_035_1.tif").astype(np.float64)
    beads = tifffile.imread(DATA / "Bead_Image1_crop.tif").astype(np.float64)
    bead_um = {"pixel_size_um": 0.022, "z_step_um": 0.125}
    nuclei_um = {"pixel_size_um": 0.1, "z_step_um": 0.3}
    bead_scene = Scene(beads, beads.shape, 16)
    # label, scene, axes, frames, drift step (px), photons, voxel size (stacks), seed
    cases = [
        ("512x512", Scene(w2s, (512, 512), 64), 2, args.frames, 0.4, args.photons, {}, None),
        ("2048x2048", Scene(ndi.zoom(w2s, 4, order=1), (2048, 2048), 128), 2,
         max(6, args.frames // 3), 1.0, args.photons, {}, None),
        ("z-stack beads 41x150x150 (tuning)", bead_scene, 3, args.frames, 0.3, args.photons,
         bead_um, None),
        ("z-stack beads, held out (other noise, half the photons, 2x steps)", bead_scene, 3,
         args.frames, 0.6, args.photons / 2, bead_um, args.seed + 1000),
        ("z-stack nuclei phantom 32x128x128, held out", Scene(nuclei(7), (32, 128, 128), 0), 3,
         args.frames, 0.3, args.photons, nuclei_um, args.seed + 2000),
    ]  # fmt: skip

    print(f"machine: {platform.machine()}, {platform.python_version()}, "
          f"photons (brightest pixel) {args.photons:g}, seed {args.seed}")  # fmt: skip
    print()
    print("| data | method | ms / frame (median) | max error (px) | mean error (px) "
          "| RMS error (px) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label, scene, ndim, n, step, photons, sizes, seed in cases:
        gen = rng if seed is None else np.random.default_rng(seed)
        frames, drift = stream(scene, ndim, n + 1, photons, step, gen)
        truth = drift[1:]
        for name, fn in [
            ("skimage pcc(upsample 100) + ndimage.shift", lambda frames=frames: run_skimage(frames)),
            ("livescope estimate_shift + apply_shift", lambda frames=frames, sizes=sizes: run_functions(frames, sizes)),
            ("livescope `register` engine", lambda frames=frames, sizes=sizes: run_engine(frames, sizes)),
        ]:
            got, times = fn()
            err = np.abs(got - truth)
            rms = float(np.sqrt(np.mean(np.sum((got - truth) ** 2, axis=1))))
            print(f"| {label} | {name} | {1e3 * np.median(times):.1f} | "
                  f"{err.max():.3f} | {err.mean():.3f} | {rms:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
