"""A family of ground-truth movies for the decomposition (background, slow, fast), by type.

Each movie type draws its parameters from its own ranges with its own random generator, so the
*tuning* part (``split="tune"``) and the *held-out* part (``split="heldout"``) share the kinds of
scene but never a seed nor a parameter draw; the held-out movies are also larger (160x160 vs
128x128). Nothing is ever tuned on the held-out part.

Scene: a structured background (filaments, membranes, out-of-focus haze, or a real cell image:
the temporal median of the Tinevez & Jacquemet migration movie, CC BY 4.0, or a W2S widefield
target, research use), plus two populations of Gaussian spots:

- **slow** objects drift (directed, 0.15-0.5 px/frame) or diffuse slowly (rms step 0.4-0.8 px):
  they move less than their own size in a few frames, and several sizes over the movie (an
  object that never moves is background: the filament types hold 0-3 static spots);
- **fast** objects diffuse (step 1.5-4 px/frame) or run (directed, 1.5-5 px/frame): they move
  their own size in a frame or two.

The truth of each component is what that population contributes, in the frame's units
(photo-electrons times the camera gain), bleached like the frame. Optionally the whole field
drifts (stage drift: background included), bleaches exponentially, or objects blink in/out.
Noise: Poisson on the photo-electrons (20 to 2000 photons at a spot's peak) plus Gaussian read
noise, a camera gain and an offset.

``family(split, size="full"|"small")`` yields ``(name, frames, truth, params)``; ``small`` is the
version the tests use (48 frames of 64x64, three types).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

COMPONENTS = ("background", "slow", "fast")
ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real"
SHARED = ROOT.parent / "shared" / "data"

# The movie types, in table order: (name, what it stresses).
TYPES = (
    ("equal", "equal size and brightness, filaments, sparse (the issue's movie)"),
    ("sizes", "different sizes and brightnesses (slow big and dim or small and bright)"),
    ("crowded", "crowded: 3-4x the objects"),
    ("directed", "fast objects run straight (1.5-5 px/frame), slow ones diffuse"),
    ("low_photon", "20-40 photons at a spot's peak"),
    ("high_photon", "1000-2000 photons at a spot's peak"),
    ("bleach", "bleaching to 20-45 % over the movie"),
    ("drift", "stage drift 0.05-0.15 px/frame, the background moves too"),
    ("membranes", "membranes and out-of-focus haze, blinking objects"),
    ("real_cells", "background: the real migration movie's cells"),
    ("real_w2s", "background: a real widefield cell image (W2S)"),
)
SMALL_TYPES = ("equal", "sizes", "real_cells")


def _render(shape: tuple[int, int], centres: np.ndarray, sigma: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Sum of Gaussian spots, each drawn in a window of +-4 sigma (fast for many small spots)."""
    h, w = shape
    img = np.zeros(shape)
    for (cy, cx), s, a in zip(centres, sigma, amp, strict=True):
        r = int(np.ceil(4 * s))
        y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 2)
        x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1)[:, None] - cy
        xx = np.arange(x0, x1)[None, :] - cx
        img[y0:y1, x0:x1] += a * np.exp(-(yy**2 + xx**2) / (2 * s * s))
    return img


