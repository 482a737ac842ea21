"""Rolling multi-lag decomposition: background, slow and fast components, live, and novelty events.

Every frame is split, causally and at constant cost, into

- ``background``: what stays for most of a long window (per pixel, the mean of the lowest samples
  of a decimated history of the last ``background_window`` frames: a clipped mean, corrected for
  the clipping's noise bias); with ``follow_drift`` it moves with the stage's drift;
- ``slow``: what is there at every lag of the recent window (the per-pixel minimum over the
  frame and its lagged frames t-1, t-2, t-4, t-8, corrected for its noise offset, minus the
  background): an object that moves less than its own size in the longest lag;
- ``fast``: what the current frame holds that the lagged frames do not (frame - background - slow,
  shrunk at a multiple of the noise so that the noise stays in the residual);
- ``residual``: the rest (noise); ``background + slow + fast + residual == frame`` exactly.

The rolling method compares spatially smoothed frames (``smooth``, a Gaussian of 1 px: objects
are wider than a pixel, noise is not), and a lagged frame is dilated by ``slow_reach`` px per
frame of lag before the slow test, so a drifting object's leading edge still counts as present.

The split is by time, never by size: a fast particle and a slow blob of the same size and
brightness differ only in how many lags they survive.

Photobleaching is corrected first: an exponential decay is fitted to the mean frame intensity
(weighted least squares on its logarithm, with forgetting) and the frame is scaled back to the
stream's starting brightness before it is decomposed. The components are then scaled back to the
frame's own units, so the bleach is carried by all components alike instead of reading as a
negative ``slow`` component.

Lags follow timestamps: a lag of k means k nominal intervals in seconds (``StreamSpec.interval_s``,
or the first intervals seen), and each lag uses the buffered frame nearest to that time. When
the acquisition speeds up or slows down (event-driven acquisition), every component keeps its
time scale in seconds. Streams without increasing timestamps fall back to counting frames.

``method="learned"`` replaces background, slow and fast by the shares of a residual cascade of
small networks, one per lag (``engines/multilag.py``): the longest lag's share is the background,
lags of at most ``fast_lag`` (1) intervals are fast, the lags between slow; the residual and the
novelty are then what no lag's network predicts. With ``model`` a fitted model file (``livescope
fit --task decompose``); without one, the engine collects ``fit_frames`` frames (a central crop of
at most 256x256), fits on a background thread within ``fit_seconds`` while the rolling method
goes on, and switches between two frames (online fitting on the user's own stream).

The novelty score of a frame is the part of it that no lag predicts: per pixel the smallest
absolute difference to any lagged frame, in units of the noise, thresholded at 3 sigma and
averaged over ``event_block``-sized blocks; the frame's score is its most novel block. A score
that stands out against the recent past (robust z-score against the median and MAD of the last
``novelty_window`` scores) becomes an event with the region where the error concentrates.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

from ._array import namespace, ndimage_module, to_numpy
from .base import (
    Applies,
    EngineBase,
    EngineError,
    FrameInfo,
    Param,
    StreamSpec,
    as_bool,
    optional,
    register_engine,
)
from .events import EventGroups, describe, event_score, field_fraction

__all__ = ["Decompose", "order_statistic"]

log = logging.getLogger(__name__)

# Per-pixel threshold (noise sigmas) above which an unpredicted difference counts as novel:
# min over 4 lags of |N(0, 1)| exceeds 3 in far fewer than one pixel in a million.
_NOVELTY_Z0 = 3.0
# Scores needed before the robust statistics of the past are trusted enough to raise events.
_NOVELTY_MIN_HISTORY = 8

# Online fitting trains on a central crop of at most this size: bounded memory at any camera size.
_FIT_CROP = 256


def order_statistic(xp: Any, frames: list[Any], rank: int) -> Any:
    """Per-pixel ``rank``-th lowest value (0: minimum) of a short list of same-shape arrays.

    Built from ``minimum``/``maximum`` (an odd-even transposition sort, or a plain reduction for
    the extremes): portable across array namespaces, and for 3-9 frames several times faster
    than stacking and sorting.
    """
    a = list(frames)
    n = len(a)
    if rank == 0 or rank == n - 1:
        pick = xp.minimum if rank == 0 else xp.maximum
        out = a[0]
        for f in a[1:]:
            out = pick(out, f)
        return out
    for p in range(n):
        for i in range(p % 2, n - 1, 2):
            lo = xp.minimum(a[i], a[i + 1])
            a[i + 1] = xp.maximum(a[i], a[i + 1])
            a[i] = lo
    return a[rank]


def _soft(xp: Any, a: Any, t: float) -> Any:
    """Shrink towards zero: zero inside ``[-t, t]``, ``a - t**2 / a`` outside (the
    non-negative garrote: noise goes, bright objects keep nearly all their intensity)."""
    if t <= 0:
        return a
    a2 = a * a
    return a - a * (t * t) / xp.maximum(a2, t * t)


def _host(a: Any) -> Any:
    import numpy as np

    try:
        return to_numpy(a)
    except (TypeError, ValueError, RuntimeError):  # namespaces without __array__
        return np.from_dlpack(a)


def _lags(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):  # --param decompose.lags=1,2,4,8
        value = [int(v) for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    lags = tuple(sorted({int(v) for v in value}))
    if not lags or lags[0] < 1:
        raise EngineError(f"decompose: lags must be positive frame counts, got {value!r}")
    return lags


def _check_method(method: str) -> str | None:
    if method in ("rolling", "learned"):
        return None
    return (
        f"decompose: unknown method {method!r}; use method='rolling' (the default) or "
        "method='learned' (learned multi-lag predictors, see docs/decomposition.md)"
    )


def _check_slow_rank(rank: float) -> str | None:
    return None if 0.0 <= rank <= 1.0 else f"decompose: slow_rank is a fraction in [0, 1], got {rank}"


def _check_smooth(sigma: float) -> str | None:
    return None if 0.0 <= sigma <= 4.0 else f"decompose: smooth is a sigma in px in [0, 4], got {sigma}"


def _check_reach(reach: float) -> str | None:
    return None if 0.0 <= reach <= 2.0 else f"decompose: slow_reach is in px per frame in [0, 2], got {reach}"


# The slow test dilates a lagged frame by round(slow_reach * lag) px, at most this many.
_MAX_REACH = 4


def _shifted(xp: Any, a: Any, d: int, axis: int) -> Any:
    """``a`` shifted by ``d`` along ``axis`` (positive: towards higher indices), the edge row
    (column) repeated: scipy.ndimage's ``mode="nearest"``."""
    n = a.shape[axis]
    d = max(-(n - 1), min(n - 1, d))
    if d == 0:
        return a
    if axis == 0:
        edge = a[:1, :] if d > 0 else a[-1:, :]
        body = a[:-d, :] if d > 0 else a[-d:, :]
    else:
        edge = a[:, :1] if d > 0 else a[:, -1:]
        body = a[:, :-d] if d > 0 else a[:, -d:]
    pad = xp.concat([edge] * abs(d), axis=axis)
    return xp.concat([pad, body] if d > 0 else [body, pad], axis=axis)


