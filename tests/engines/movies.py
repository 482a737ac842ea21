"""Synthetic movies with known components, shared by the decomposition tests and bench.

``lag_movie``: static filaments (background), slow blobs (sigma 2.5 px, 0.75 px per frame) and
fast particles (sigma 1.5 px, 1.5 px per frame) on persistent random walks (heading turning by
0.1 and 0.3 rad per frame), Gaussian noise sigma 5. A fast particle moves its own width (FWHM
3.5 px) in about 2 frames, a slow blob its width (5.9 px) in about 8: time scales that the lags
1, 2, 4, 8 resolve. Returns the noisy frames and the ground truth of each component.
"""

from __future__ import annotations

import numpy as np

COMPONENTS = ("background", "slow", "fast")


def spots(shape, centres, sigma, amp):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for cy, cx in centres:
        img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return img


def lag_movie(
    n_frames,
    shape=(96, 96),
    n_slow=6,
    n_fast=10,
    slow_speed=0.75,
    fast_speed=1.5,
    slow_sigma=2.5,
    fast_sigma=1.5,
    amp=60.0,
    noise=5.0,
    seed=0,
):
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    static = np.full(shape, 100.0)
    for _ in range(6):
        a, c = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8) * h
        d = (yy - c) * np.cos(a) - (xx - w / 2) * np.sin(a)
        static += 80 * np.exp(-(d**2) / 2.0)
    walkers = []
    for count, speed, turn in ((n_slow, slow_speed, 0.1), (n_fast, fast_speed, 0.3)):
        walkers.append((rng.uniform(6, min(h, w) - 6, (count, 2)), rng.uniform(0, 2 * np.pi, count), speed, turn))
    truth = {k: np.zeros((n_frames, h, w)) for k in COMPONENTS}
    for t in range(n_frames):
        truth["background"][t] = static
        truth["slow"][t] = spots(shape, walkers[0][0], slow_sigma, amp)
        truth["fast"][t] = spots(shape, walkers[1][0], fast_sigma, amp)
        for pos, ang, speed, turn in walkers:  # persistent random walks, turned back at the edges
            ang += rng.normal(0, turn, ang.shape)
            pos += speed * np.stack([np.sin(ang), np.cos(ang)], 1)
            for d in range(2):
                out = (pos[:, d] < 4) | (pos[:, d] > shape[d] - 5)
                ang[out] += np.pi
                pos[:, d] = np.clip(pos[:, d], 4, shape[d] - 5)
    clean = sum(truth[k] for k in COMPONENTS)
    frames = clean + rng.normal(0, noise, clean.shape)
    return frames.astype(np.float32), truth


def corr(a, b):
    a = np.ravel(a) - np.mean(a)
    b = np.ravel(b) - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))