def _filaments(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros(shape)
    for _ in range(n):
        a, c = rng.uniform(0, np.pi), rng.uniform(0.1, 0.9) * h
        width = rng.uniform(0.8, 1.6)
        # gently curved: the distance to a line with a slow sinusoidal bend
        d = (yy - c) * np.cos(a) - (xx - w / 2) * np.sin(a)
        d += rng.uniform(0, 6) * np.sin(((yy * np.sin(a) + xx * np.cos(a)) / h) * rng.uniform(1, 3) + rng.uniform(0, 6))
        img += rng.uniform(0.5, 1.0) * np.exp(-(d**2) / (2 * width**2))
    return img


def _membranes(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Cell outlines (rings of irregular radius) and the cells' dim cytoplasm."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros(shape)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r0 = rng.uniform(0.12, 0.3) * min(h, w)
        phase, k = rng.uniform(0, 2 * np.pi), rng.integers(2, 5)
        ang = np.arctan2(yy - cy, xx - cx)
        r = np.hypot(yy - cy, xx - cx) / (1 + 0.15 * np.sin(k * ang + phase))
        img += np.exp(-((r - r0) ** 2) / (2 * 1.5**2)) + 0.15 * (r < r0)
    return img


def _haze(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Out-of-focus haze: a few wide blobs."""
    centres = rng.uniform(0, 1, (4, 2)) * np.array(shape)
    return _render(shape, centres, rng.uniform(0.15, 0.3, 4) * min(shape), rng.uniform(0.2, 0.5, 4))


def _real_background(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray | None:
    """A crop of a real image, normalised to 0..1 (None when the file is not there)."""
    from scipy import ndimage

    try:
        import tifffile
    except ImportError:
        return None
    if kind == "real_cells":
        path = REAL / "cancer_cell_migration_crop.tif"
        if not path.exists():
            return None
        img = np.median(tifffile.imread(path).astype(np.float64), axis=0)
    else:
        name = "target_avg400_035_1.tif" if rng.uniform() < 0.5 else "target_avg400_085_1.tif"
        path = SHARED / "w2s_pairs" / name
        if not path.exists():
            return None
        img = tifffile.imread(path).astype(np.float64)
    # A random crop (or a zoom when the image is smaller than the movie), randomly flipped.
    h, w = shape
    zoom = max(h / img.shape[0], w / img.shape[1], rng.uniform(0.6, 1.0) if kind != "real_cells" else 1.0)
    if zoom != 1.0:
        img = ndimage.zoom(img, zoom, order=1)
    y0 = int(rng.integers(0, img.shape[0] - h + 1))
    x0 = int(rng.integers(0, img.shape[1] - w + 1))
    img = img[y0 : y0 + h, x0 : x0 + w]
    if rng.uniform() < 0.5:
        img = img[::-1]
    lo, hi = np.percentile(img, [1, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1.2)


def _draw(kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """The parameters of one movie of this kind (all from ``rng``)."""
    same = rng.uniform(1.6, 2.4)
    p: dict[str, Any] = {
        "background": "filaments",
        "photons": float(rng.uniform(150, 400)),  # at a spot's peak
        "bg_photons": float(rng.uniform(0.2, 0.5)),  # background level, in spot-peak units
        "bg_contrast": float(rng.uniform(0.4, 0.9)),  # structure on top of it, same units
        "read_noise": float(rng.uniform(1.0, 3.0)),  # electrons
        "n_slow": int(rng.integers(5, 9)),
        "n_fast": int(rng.integers(8, 14)),
        "slow_sigma": (same, same),
        "fast_sigma": (same, same),
        "slow_amp": (1.0, 1.0),
        "fast_amp": (1.0, 1.0),
        "slow_motion": "directed",
        "slow_speed": (0.15, 0.5),
        "fast_motion": "diffusive",
        "fast_speed": (1.5, 3.5),
        "bleach": None,
        "drift": 0.0,
        "blink": 0.0,
    }
    if kind == "sizes":
        big = rng.uniform() < 0.5  # which population is the big, dim one
        p["slow_sigma"] = (3.0, 4.5) if big else (1.2, 1.8)
        p["fast_sigma"] = (1.2, 1.8) if big else (2.5, 4.0)
        p["slow_amp"] = (0.4, 0.7) if big else (0.8, 1.4)
        p["fast_amp"] = (0.8, 1.4) if big else (0.4, 0.7)
    elif kind == "crowded":
        p["n_slow"] = int(rng.integers(18, 28))
        p["n_fast"] = int(rng.integers(30, 45))
        p["slow_amp"] = p["fast_amp"] = (0.6, 1.2)
    elif kind == "directed":
        p["slow_motion"], p["slow_speed"] = "diffusive", (0.4, 0.8)
        p["fast_motion"], p["fast_speed"] = "directed", (1.5, 5.0)
    elif kind == "low_photon":
        p["photons"] = float(rng.uniform(20, 40))
    elif kind == "high_photon":
        p["photons"] = float(rng.uniform(1000, 2000))
    elif kind == "bleach":
        p["bleach"] = float(rng.uniform(0.2, 0.45))  # fraction left at the last frame
    elif kind == "drift":
        ang = rng.uniform(0, 2 * np.pi)
        p["drift"] = float(rng.uniform(0.05, 0.15))
        p["drift_angle"] = float(ang)
    elif kind == "membranes":
        p["background"] = "membranes"
        p["blink"] = 0.01  # per frame: an object appears or vanishes
        p["slow_sigma"] = p["fast_sigma"] = (1.5, 2.5)
    elif kind in ("real_cells", "real_w2s"):
        p["background"] = kind
        p["bg_contrast"] = float(rng.uniform(0.6, 1.2))
    return p


def _walk(rng, n, shape, motion, speed_range, n_frames, margin=3.0):
    """Positions (n_frames, n, 2) of n objects: directed runs with a slowly turning heading, or
    diffusion with the given rms step per frame; reflected at the edges."""
    h, w = shape
    pos = rng.uniform(0, 1, (n, 2)) * (np.array(shape) - 2 * margin) + margin
    speed = rng.uniform(*speed_range, n)
    heading = rng.uniform(0, 2 * np.pi, n)
    out = np.empty((n_frames, n, 2))
    lim = np.array([h - 1 - margin, w - 1 - margin])
    for t in range(n_frames):
        out[t] = pos
        if motion == "directed":
            heading = heading + rng.normal(0, 0.1, n)
            step = speed[:, None] * np.stack([np.sin(heading), np.cos(heading)], 1)
        else:
            step = rng.normal(0, 1, (n, 2)) * (speed[:, None] / np.sqrt(2))
        pos = pos + step
        low, high = pos < margin, pos > lim
        pos = np.where(low, 2 * margin - pos, pos)
        pos = np.where(high, 2 * lim - pos, pos)
        pos = np.clip(pos, margin, lim)
        # a directed object turns back at the edge
        heading = np.where(low[:, 0] | high[:, 0], np.pi - heading, heading)
        heading = np.where(low[:, 1] | high[:, 1], -heading, heading)
    return out


def make_movie(
    kind: str,
    seed: int,
    n_frames: int = 96,
    shape: tuple[int, int] = (128, 128),
    inject: Callable[[np.ndarray, dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """One movie of ``kind``: frames (float32, camera counts) and the truth of each component
    (float32, the same units, no offset).

    ``inject(electrons, params)`` (optional, ``bench/bench_events.py``) may change the clean
    photo-electron movie in place before the noise is drawn (events: a burst, a division, ...);
    what it returns (the events' ground truth) is kept in ``params["events"]``. The components'
    truth does not include it. Blinking objects' switches are kept in ``params["switches"]``
    as ``(frame, y, x)``."""
    rng = np.random.default_rng(seed)
    p = _draw(kind, rng)
    h, w = shape
    pad = 8 if p["drift"] else 0  # the field drifts: render larger, crop a moving window
    big = (h + 2 * pad + int(np.ceil(p["drift"] * n_frames)) * 2, w + 2 * pad + int(np.ceil(p["drift"] * n_frames)) * 2)
    bg_shape = big if p["drift"] else shape
    if p["background"] == "filaments":
        structure = _filaments(rng, bg_shape, int(rng.integers(4, 9))) + 0.3 * _haze(rng, bg_shape)
        n_static = int(rng.integers(0, 4))  # static spots: they never move, so background
        centres = rng.uniform(0, 1, (n_static, 2)) * np.array(bg_shape)
        structure += _render(bg_shape, centres, rng.uniform(1.5, 2.5, n_static), rng.uniform(0.5, 1.0, n_static))
    elif p["background"] == "membranes":
        structure = _membranes(rng, bg_shape, int(rng.integers(3, 6))) + _haze(rng, bg_shape)
    else:
        real = _real_background(p["background"], rng, bg_shape)
        structure = real if real is not None else _filaments(rng, bg_shape, 6)
        if real is None:
            p["background"] += " (missing: filaments instead)"
    structure = structure / max(float(structure.max()), 1e-9)
    background = p["photons"] * (p["bg_photons"] + p["bg_contrast"] * structure)

    pops = {}
    for comp in ("slow", "fast"):
        n = p[f"n_{comp}"]
        track = _walk(rng, n, shape, p[f"{comp}_motion"], p[f"{comp}_speed"], n_frames)
        sig = rng.uniform(*p[f"{comp}_sigma"], n)
        amp = p["photons"] * rng.uniform(*p[f"{comp}_amp"], n)
        on = np.ones((n_frames, n), bool)
        if p["blink"]:
            for i in range(n):  # one switch at most: appears late or vanishes early
                if rng.uniform() < p["blink"] * n_frames:
                    cut = int(rng.integers(16, n_frames))
                    if rng.uniform() < 0.5:
                        on[:cut, i] = False
                    else:
                        on[cut:, i] = False
                    p.setdefault("switches", []).append((cut, float(track[cut, i, 0]), float(track[cut, i, 1])))
        pops[comp] = (track, sig, amp, on)

    truth = {k: np.zeros((n_frames, h, w), np.float32) for k in COMPONENTS}
    gain_t = np.ones(n_frames)
    if p["bleach"]:
        gain_t = p["bleach"] ** (np.arange(n_frames) / (n_frames - 1))
    for t in range(n_frames):
        if p["drift"]:
            from scipy import ndimage

            off = p["drift"] * t * np.array([np.sin(p["drift_angle"]), np.cos(p["drift_angle"])])
            cy, cx = (big[0] - h) / 2 + off[0], (big[1] - w) / 2 + off[1]
            bg = ndimage.shift(background, (-cy, -cx), order=1, mode="nearest")[:h, :w]
        else:
            bg = background
        truth["background"][t] = bg * gain_t[t]
        for comp, (track, sig, amp, on) in pops.items():
            truth[comp][t] = gain_t[t] * _render(shape, track[t][on[t]], sig[on[t]], amp[on[t]])
    electrons = sum(truth[k].astype(np.float64) for k in COMPONENTS)
    if inject is not None:
        p["events"] = inject(electrons, p)
    camera_gain, offset = 2.0, 100.0
    noisy = rng.poisson(electrons) + rng.normal(0, p["read_noise"], electrons.shape)
    frames = (noisy * camera_gain + offset).astype(np.float32)
    for k in COMPONENTS:
        truth[k] *= camera_gain
    p.update(kind=kind, seed=seed, n_frames=n_frames, shape=shape)
    return frames, truth, p


def family(split: str = "tune", size: str = "full", kinds: tuple[str, ...] | None = None) -> Iterator[tuple]:
    """Yield ``(name, frames, truth, params)`` for every movie of the split.

    tune: 2 movies per type (seeds 100 + 10 * type + i), 128x128 (small: 64x64, 48 frames).
    heldout: 2 movies per type with their own seeds (9000 + ...) and so their own parameter
    draws, 160x160 (small: 72x72, 48 frames).
    """
    if split not in ("tune", "heldout"):
        raise ValueError(split)
    names = kinds or (SMALL_TYPES if size == "small" else tuple(k for k, _ in TYPES))
    base = 100 if split == "tune" else 9000
    if size == "small":
        n_frames, shape = 48, ((64, 64) if split == "tune" else (72, 72))
        per = 1
    else:
        n_frames, shape = 96, ((128, 128) if split == "tune" else (160, 160))
        per = 2
    order = [k for k, _ in TYPES]
    for kind in names:
        for i in range(per):
            seed = base + 10 * order.index(kind) + i
            frames, truth, p = make_movie(kind, seed, n_frames, shape)
            yield f"{kind}/{i}", frames, truth, p