def namespace_of(a: Any) -> Any:
    """numpy or cupy itself (not the array-API wrapper), for what the standard lacks."""
    import array_api_compat

    if array_api_compat.is_cupy_array(a):
        import cupy

        return cupy
    import numpy

    return numpy


def _is_numpy_or_cupy(a: Any) -> bool:
    import array_api_compat

    return bool(array_api_compat.is_numpy_array(a) or array_api_compat.is_cupy_array(a))


def gaussian_smooth(xp: Any, a: Any, sigma: float) -> Any:
    """Separable Gaussian blur truncated at 2 sigma, edges repeated (``mode="nearest"``):
    scipy.ndimage (cupyx for cupy) where there is one, shifted multiply-adds elsewhere."""
    r = int(math.ceil(2.0 * sigma))
    if sigma <= 0 or r == 0:
        return a
    weights = [math.exp(-(d * d) / (2.0 * sigma * sigma)) for d in range(-r, r + 1)]
    total = sum(weights)
    weights = [w / total for w in weights]
    if _is_numpy_or_cupy(a):
        ndi = ndimage_module(a)
        kernel = xp.asarray(weights, dtype=a.dtype)
        out = ndi.correlate1d(a, kernel, axis=0, mode="nearest")
        return ndi.correlate1d(out, kernel, axis=1, mode="nearest")
    out = a
    for axis in (0, 1):
        acc = out * weights[r]
        for d in range(1, r + 1):
            acc = acc + weights[r + d] * (_shifted(xp, out, d, axis) + _shifted(xp, out, -d, axis))
        out = acc
    return out


def smoothing_gain(sigma: float) -> float:
    """Factor by which ``gaussian_smooth`` scales white noise's standard deviation."""
    r = int(math.ceil(2.0 * sigma))
    if sigma <= 0 or r == 0:
        return 1.0
    weights = [math.exp(-(d * d) / (2.0 * sigma * sigma)) for d in range(-r, r + 1)]
    total = sum(weights)
    return sum((w / total) ** 2 for w in weights)  # sqrt(sum w^2) per axis, two axes


def dilate(xp: Any, a: Any, r: int) -> Any:
    """Per-pixel maximum over the (2r + 1)^2 square around it, clipped at the edges (the same
    as scipy.ndimage's ``maximum_filter(mode="nearest")``): shifted maxima, per axis."""
    if r <= 0:
        return a
    out = a
    for axis in (0, 1):
        src = out
        acc = src + 0.0
        for d in range(1, min(r, src.shape[axis] - 1) + 1):
            if axis == 0:
                acc[d:, :] = xp.maximum(acc[d:, :], src[:-d, :])
                acc[:-d, :] = xp.maximum(acc[:-d, :], src[d:, :])
            else:
                acc[:, d:] = xp.maximum(acc[:, d:], src[:, :-d])
                acc[:, :-d] = xp.maximum(acc[:, :-d], src[:, d:])
        out = acc
    return out


def shift_linear(xp: Any, a: Any, dy: float, dx: float) -> Any:
    """``a`` moved by (dy, dx) px (content at y goes to y + dy), linear interpolation, edges
    repeated (scipy.ndimage's ``shift(order=1, mode="nearest")``)."""
    out = a
    for axis, d in ((0, dy), (1, dx)):
        whole = math.floor(d)
        frac = d - whole
        moved = _shifted(xp, out, whole, axis)
        if frac > 1e-4:
            moved = moved * (1.0 - frac) + _shifted(xp, out, whole + 1, axis) * frac
        out = moved
    return out


# Stage drift (``follow_drift``): the field's shift is measured on a central crop of at most
# _DRIFT_CROP px; pixels off by more than _DRIFT_Z noise sigmas are left out; the background starts
# to follow once the field's offset from it, averaged over _DRIFT_FRAMES frames, exceeds _DRIFT_ON
# px *and* moving the background by that offset explains the frame better than moving it the
# opposite way: the residual energy (each pixel's squared residual capped at _DRIFT_Z^2 sigma^2,
# so objects count alike either way) drops by more than _DRIFT_GAIN sigma^2 per pixel, averaged
# the same way. Measured on the 44 movies of the family (bench/bench_decompose_family.py): stage
# drift of 0.05-0.12 px/frame reaches 1.08-1.24 (past _DRIFT_GAIN by frame 8-14), the 40 static
# scenes at most 0.091; the offset alone passed 0.15 px on nearly every static scene, and on
# crowded ones the background then followed a phantom drift of up to 6 px.
# The anchor the shift is then measured against is taken again every _DRIFT_ANCHOR frames.
_DRIFT_CROP = 256
_DRIFT_Z = 3.0
_DRIFT_FRAMES = 8
_DRIFT_ON = 0.15
_DRIFT_GAIN = 0.25
_DRIFT_MIN_PIXELS = 32 * 32  # a smaller field never follows (on 16x16 noise the gain is noise)
_DRIFT_ANCHOR = 64


_RESET = Applies.RESET  # the rolling state (ring, history, background, scores) starts over


@register_engine("decompose")
class Decompose(EngineBase):
    """One instance per (position, channel): all state lives in the instance."""

    name: ClassVar[str] = "decompose"
    outputs: ClassVar[tuple[str, ...]] = (
        "background",
        "slow",
        "fast",
        "residual",
        "novelty",
        "bleach",
    )
    scalar_outputs: ClassVar[tuple[str, ...]] = ("novelty", "bleach")
    passes: ClassVar[str | None] = None  # it splits, it does not restore
    saved_by_default: ClassVar[tuple[str, ...] | None] = ("background", "slow", "fast")  # residual: diagnostic

    parameters: ClassVar[dict[str, Param]] = {
        "lags": Param((1, 2, 4, 8), _lags, applies=Applies.REBUILD, show=list, doc="frame intervals compared"),
        "method": Param("rolling", str, check=_check_method, applies=Applies.REBUILD, doc="rolling or learned"),
        "background_window": Param(128, int, applies=_RESET, doc="frames the background spans"),
        "background_samples": Param(16, int, applies=_RESET, doc="decimated frames it keeps"),
        "background_percentile": Param(0.0, float),
        "background_clip": Param(2.0, float, doc="noise sigmas above the low percentile averaged in; 0: off"),
        "background_smooth": Param(0.5, float, check=_check_smooth, doc="Gaussian sigma (px) of the output background"),
        "slow_rank": Param(0.0, float, check=_check_slow_rank),
        "smooth": Param(1.0, float, check=_check_smooth, doc="Gaussian sigma (px) of the spatial prefilter; 0: off"),
        "slow_reach": Param(0.1, float, check=_check_reach, doc="px per frame a slow object may move"),
        "follow_drift": Param(True, as_bool, applies=_RESET, doc="move the background with stage drift"),
        "shrink_slow": Param(3.0, float),
        "shrink_fast": Param(2.0, float),
        "bleach_correction": Param(True, as_bool),
        "bleach_window": Param(256, int),
        "event_threshold": Param(8.0, float, doc="robust z-score of a frame's novelty that raises an event"),
        "event_min_novelty": Param(0.5, float),
        "event_block": Param(16, int, applies=_RESET),
        "novelty_window": Param(64, int),
        "model": Param(None, optional(str), setter="swap_model", doc="a fitted cascade (method learned)"),
        "backend": Param("auto", str),
        "fast_lag": Param(1.0, float),
        "fit_frames": Param(256, int, applies=_RESET, doc="frames collected for an online fit"),
        "fit_steps": Param(1500, int),
        "fit_seconds": Param(120.0, float),
        "fit_out": Param(None, optional(str)),
    }

    # the parameters as ``_init_params`` sets them (converted and checked)
    lags: tuple[int, ...]
    method: str
    background_window: int
    background_samples: int
    background_percentile: float
    background_clip: float
    background_smooth: float
    slow_rank: float
    smooth: float
    slow_reach: float
    follow_drift: bool
    shrink_slow: float
    shrink_fast: float
    bleach_correction: bool
    bleach_window: int
    event_threshold: float
    event_min_novelty: float
    event_block: int
    novelty_window: int
    model: str | None
    backend: str
    fast_lag: float
    fit_frames: int
    fit_steps: int
    fit_seconds: float
    fit_out: str | None

    def __init__(
        self,
        lags: tuple[int, ...] | list[int] | str = (1, 2, 4, 8),
        method: str = "rolling",
        background_window: int = 128,
        background_samples: int = 16,
        background_percentile: float = 0.0,
        background_clip: float = 2.0,
        background_smooth: float = 0.5,
        slow_rank: float = 0.0,
        smooth: float = 1.0,
        slow_reach: float = 0.1,
        follow_drift: bool = True,
        shrink_slow: float = 3.0,
        shrink_fast: float = 2.0,
        bleach_correction: bool = True,
        bleach_window: int = 256,
        event_threshold: float = 8.0,
        event_min_novelty: float = 0.5,
        event_block: int = 16,
        novelty_window: int = 64,
        model: str | None = None,
        backend: str = "auto",
        fast_lag: float = 1.0,
        fit_frames: int = 256,
        fit_steps: int = 1500,
        fit_seconds: float = 120.0,
        fit_out: str | None = None,
    ) -> None:
        self._init_params(locals())
        self._predictor: Any = None
        self._fit_state = "off"
        self._fit_lock = threading.Lock()
        self._fitted: tuple[int, Any] | None = None
        self._generation = 0
        if self.method == "learned" and self.model is not None:
            self._predictor = self._open_model(self.model)
        self.spec: StreamSpec | None = None
        self._reset()

    def _validate(self) -> None:
        if self.fit_frames < 2 * self.lags[-1] + 15:
            raise EngineError(
                f"decompose: fit_frames must be at least twice the longest lag + "
                f"15 ({2 * self.lags[-1] + 15}), got {self.fit_frames}"
            )
        if self.background_samples < 1 or self.background_window < self.background_samples:
            raise EngineError(
                "decompose: need 1 <= background_samples <= background_window, got "
                f"{self.background_samples} and {self.background_window}"
            )

    # -- engine protocol -------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Past frames that shape the output (warm-up when reprocessing in time chunks)."""
        return self.background_window

    def setup(self, spec: StreamSpec) -> None:
        self.spec = spec
        self._reset()

    def _rebuild(self, name: str) -> None:  # lags, method: the cascade follows them
        if self.method == "learned" and self.model is not None:
            self._predictor = self._open_model(self.model)
        self._reset_state(name)

    def _reset_state(self, name: str) -> None:
        log.info("decompose: %s changed, restarting the rolling state", name)
        self._reset()

    def _details(self) -> dict[str, Any]:
        return {
            "time_base": "seconds" if self._use_time else "frames",
            "interval": self._interval,
            "model_hash": self._predictor.model.hash if self._predictor is not None else None,
            "backend_running": self._predictor.backend if self._predictor is not None else None,
            "fit": self._fit_state if self.method == "learned" else None,
        }

    # -- pickling (process saves an in-order chain's state between time chunks) ---------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_fit_lock", None)  # locks, threads and backend sessions do not pickle
        predictor = state.pop("_predictor", None)
        state["_model_file"] = predictor.model if predictor is not None else None
        state["_fitted"] = None
        if state.get("_fit_state") in ("collecting", "fitting"):
            state["_fit_state"] = "off"  # a fit in flight is not carried over
            state["_fit_buf"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        model = state.pop("_model_file", None)
        self.__dict__.update(state)
        self._fit_lock = threading.Lock()
        self._predictor = None
        if model is not None:
            from .multilag import MultiLagPredictor

            self._predictor = MultiLagPredictor(model, self.backend)

    # -- learned predictors ----------------------------------------------------------------

    def _open_model(self, path: str | Path) -> Any:
        from .modelfile import load
        from .multilag import MultiLagPredictor

        predictor = MultiLagPredictor(load(path), self.backend)
        model_lags = tuple(sorted(int(round(v)) for v in predictor.lags))
        if model_lags != self.lags:
            log.info("decompose: the model was fitted with lags %s; using them instead of %s", model_lags, self.lags)
            self.lags = model_lags
        return predictor

    def swap_model(self, path: str | Path | None) -> None:
        """Load a fitted cascade now and use it from the next frame on (a bad file raises here
        and leaves the running method in place)."""
        if path in (None, "", "none", "None"):
            self._predictor = None
            self.model = None
            return
        old_lags = self.lags
        predictor = self._open_model(path)
        self._predictor = predictor
        self.model = str(path)
        self.method = "learned"
        if self.lags != old_lags:
            self._reset()
        log.info("decompose: learned model %s (%s) in use", path, predictor.model.hash)

    def close(self) -> None:
        self._reset()

    # -- state -----------------------------------------------------------------------------

    def _reset(self) -> None:
        self._n = 0  # frames seen
        # Ring of recent bleach-corrected frames with their times, long enough for the longest
        # lag even when frames come twice as fast as the nominal interval.
        self._ring_len = 2 * self.lags[-1] + 1
        self._ring: Any = None
        self._ring_t: list[float] = []
        self._ring_pos = 0
        # Decimated history for the background percentile.
        self._hist: Any = None
        self._hist_n = 0
        self._hist_pos = 0
        self._hist_frames = [1] * self.background_samples  # frames averaged in each sample
        # The noise sigma of one of its frames, as it was then: bleach correction amplifies the
        # noise as the stream fades, so the samples of the past are less noisy than the frame now.
        self._hist_sigma = [0.0] * self.background_samples
        self._acc_sigma = 0.0
        self._spacing = 1  # frames per sample now: doubles (pairs merged) until the window is spanned
        self._acc: Any = None
        self._acc_n = 0
        # Stage drift: where the field is now relative to the history's frame of reference (px),
        # whether the background follows it yet, and the drift summed over the frames in `_acc`.
        self._drift = (0.0, 0.0)
        self._drift_on = False
        self._acc_drift = (0.0, 0.0)
        self._drift_mean = (0.0, 0.0)  # the field's offset from the background, averaged
        self._drift_gain = 0.0  # what moving the background by that offset explains, averaged
        self._anchor: Any = None  # what the drift is measured against once the background follows
        self._anchor_at = (0.0, 0.0)  # the drift when the anchor was taken
        self._anchor_age = 0  # frames since
        self._background: Any = None
        self._background_s: Any = None  # the background smoothed as the frames are compared
        self._background_s_sigma = -1.0  # the smoothing it was made with (-1: not made)
        self._background_o: Any = None  # the background as output (`background_smooth`)
        self._background_o_sigma = -1.0
        self._stripe = 0
        # Noise (sigma of one frame, corrected units), a slow running estimate.
        self._sigma: float | None = None
        # Exponential-forgetting sums for the fit log(mean) = a + b t.
        self._fit = [0.0, 0.0, 0.0, 0.0, 0.0]  # S0, St, Stt, Sy, Sty
        self._t0: float | None = None
        # Time base.
        self._use_time = True
        self._last_ts: float | None = None
        self._intervals: list[float] = []
        self._interval: float | None = None
        self._scores: deque[float] = deque(maxlen=self.novelty_window)
        self._field_scores: deque[float] = deque(maxlen=self.novelty_window)  # engines/events.py
        self._groups = EventGroups()  # similar events share a group id (engines/events.py)
        # Online fitting: frames collected for it (host copies of a central crop).
        self._fit_buf: list[Any] = []
        self._generation = getattr(self, "_generation", 0) + 1  # a fit started before is stale
        if getattr(self, "_fit_state", "off") in ("collecting", "fitting"):
            self._fit_state = "off"

    def state_nbytes(self) -> int:
        """Bytes of frame-sized state held (constant once the buffers are full)."""
        total = 0
        frames = (self._ring, self._hist, self._background, self._background_s, self._background_o, self._acc)
        for a in (*frames, self._anchor):
            if a is not None:
                total += int(a.size) * 4
        return total

    # -- per frame -------------------------------------------------------------------------

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        xp = namespace(frame)
        raw = xp.astype(frame, xp.float32)
        if raw.ndim != 2:
            raise EngineError(
                f"decompose works on (y, x) planes, got shape {tuple(raw.shape)}; "
                "send planes (needs_volume is False for this engine)"
            )
        if self._ring is not None and tuple(self._ring.shape[1:]) != tuple(raw.shape):
            log.warning("decompose: frame shape changed to %s, restarting", tuple(raw.shape))
            self._reset()
        t = self._time(info)
        if self._ring is None:
            self._allocate(xp, raw.shape)

        gain = self._bleach_gain(xp, raw, t)
        # Bleaching scales the light, not the camera's offset (`dark`): corrected = (raw - dark)
        # * gain + dark. (Scaling the offset too made a constant that grows with the correction,
        # which the lagging background does not follow: it read as `slow` everywhere.)
        dark = self._offset()
        cur = (raw - dark) * gain + dark if gain != 1.0 else raw
        corrected = cur
        smooth = self.smooth if self.method == "rolling" else 0.0
        if smooth > 0:
            # The rolling method compares spatially smoothed frames: far less noise in every
            # order statistic (objects are wider than a pixel). The background keeps the sharp
            # frames (a thin filament stays thin); what smoothing removes goes to `residual`.
            cur = gaussian_smooth(xp, cur, smooth)

        lagged = self._lagged(t)  # buffered corrected frames, one per lag
        if lagged:
            self._update_sigma(xp, cur, lagged[0])
        sigma = self._sigma if self._sigma is not None else 0.0  # of `cur` (smoothed)
        sigma_frame = sigma / smoothing_gain(smooth)  # of one corrected frame (white noise)

        self._take_fitted()
        if self._predictor is not None and lagged:
            return self._process_learned(xp, raw, cur, t, gain, dark, lagged, sigma, info)
        if self.method == "learned" and self.model is None:
            self._collect_for_fit(cur)

        if self.follow_drift:
            self._track_drift(xp, cur, smooth, sigma)
        self._insert_history(xp, corrected, sigma_frame)
        rows = self._update_background(xp)
        # The background as output: lightly smoothed (`background_smooth`): it is a mean of few
        # samples per pixel, noisy on dim movies. And as `cur` is compared with it.
        bg_sharp = self._smoothed_background(xp, self.background_smooth, rows, "_background_o")
        bg = self._smoothed_background(xp, smooth, rows)
        if self._drift_on:  # the history is kept where the field was: move it to where it is
            dy, dx = self._drift
            bg_sharp = shift_linear(xp, bg_sharp, dy, dx)
            bg = shift_linear(xp, bg, dy, dx) if smooth > 0 else bg_sharp

        # Slow: what the frame and (nearly) all its lagged frames hold: a low order statistic
        # over them, plus its expected noise offset so that noise averages to zero.
        n = len(lagged) + 1
        rank = min(n - 1, max(0, round(self.slow_rank * (n - 1))))
        if n > 1:
            offset = -statistics.NormalDist().inv_cdf((rank + 1 - 0.375) / (n + 0.25)) * sigma
            # A slow object may move round(slow_reach * lag) px by lag k: the lagged frame is
            # dilated by that much, so its leading edge still counts as present at every lag.
            reach = [min(_MAX_REACH, int(round(self.slow_reach * lag))) for lag in self.lags[: len(lagged)]]
            seen = [dilate(xp, f, r) for f, r in zip(lagged, reach, strict=True)]
            slow_raw = order_statistic(xp, [cur, *seen], rank) - bg + offset
        else:
            slow_raw = cur - bg
        # 0.6 sigma: about the noise of a low order statistic of 3-9 frames.
        slow = _soft(xp, slow_raw, self.shrink_slow * sigma * 0.6)
        fast = _soft(xp, cur - bg - slow_raw, self.shrink_fast * sigma)

        novelty, excess = self._novelty(xp, cur, lagged, sigma)
        events = self._events(novelty, excess, info)
        if events:  # what each event likely is, and its group (engines/events.py)
            self._describe_events(events, excess, cur, lagged, bg, fast, sigma)

        self._push_ring(cur, t)
        self._n += 1

        inv = 1.0 / gain
        # a fresh array the caller may keep
        background = (bg_sharp - dark) * inv + dark if inv != 1.0 else bg_sharp + 0.0
        slow = slow * inv if inv != 1.0 else slow
        fast = fast * inv if inv != 1.0 else fast
        residual = raw - background - slow - fast
        return {
            "background": background,
            "slow": slow,
            "fast": fast,
            "residual": residual,
            "novelty": novelty,
            "bleach": inv,
            "events": events,
        }

    def _process_learned(
        self,
        xp: Any,
        raw: Any,
        cur: Any,
        t: float,
        gain: float,
        dark: float,
        lagged: list[Any],
        sigma: float,
        info: FrameInfo,
    ) -> dict[str, Any]:
        from .multilag import components

        predictor = self._predictor  # one reference for the whole frame: a swap lands between
        inputs = self._octaves(xp, t)  # longest lag first
        shares_np = predictor.predict([_host(f) for f in inputs])
        shares = xp.asarray(shares_np)
        split = components(predictor.lags, self.fast_lag)
        zero = xp.zeros(cur.shape, dtype=xp.float32)

        def total(idx: list[int]) -> Any:
            out = zero
            for i in idx:
                out = out + shares[i, ...]
            return out

        bg, slow, fast = (total(split[k]) for k in ("background", "slow", "fast"))
        residual_c = cur - bg - slow - fast
        # Novelty: signal in the frame that neither the fitted predictors nor any lag's input
        # explains: the positive residual, capped by the frame's excess over each input. Not
        # the residual's absolute value: an object that vanishes leaves a negative residual for
        # every lag that still holds it. And not the residual alone: after a sudden event the
        # networks, which never saw one, over- and undershoot around it while it is in their
        # inputs, and that echo read as new events 2-3 frames later.
        unexplained = residual_c
        for inp in inputs:
            unexplained = xp.minimum(unexplained, cur - inp)
        novelty, excess = self._novelty_map(xp, unexplained * (1.0 / max(sigma, 1e-12)), sigma)
        events = self._events(novelty, excess, info)
        if events:
            self._describe_events(events, excess, cur, lagged, bg, fast, sigma)
        self._push_ring(cur, t)
        self._n += 1
        inv = 1.0 / gain
        if inv != 1.0:
            bg, slow, fast = (bg - dark) * inv + dark, slow * inv, fast * inv
        return {
            "background": bg,
            "slow": slow,
            "fast": fast,
            "residual": raw - bg - slow - fast,
            "novelty": novelty,
            "bleach": inv,
            "events": events,
        }

    def _collect_for_fit(self, cur: Any) -> None:
        if self._fit_state not in ("off", "collecting"):
            return
        import numpy as np

        h, w = cur.shape
        ch, cw = min(h, _FIT_CROP), min(w, _FIT_CROP)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        self._fit_buf.append(np.array(_host(cur[y0 : y0 + ch, x0 : x0 + cw]), dtype=np.float32))
        self._fit_state = "collecting"
        if len(self._fit_buf) < self.fit_frames:
            return
        frames = np.stack(self._fit_buf)
        self._fit_buf = []
        self._fit_state = "fitting"
        generation = self._generation
        thread = threading.Thread(target=self._fit_thread, args=(frames, generation), name="decompose-fit", daemon=True)
        thread.start()

    def _fit_thread(self, frames: Any, generation: int) -> None:
        try:
            from .multilag import fit_multilag

            model = fit_multilag(
                frames,
                lags=self.lags,
                steps=self.fit_steps,
                time_budget_s=self.fit_seconds,
                metadata={"fitted_on": "online, the stream's first frames"},
            )
            if self.fit_out:
                model.save(self.fit_out)
        except Exception as exc:  # the rolling method goes on; the reason is in the log
            log.error("decompose: online fit failed (%s); staying with the rolling method", exc)
            with self._fit_lock:
                if generation == self._generation:
                    self._fit_state = f"failed: {exc}"
            return
        with self._fit_lock:
            if generation == self._generation:
                self._fitted = (generation, model)

    def _take_fitted(self) -> None:
        with self._fit_lock:
            fitted, self._fitted = self._fitted, None
        if fitted is None or fitted[0] != self._generation:
            return
        from .multilag import MultiLagPredictor

        model = fitted[1]
        self._predictor = MultiLagPredictor(model, self.backend)
        self._fit_state = f"fitted {model.hash}"
        if self.fit_out:
            self.model = self.fit_out
        log.info(
            "decompose: online fit done (%s, %s steps); learned predictors in use",
            model.hash,
            model.metadata["training"]["steps"],
        )

    def _allocate(self, xp: Any, shape: tuple[int, ...]) -> None:
        self._ring = xp.zeros((self._ring_len, *shape), dtype=xp.float32)
        self._hist = xp.zeros((self.background_samples, *shape), dtype=xp.float32)
        self._background = xp.zeros(shape, dtype=xp.float32)
        self._background_s = xp.zeros(shape, dtype=xp.float32)
        self._background_o = xp.zeros(shape, dtype=xp.float32)
        self._acc = xp.zeros(shape, dtype=xp.float32)

    # -- time base -------------------------------------------------------------------------

    def _time(self, info: FrameInfo) -> float:
        ts = float(info.timestamp)
        if self._use_time and self._last_ts is not None and not ts > self._last_ts:
            log.info("decompose: timestamps do not increase; lags count frames instead")
            self._use_time = False
            k = len(self._ring_t)
            self._ring_t = [float(self._n - k + i) for i in range(k)]
            self._interval = 1.0
        if not self._use_time:
            return float(self._n)
        if self._last_ts is not None and self._interval is None:
            self._intervals.append(ts - self._last_ts)
        self._last_ts = ts
        if self._interval is None:
            nominal = self.spec.interval_s if self.spec is not None else None
            if nominal:
                self._interval = float(nominal)
            elif len(self._intervals) >= 4:
                self._interval = statistics.median(self._intervals)  # fixed from now on
        return ts

    def _lagged(self, t: float) -> list[Any]:
        """The buffered frame nearest in time to t - lag * interval, for each lag."""
        if not self._ring_t:
            return []
        interval = self._interval
        if interval is None:  # too early to know: the frames seen so far set the pace
            interval = statistics.median(self._intervals) if self._intervals else 1.0
        times = self._ring_t
        out = []
        for lag in self.lags:
            target = t - lag * interval
            best = min(range(len(times)), key=lambda i: (abs(times[i] - target), times[i]))
            out.append(self._ring[(self._ring_pos - len(times) + best) % self._ring_len, ...])
        return out

    def _octaves(self, xp: Any, t: float) -> list[Any]:
        """The learned predictors' inputs, longest lag first: for lag k the mean of the buffered
        frames from k to 2k - 1 intervals back (by time), or the frame nearest to k back when
        none falls in that span (early in the stream, or after the interval changed)."""
        interval = self._interval
        if interval is None:
            interval = statistics.median(self._intervals) if self._intervals else 1.0
        times = self._ring_t
        n = len(times)
        out = []
        for lag in reversed(self.lags):
            near, far = t - (lag - 0.5) * interval, t - (2 * lag - 0.5) * interval
            picks = [i for i in range(n) if far < times[i] <= near]
            if not picks:
                target = t - lag * interval
                picks = [min(range(n), key=lambda i: (abs(times[i] - target), times[i]))]
            slots = [(self._ring_pos - n + i) % self._ring_len for i in picks]
            acc = self._ring[slots[0], ...]
            for slot in slots[1:]:
                acc = acc + self._ring[slot, ...]
            out.append(acc * (1.0 / len(slots)) if len(slots) > 1 else acc)
        return out

    def _push_ring(self, cur: Any, t: float) -> None:
        # _ring_t lists the buffered times oldest first; the slot of entry i is
        # (_ring_pos - len + i) mod ring_len.
        self._ring[self._ring_pos, ...] = cur
        self._ring_pos = (self._ring_pos + 1) % self._ring_len
        self._ring_t.append(t)
        if len(self._ring_t) > self._ring_len:
            self._ring_t.pop(0)

    # -- photobleaching --------------------------------------------------------------------

    def _bleach_gain(self, xp: Any, raw: Any, t: float) -> float:
        if not self.bleach_correction:
            return 1.0
        if self._t0 is None:
            self._t0 = t
        level = float(xp.mean(raw)) - self._offset()
        if level <= 0:
            return self._gain_from_fit(t)
        y = math.log(level)
        forget = 1.0 - 1.0 / max(self.bleach_window, 2)
        tt = t - self._t0
        f = self._fit
        for i, v in enumerate((1.0, tt, tt * tt, y, tt * y)):
            f[i] = f[i] * forget + v
        return self._gain_from_fit(t)

    def _offset(self) -> float:
        """The camera's offset (counts without light) where the stream says, else 0."""
        if self.spec is not None and self.spec.camera_offset is not None:
            return float(self.spec.camera_offset)
        return 0.0

    def _gain_from_fit(self, t: float) -> float:
        s0, st, stt, sy, sty = self._fit
        den = s0 * stt - st * st
        if self._n < 3 or den <= 1e-12 * max(1.0, s0 * stt):
            return 1.0
        slope = (s0 * sty - st * sy) / den
        # Only a decay is bleaching; a brightening field (cells moving in) is left alone.
        slope = min(slope, 0.0)
        return math.exp(-slope * (t - (self._t0 or 0.0)))

    # -- noise and background --------------------------------------------------------------

    def _update_sigma(self, xp: Any, cur: Any, prev: Any) -> None:
        # MAD of the lag-1 difference on a sparse grid: robust to the few moving objects.
        h, w = cur.shape
        step = max(1, int(math.sqrt(h * w / 16384)))
        d = xp.reshape(xp.abs(cur[::step, ::step] - prev[::step, ::step]), (-1,))
        d = xp.sort(d)
        mad = float(d[d.shape[0] // 2])
        sigma = 1.4826 * mad / math.sqrt(2.0)
        self._sigma = sigma if self._sigma is None else 0.9 * self._sigma + 0.1 * sigma

    def _track_drift(self, xp: Any, cur: Any, smooth: float, sigma: float) -> None:
        """The field's global shift, measured on a central crop of the (smoothed) frame (see
        `_register`). While the background stays put: against the background, from no shift. The
        background starts to follow once that offset, averaged over `_DRIFT_FRAMES` frames,
        exceeds `_DRIFT_ON` px (a static scene never pays for the moves). From then on: against
        an anchor, the background as it was at some frame with the drift then, taken again every
        `_DRIFT_ANCHOR` frames. Not against the running background: that follows the estimate,
        so its errors would add up frame after frame (the background wandering off)."""
        if sigma <= 0 or self._hist_n < 4:
            return
        h, w = cur.shape
        ch, cw = min(h, _DRIFT_CROP), min(w, _DRIFT_CROP)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        ref = self._background_s if smooth > 0 and self._background_s_sigma == smooth else self._background
        frame = cur[y0 : y0 + ch, x0 : x0 + cw]
        if not self._drift_on:
            step = self._register(xp, frame, ref[y0 : y0 + ch, x0 : x0 + cw], 0.0, 0.0, sigma, 0)
            if step is None:
                return
            self._drift = step
            # Stage drift pushes the field off the (lagging) background in one direction, frame
            # after frame; noise and moving objects push it about: average the offset first.
            my, mx = self._drift_mean
            a = 1.0 / _DRIFT_FRAMES
            self._drift_mean = (my + a * (step[0] - my), mx + a * (step[1] - mx))
            gain = self._shift_gain(xp, frame, ref[y0 : y0 + ch, x0 : x0 + cw], step, sigma)
            self._drift_gain += a * (gain - self._drift_gain)
            self._drift_on = math.hypot(*self._drift_mean) > _DRIFT_ON and self._drift_gain > _DRIFT_GAIN
            return
        dy, dx = self._drift
        if self._anchor is None or self._anchor_age >= _DRIFT_ANCHOR:
            self._anchor = shift_linear(xp, ref, dy, dx)[y0 : y0 + ch, x0 : x0 + cw] + 0.0
            self._anchor_at = (dy, dx)
            self._anchor_age = 0
        self._anchor_age += 1
        ay, ax = self._anchor_at
        edge = int(math.ceil(max(abs(ay), abs(ax)))) if ch == h or cw == w else 0  # repeated edges
        at = self._register(xp, frame, self._anchor, dy - ay, dx - ax, sigma, edge)
        if at is not None:
            self._drift = (ay + at[0], ax + at[1])

    @staticmethod
    def _shift_gain(xp: Any, frame: Any, ref: Any, step: tuple[float, float], sigma: float) -> float:
        """How much better ``ref`` moved by ``step`` explains ``frame`` than ``ref`` moved the
        other way: the drop of the mean capped squared residual, in units of sigma^2 (each
        residual's median taken out first; the cap keeps objects from counting). Against the
        opposite move, not against no move: interpolating smooths ``ref``'s noise, which would
        make any move look better on a flat, noisy field."""
        ch, cw = frame.shape
        m = int(math.ceil(max(abs(step[0]), abs(step[1])))) + 2
        if (ch - 2 * m) * (cw - 2 * m) < _DRIFT_MIN_PIXELS:  # too few to tell a move from noise
            return 0.0
        inner = (slice(m, ch - m), slice(m, cw - m))
        cap = _DRIFT_Z * _DRIFT_Z * sigma * sigma
        energy = []
        for sign in (-1.0, 1.0):
            r = frame[inner] - shift_linear(xp, ref, sign * step[0], sign * step[1])[inner]
            # the median on a sparse grid (objects would pull a mean off by sigmas)
            h, w = r.shape
            every = max(1, math.ceil(math.sqrt(h * w / 4096)))  # at most ~4096 values sorted
            sample = xp.sort(xp.reshape(r[::every, ::every], (-1,)))
            r = r - sample[sample.shape[0] // 2]
            energy.append(float(xp.mean(xp.minimum(r * r, xp.asarray(cap, dtype=r.dtype)))))
        return (energy[0] - energy[1]) / (sigma * sigma)

    def _register(self, xp: Any, frame: Any, ref: Any, dy: float, dx: float, sigma: float, edge: int) -> Any:
        """The shift (px) of ``frame`` against ``ref``, from (dy, dx): a coarse Lucas-Kanade step
        that tolerates a 1 px misfit, then a fine one that leaves out all but the noise."""
        coarse = self._lucas_kanade(xp, frame, ref, dy, dx, sigma, edge, 1.0)
        if coarse is None:
            return None
        dy, dx = dy + coarse[0], dx + coarse[1]
        fine = self._lucas_kanade(xp, frame, ref, dy, dx, sigma, edge, 0.0)
        return (dy, dx) if fine is None else (dy + fine[0], dx + fine[1])

    def _lucas_kanade(
        self, xp: Any, frame: Any, ref: Any, dy: float, dx: float, sigma: float, edge: int, misfit: float
    ) -> tuple[float, float] | None:
        """The shift (px) still left between ``frame`` and ``ref`` moved by (dy, dx); ``edge``
        px at the border of ``ref`` are not to be trusted. Pixels off by more than 3 sigma of the
        noise plus what a ``misfit`` px error of the shift makes there are left out (objects)."""
        ch, cw = frame.shape
        ref = shift_linear(xp, ref, dy, dx)
        m = int(math.ceil(max(abs(dy), abs(dx)))) + edge + 2  # moved: its edges are repeated
        if ch <= 2 * m + 2 or cw <= 2 * m + 2:
            return None
        inner = (slice(m, ch - m), slice(m, cw - m))
        gy = (ref[m + 1 : ch - m + 1, m : cw - m] - ref[m - 1 : ch - m - 1, m : cw - m]) * 0.5
        gx = (ref[m : ch - m, m + 1 : cw - m + 1] - ref[m : ch - m, m - 1 : cw - m - 1]) * 0.5
        r = frame[inner] - ref[inner]
        r = r - xp.mean(r)
        tol = (_DRIFT_Z * _DRIFT_Z) * (sigma * sigma + (misfit * misfit) * (gy * gy + gx * gx))
        keep = xp.astype(r * r < tol, r.dtype)
        gy, gx, r = gy * keep, gx * keep, r * keep
        a, b, c = float(xp.sum(gy * gy)), float(xp.sum(gy * gx)), float(xp.sum(gx * gx))
        ey, ex = float(xp.sum(gy * r)), float(xp.sum(gx * r))
        det = a * c - b * b
        if det <= 1e-12 * max(1.0, a * c):
            return None
        # r = -(step . gradient): the 2x2 normal equations, at most 1 px per step
        sy = max(-1.0, min(1.0, -(c * ey - b * ex) / det))
        sx = max(-1.0, min(1.0, -(a * ex - b * ey) / det))
        return sy, sx

    def _insert_history(self, xp: Any, cur: Any, sigma: float) -> None:
        # Each history sample is the mean of `spacing` consecutive frames (box filter, then
        # decimate): less noise, and a particle passing through counts for 1/spacing only.
        # The history always spans the whole past: every frame goes in until it is full, then
        # adjacent samples are merged in pairs and the spacing doubles, until the samples span
        # background_window frames; from then on it is a ring.
        m = self.background_samples
        every = max(1, self.background_window // m)
        if self._acc_n == 0:
            self._acc[...] = cur
            self._acc_drift = self._drift
            self._acc_sigma = sigma
        else:
            self._acc += cur
            self._acc_sigma += sigma
            self._acc_drift = (self._acc_drift[0] + self._drift[0], self._acc_drift[1] + self._drift[1])
        self._acc_n += 1
        if self._acc_n < self._spacing:
            return
        if self._hist_n == m and self._spacing < every:
            self._merge_history(m)
        sample = self._acc * (1.0 / self._acc_n)
        if self._drift_on:  # back to the history's frame of reference, by the frames' mean drift
            sample = shift_linear(xp, sample, -self._acc_drift[0] / self._acc_n, -self._acc_drift[1] / self._acc_n)
        self._hist[self._hist_pos, ...] = sample
        self._hist_frames[self._hist_pos] = self._acc_n
        self._hist_sigma[self._hist_pos] = self._acc_sigma / self._acc_n
        self._acc_n = 0
        self._hist_pos = (self._hist_pos + 1) % m
        self._hist_n = min(self._hist_n + 1, m)

    def _merge_history(self, m: int) -> None:
        """Merge adjacent samples in pairs (weighted by the frames each holds), oldest first."""
        f, s = self._hist_frames, self._hist_sigma
        k = 0
        for i in range(0, m - 1, 2):
            w0, w1 = f[i], f[i + 1]
            self._hist[k, ...] = (self._hist[i, ...] * w0 + self._hist[i + 1, ...] * w1) * (1.0 / (w0 + w1))
            s[k] = (s[i] * w0 + s[i + 1] * w1) / (w0 + w1)
            f[k] = w0 + w1
            k += 1
        if m % 2:
            self._hist[k, ...] = self._hist[m - 1, ...]
            f[k], s[k] = f[m - 1], s[m - 1]
            k += 1
        self._hist_n = k
        self._hist_pos = k % m
        self._spacing = min(2 * self._spacing, max(1, self.background_window // m))
        self._stripe = 0

    def _smoothed_background(self, xp: Any, sigma: float, rows: tuple[int, int], name: str = "_background_s") -> Any:
        """The background smoothed by ``sigma`` (kept in the attribute ``name``, with the sigma it
        was made with in ``name + "_sigma"``); only the rows that changed are redone (with a
        margin of twice the kernel radius: exact, the edges clamp as in the whole image)."""
        if sigma <= 0:
            return self._background
        out = getattr(self, name)
        h = self._background.shape[0]
        r = int(math.ceil(2.0 * sigma))
        if sigma != getattr(self, name + "_sigma"):
            rows = (0, h)
            setattr(self, name + "_sigma", sigma)
        r0, r1 = rows
        if r1 <= r0:
            return out
        a0, a1 = max(0, r0 - 2 * r), min(h, r1 + 2 * r)
        w0, w1 = max(0, r0 - r), min(h, r1 + r)
        part = gaussian_smooth(xp, self._background[a0:a1, ...], sigma)
        out[w0:w1, ...] = part[w0 - a0 : w1 - a0, ...]
        return out

    def _update_background(self, xp: Any) -> tuple[int, int]:
        """Re-sort one stripe of the history's percentile; returns the rows that changed."""
        n = self._hist_n
        h = self._hist.shape[1]
        if n == 1:  # the first frame is the first guess
            self._background[...] = self._hist[0, ...]
            return 0, h
        # Constant cost per frame: one horizontal stripe of the percentile each frame, the whole
        # image every `every` frames (the history changes no faster than that, once full).
        # Early on (short spacing) the history changes every few frames, and so is re-sorted
        # as often.
        stripes = max(1, min(self.background_window // self.background_samples, self._spacing))
        rows = -(-h // stripes)
        r0 = (self._stripe % stripes) * rows
        r1 = min(h, r0 + rows)
        self._stripe += 1
        q = self.background_percentile / 100.0
        rank = min(n - 1, max(0, round(q * (n - 1))))
        stack = self._hist[:n, r0:r1, :]
        if _is_numpy_or_cupy(stack):  # a partial sort where the namespace has one
            low = namespace_of(stack).partition(stack, rank, axis=0)[rank, ...]
        else:
            low = xp.sort(stack, axis=0)[rank, ...]
        # A low rank of n noisy samples sits below their mean: add the expected offset back
        # (Blom's approximation of normal order statistics).
        bias = -statistics.NormalDist().inv_cdf((rank + 1 - 0.375) / (n + 0.25))
        averaged = statistics.median(self._hist_frames[:n])
        noise = statistics.median(self._hist_sigma[:n]) / math.sqrt(averaged)  # of one history sample
        level = low + bias * noise
        clip = self.background_clip
        if clip > 0 and noise > 0 and n > 2:
            # Clipped mean: the samples up to `clip` noise sigmas above the percentile's level,
            # averaged (an order statistic alone is noisy), plus the mean offset of a normal
            # truncated there. Objects that pass lie above and stay out.
            keep = stack <= level + clip * noise
            count = xp.sum(xp.astype(keep, stack.dtype), axis=0)
            total = xp.sum(xp.where(keep, stack, xp.zeros_like(stack)), axis=0)
            z = statistics.NormalDist()
            cut = z.pdf(clip) / max(z.cdf(clip), 1e-6)
            mean = total / xp.maximum(count, xp.ones_like(count)) + cut * noise
            level = xp.where(count > 0, mean, level)
        self._background[r0:r1, ...] = level
        return r0, r1

    # -- novelty and events ----------------------------------------------------------------

    def _novelty(self, xp: Any, cur: Any, lagged: list[Any], sigma: float) -> tuple[float, Any]:
        if not lagged or sigma <= 0:
            return 0.0, None
        err = xp.abs(cur - lagged[0])
        for prev in lagged[1:]:
            err = xp.minimum(err, xp.abs(cur - prev))
        return self._novelty_map(xp, err * (1.0 / math.sqrt(2.0) / sigma), sigma)

    def _novelty_map(self, xp: Any, z: Any, sigma: float) -> tuple[float, Any]:
        """Score from a per-pixel error in noise sigmas: the excess over 3 sigma, averaged per
        block; the frame's score is its most novel block."""
        if sigma <= 0:
            return 0.0, None
        excess = xp.clip(z - _NOVELTY_Z0, 0.0, None)
        h, w = excess.shape
        b = max(1, min(self.event_block, h, w))
        hb, wb = h // b, w // b
        blocks = xp.reshape(excess[: hb * b, : wb * b], (hb, b, wb, b))
        means = xp.sum(blocks, axis=(1, 3)) * (1.0 / (b * b))
        return float(xp.max(means)), excess

    def _events(self, novelty: float, excess: Any, info: FrameInfo) -> list[dict[str, Any]]:
        # Two channels, each a robust z-score against its own past (engines/events.py): the most
        # novel block (local) and the fraction of blocks holding novel signal (whole field).
        past = list(self._scores)
        self._scores.append(novelty)
        field = field_fraction(namespace(excess), excess, self.event_block) if excess is not None else 0.0
        past_field = list(self._field_scores)
        self._field_scores.append(field)
        warm = self._n >= self.lags[-1] and len(past) >= _NOVELTY_MIN_HISTORY
        if excess is None or not warm:
            return []
        score, channel = event_score(past, novelty, past_field, field, self.event_min_novelty)
        if score < self.event_threshold:
            return []
        event = self._event_region(_host(excess), info, score, novelty)
        event["channel"] = channel
        return [event]

    def _describe_events(
        self, events: list[dict[str, Any]], excess: Any, cur: Any, lagged: list[Any], bg: Any, fast: Any, sigma: float
    ) -> None:
        """Add what each event likely is (kind, component, lag, size, motion) and its group."""
        for event in events:
            describe(
                event,
                excess=_host(excess),
                frame=_host(cur),
                lagged=[_host(f) for f in lagged],
                lags=self.lags[: len(lagged)],
                background=_host(bg),
                fast=_host(fast),
                sigma=sigma,
                block=self.event_block,
            )
            self._groups.assign(event)

    def _event_region(self, excess: Any, info: FrameInfo, score: float, novelty: float) -> dict:
        import numpy as np

        b = max(1, min(self.event_block, *excess.shape))
        hb, wb = excess.shape[0] // b, excess.shape[1] // b
        means = excess[: hb * b, : wb * b].reshape(hb, b, wb, b).mean(axis=(1, 3))
        by, bx = np.unravel_index(int(np.argmax(means)), means.shape)
        # Grow from the most novel block to the 8-connected blocks above half its score.
        keep = np.zeros_like(means, dtype=bool)
        todo = [(by, bx)]
        while todo:
            y, x = todo.pop()
            if keep[y, x] or means[y, x] < 0.5 * means[by, bx]:
                continue
            keep[y, x] = True
            todo += [
                (y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if 0 <= y + dy < hb and 0 <= x + dx < wb
            ]
        mask = np.kron(keep, np.ones((b, b), dtype=bool))
        region = np.where(mask, excess[: hb * b, : wb * b], 0.0)
        ys, xs = np.nonzero(region)
        wts = region[ys, xs]
        return {
            "kind": "novelty",
            "seq": int(info.seq),
            "timestamp": float(info.timestamp),
            "score": float(score),
            "novelty": float(novelty),
            "bbox": [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1],
            "centroid": [float((ys * wts).sum() / wts.sum()), float((xs * wts).sum() / wts.sum())],
        }
