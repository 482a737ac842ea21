"""The viewer's state apart from its widgets, as plain Python (no Qt), tested alone.

As napari keeps its ``ViewerModel`` apart from its Qt viewer, :class:`ViewerState` holds what the
live viewer shows and decides, and :class:`~.viewer.LiveViewer` only draws it and forwards what
the user does:

- the stream shown and whether it follows live mode (:class:`~.streams.StreamChooser`), the
  position / channel / z picked there and the values seen on each axis, the products it has;
- which frames update the panels (:meth:`ViewerState.accept_frame`), pause, the event in focus
  (a clicked novelty event) and the ring on the newest one;
- the overlays (channels in their colours, the trust map), continuous auto-levels and each
  panel's levels (:class:`PanelLevels`: auto, or fixed by hand), hidden panels, colour maps, the ROI;
- the banner's messages, the daemon's newest status and events, the display's frame rate.

What the settings file keeps (``ui/settings.py``) is :meth:`ViewerState.to_settings` /
:meth:`ViewerState.from_settings`: the keys and JSON values of :data:`SETTINGS_DEFAULTS`,
unchanged from the viewer's earlier layout files.

A frame's key is ``(stream, product, p, c, z)``, as ``PreviewSubscriber.latest()`` gives it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .streams import AXES, StreamChooser

__all__ = [
    "ViewerState",
    "PanelLevels",
    "PreviewsNoted",
    "SETTINGS_DEFAULTS",
    "ORDER",
    "DECOMPOSITION",
    "RESTORED",
    "HIDDEN_BY_DEFAULT",
    "TRUST_PREFIX",
    "LEVELS_EVERY_S",
    "IDLE_AFTER_S",
    "EVENT_MARK_S",
    "panel_order",
    "best_columns",
]

ORDER = ["raw", "registered", "denoised", "deconvolved", "background", "slow", "fast", "composite", "residual"]
DECOMPOSITION = ("background", "slow", "fast")
RESTORED = ("deconvolved", "denoised", "registered")  # the ROI trace compares raw with the first present
HIDDEN_BY_DEFAULT = {"residual"}
TRUST_PREFIX = "trust_"  # trust_<product>: a trust engine's map of <product>, drawn as its tint, not a panel
LEVELS_EVERY_S = 1.0
IDLE_AFTER_S = 3.0
EVENT_MARK_S = 4.0  # how long the newest event's ring stays on the raw panel
EVENTS_KEPT = 1000
SAMPLED_TRUST_CHECKS = ("tta", "features")  # trust checks run on some frames only: the newest is kept
SEVERITY = {"error": 0, "warn": 1, "info": 2, "ok": 3}

# what the settings file keeps, with the value used when a key is missing (JSON values)
SETTINGS_DEFAULTS: dict[str, Any] = {
    "panels/hidden": sorted(HIDDEN_BY_DEFAULT),
    "panels/cmaps": {},
    "levels/continuous": True,
    "view/overlay": False,
    "view/trust": False,
    "roi/visible": True,
    "roi/rect": None,
}

Key = tuple  # (stream, product, p, c, z)


def panel_order(name: str) -> tuple[int, str]:
    """Sort key of panels: raw, the restored products, the decomposition, then others by name."""
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def best_columns(n: int, width: float, height: float, aspect: float = 1.0) -> int:
    """The column count that makes ``n`` panels of frames of ``aspect`` (width / height) largest in
    a grid of ``width`` x ``height`` pixels (each cell loses 50 px to the histogram, 28 to the title)."""
    best_cols, best = 1, -1.0
    for cols in range(1, n + 1):
        rows = math.ceil(n / cols)
        cw, ch = width / cols - 50, height / rows - 28
        size = min(cw, ch * aspect)
        if size > best + 1:
            best_cols, best = cols, size
    return best_cols


@dataclasses.dataclass
class PanelLevels:
    """A panel's display levels: ``values`` (low, high; None until a frame set them) and whether
    they follow the percentile auto-levels (``auto``) or were fixed by hand."""

    auto: bool = True
    values: tuple[float, float] | None = None

    def set(self, values: tuple[float, float], *, fixed: bool = False) -> None:
        self.values = (float(values[0]), float(values[1]))
        if fixed:
            self.auto = False


@dataclasses.dataclass
class PreviewsNoted:
    """What :meth:`ViewerState.note_previews` found: the shown stream's axes with new values (their
    selectors need refilling) and whether the list of streams changed (the stream selector does)."""

    axes: set[str] = dataclasses.field(default_factory=set)
    streams_changed: bool = False


def _new_seen() -> dict[str, dict[int, str]]:
    return {a: {} for a in AXES}


@dataclasses.dataclass
class ViewerState:
    """Everything the viewer shows and decides, apart from its widgets. Methods are the transitions."""

    streams: StreamChooser = dataclasses.field(default_factory=StreamChooser)
    # the shown stream's selection and values seen (the same dicts as its StreamInfo's)
    selection: dict[str, int] = dataclasses.field(default_factory=lambda: {a: 0 for a in AXES})
    seen: dict[str, dict[int, str]] = dataclasses.field(default_factory=_new_seen)
    products: set[str] = dataclasses.field(default_factory=set)  # the products the shown stream has previewed
    stream_labels: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # the stream selector's list
    hidden: set[str] = dataclasses.field(default_factory=lambda: set(HIDDEN_BY_DEFAULT))
    cmaps: dict[str, str] = dataclasses.field(default_factory=dict)
    auto_levels: bool = True  # continuous percentile auto-levels
    levels: dict[str, PanelLevels] = dataclasses.field(default_factory=dict)
    overlay: bool = False  # every channel in its colour
    trust_overlay: bool = False  # low-trust regions tinted
    roi_visible: bool = True
    roi_rect: list[float] | None = None  # x, y, width, height
    paused: bool = False
    focused_event: dict[str, Any] | None = None  # the clicked event shown (while paused)
    event_mark_until: float = 0.0  # the newest event's ring shows until then (0: no ring)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the daemon's, newest last
    status: dict[str, Any] | None = None  # the daemon's newest status
    control: str | None = None  # the control socket's address (None: no controls)
    trust_sampled: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    last_seq: dict[str, int] = dataclasses.field(default_factory=dict)  # per product of the shown view
    messages: dict[str, tuple[str, str, float | None]] = dataclasses.field(default_factory=dict)
    messages_version: int = 0  # bumped on every change of ``messages``
    last_levels: float = 0.0  # when levels were last recomputed
    last_frame_at: float | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    display_times: list[float] = dataclasses.field(default_factory=list)
    frames_drawn: int = 0
    redraws: int = 0

    # -- the settings file -------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, values: Mapping[str, Any], **kwargs: Any) -> ViewerState:
        """A state from what the settings file holds (missing or malformed keys: the defaults)."""

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = values.get(key, SETTINGS_DEFAULTS[key])
            return value if isinstance(value, kind) else SETTINGS_DEFAULTS[key]

        hidden = get("panels/hidden", list)
        cmaps = get("panels/cmaps", dict)
        rect = get("roi/rect", (list, type(None)))
        if rect is not None and (len(rect) != 4 or not all(isinstance(v, (int, float)) for v in rect)):
            rect = None
        return cls(
            hidden={str(n) for n in hidden},
            cmaps={str(k): str(v) for k, v in cmaps.items()},
            auto_levels=bool(values.get("levels/continuous", True)),
            overlay=bool(values.get("view/overlay", False)),
            trust_overlay=bool(values.get("view/trust", False)),
            roi_visible=bool(values.get("roi/visible", True)),
            roi_rect=None if rect is None else [float(v) for v in rect],
            **kwargs,
        )

    def to_settings(self) -> dict[str, Any]:
        """What the settings file keeps (JSON values); ``roi/rect`` only once an ROI was placed."""
        out: dict[str, Any] = {
            "panels/hidden": sorted(self.hidden),
            "panels/cmaps": dict(self.cmaps),
            "levels/continuous": self.auto_levels,
            "view/overlay": self.overlay,
            "view/trust": self.trust_overlay,
            "roi/visible": self.roi_visible,
        }
        if self.roi_rect is not None:
            out["roi/rect"] = list(self.roi_rect)
        return out

    # -- messages (the banner) ---------------------------------------------------------------------
    def say(
        self, key: str, text: str, level: str = "info", seconds: float | None = None, now: float | None = None
    ) -> None:
        """A message in the banner, under ``key`` (a new one replaces it), for ``seconds`` or until unsaid."""
        now = time.monotonic() if now is None else now
        self.messages[key] = (text, level, None if seconds is None else now + seconds)
        self.messages_version += 1

    def unsay(self, key: str) -> bool:
        if self.messages.pop(key, None) is None:
            return False
        self.messages_version += 1
        return True

    def banner(self, now: float | None = None) -> tuple[str, str] | None:
        """(level, text) of the banner after dropping expired messages: every message, the most
        severe first, at the most severe one's level; None when there is none."""
        now = time.monotonic() if now is None else now
        for key in [k for k, (_, _, until) in self.messages.items() if until is not None and until < now]:
            del self.messages[key]
            self.messages_version += 1
        if not self.messages:
            return None
        items = sorted(self.messages.values(), key=lambda m: SEVERITY.get(m[1], 9))
        return items[0][1], "   ·   ".join(m[0] for m in items)

    # -- previews arriving -------------------------------------------------------------------------
    @property
    def sel(self) -> tuple[int, int, int]:
        return self.selection["p"], self.selection["c"], self.selection["z"]

    @property
    def follow(self) -> bool:
        """Following live mode (see ui/streams.py)."""
        return self.streams.follow

    def note_previews(self, previews: Iterable[tuple[Key, Mapping[str, Any]]], now: float) -> PreviewsNoted:
        """Previews (key, header) arrived at ``now``: the streams (when each sent, which are live
        mode), the values each has on each axis, the shown stream's products."""
        noted = PreviewsNoted()
        shown = self.streams.selected
        # streams first seen in the same drain are listed by name: the order a viewer started
        # beside running cameras shows them in does not depend on which message came first
        items = sorted(previews, key=lambda kv: kv[0][0])
        if items:
            self.last_frame_at = now
        for (stream, product, p, c, z), header in items:
            info = self.streams.note(stream, now, live=header.get("live") is True)
            for axis, value in (("p", p), ("c", c), ("z", z)):
                if value not in info.seen[axis]:
                    info.seen[axis][value] = str(header.get("channel") or value) if axis == "c" else str(value)
                    if stream == shown:
                        noted.axes.add(axis)
            if stream == shown:
                self.products.add(product)
        labels = [(name, self.streams.label(name)) for name in self.streams.names()]
        if labels != self.stream_labels:
            self.stream_labels = labels
            noted.streams_changed = True
        return noted

    def in_view(self, key: Key) -> bool:
        """A frame of the shown stream at the selected position, channel and z."""
        stream, _product, p, c, z = key
        return stream == self.streams.selected and (p, c, z) == self.sel

    def accept_frame(self, key: Key) -> bool:
        """Whether a frame of ``key`` updates the displayed panels: the display runs, the frame is in
        view, and it is a product (a ``trust_`` map tints its product's panel instead)."""
        return not self.paused and self.in_view(key) and not key[1].startswith(TRUST_PREFIX)

    def in_overlay(self, key: Key) -> bool:
        """With the channel overlay on: a frame of the shown stream at the selected position and z."""
        stream, _product, p, _c, z = key
        return self.overlay and stream == self.streams.selected and (p, z) == (self.sel[0], self.sel[2])

    def trust_map_key(self, product: str) -> Key:
        """The key of the trust map that tints ``product``'s panel."""
        return (self.streams.selected, TRUST_PREFIX + product, *self.sel)

    def note_seq(self, product: str, seq: int) -> bool:
        """A frame in view with this seq: True (and said) when the stream restarted (seq went back)."""
        last = self.last_seq.get(product)
        self.last_seq[product] = seq
        if last is not None and seq < last - 1:
            self.say("stream", f"The stream restarted (seq {last} → {seq}); history cleared.", "info", 6)
            return True
        return False

    def note_trust(self, product: str, scalars: Mapping[str, Any]) -> tuple[float, Any, dict[str, float]] | None:
        """The trust badge of a product's frame: (score, ok, newest sampled checks), or None when a
        trust engine did not score it."""
        score = scalars.get(f"trust_{product}_score")
        if score is None:
            return None
        sampled = self.trust_sampled.setdefault(product, {})
        for check in SAMPLED_TRUST_CHECKS:
            if scalars.get(f"trust_{product}_{check}") is not None:
                sampled[check] = float(scalars[f"trust_{product}_{check}"])
        return float(score), scalars.get(f"trust_{product}_ok"), sampled

    @staticmethod
    def consistency(product: str, scalars: Mapping[str, Any]) -> tuple[float, float | None] | None:
        """The learned restoration's consistency badge: (score, threshold), or None."""
        if product != "restored" or scalars.get("consistency") is None:
            return None
        thr = scalars.get("consistency_threshold")
        return float(scalars["consistency"]), None if thr is None else float(thr)

    def novelty_point(self, product: str, header: Mapping[str, Any], seq: int) -> tuple[float, float] | None:
        """(t, novelty) for the novelty strip, from one decomposition product only (the products'
        previews leave at slightly different times)."""
        scalars = header.get("scalars") or {}
        source = next((d for d in DECOMPOSITION if d in self.products), None)
        if "novelty" not in scalars or product != source:
            return None
        t = (header.get("index") or {}).get("t", seq)
        return float(t), float(scalars["novelty"])

    def check_idle(self, now: float, connected: bool) -> None:
        """Say when no frames arrive, and when the shown stream is quiet while others send."""
        if self.last_frame_at is None:
            if now - self.started > IDLE_AFTER_S and connected:
                self.say(
                    "idle",
                    "The daemon is running but sends no frames yet: is the acquisition started?",
                    "info",
                    now=now,
                )
            return
        idle = now - self.last_frame_at
        if idle > IDLE_AFTER_S and "idle" not in self.messages and not self.paused:
            self.say(
                "idle", f"No new frames for {idle:.0f} s: the acquisition is paused or has ended.", "info", now=now
            )
        elif idle <= IDLE_AFTER_S and "idle" in self.messages:
            self.unsay("idle")
        # the shown stream is quiet while another sends (Follow live off, or two ordinary streams):
        # say so, so a still image is not taken for a live one
        info = self.streams.info()
        quiet_for = now - info.last_seen if info is not None else 0.0
        if info is not None and idle <= IDLE_AFTER_S and quiet_for > self.streams.quiet_s and not self.paused:
            if "quiet" not in self.messages:
                self.say(
                    "quiet",
                    f"{self.streams.label(info.name)} sent nothing for {quiet_for:.0f} s while other "
                    "streams send: pick one in Stream to see it.",
                    "info",
                    now=now,
                )
        elif "quiet" in self.messages:
            self.unsay("quiet")

    # -- streams and selection ---------------------------------------------------------------------
    def follow_pick(self, now: float) -> str | None:
        """While following live mode and not paused: the stream to show instead, or None to stay."""
        return None if self.paused else self.streams.auto_pick(now)

    def say_followed(self, before: str | None, shown: str) -> None:
        if before is not None:
            self.say(
                "follow",
                f"Now showing {self.streams.label(shown)}: {self.streams.label(before)} sent nothing "
                f"for {self.streams.quiet_s:g} s (Follow live). Pick a stream to stay on one.",
                "info",
                8,
            )

    def set_follow(self, on: bool) -> None:
        """Follow live mode by itself, or stay on the stream shown."""
        self.streams.follow = bool(on)
        if not on:
            self.unsay("follow")

    def show_stream(self, name: str, *, by_user: bool = False, keys: Iterable[Key] = ()) -> bool:
        """Show stream ``name`` with its own position, channel and z (as last picked there; the first
        stream shown keeps the viewer's starting selection). A pick by the user stops following.
        ``keys``: the frames held, for the new stream's products. True when the stream changed:
        its history starts over and auto levels are taken from its first frames."""
        before = self.streams.selected
        selection = self.streams.select(name, by_user=by_user)
        if by_user:
            self.set_follow(False)
        if before is None:
            self.streams.adopt_selection(name, self.selection)
            selection = self.selection
        info = self.streams.info(name)
        assert info is not None
        self.selection, self.seen = selection, info.seen
        if name == before:
            return False
        self.products = {k[1] for k in keys if k[0] == name}
        for lv in self.levels.values():
            if lv.auto:
                lv.values = None
        self.trust_sampled.clear()
        self.last_seq.clear()
        return True

    def select(self, axis: str, value: int | None) -> bool:
        """Pick a position, channel or z; True when it changed (the view's history starts over)."""
        if value is None or value == self.selection[axis]:
            return False
        self.selection[axis] = int(value)
        self.last_seq.clear()
        return True

    def step_target(self, axis: str, delta: int) -> int | None:
        """The value ``delta`` steps from the selected one among those seen (clamped), or None."""
        values = sorted(self.seen[axis])
        if not values:
            return None
        i = values.index(self.selection[axis]) if self.selection[axis] in values else 0
        return values[max(0, min(len(values) - 1, i + delta))]

    # -- panels ------------------------------------------------------------------------------------
    def has_product(self, name: str) -> bool:
        if name == "composite":
            return any(d in self.products for d in DECOMPOSITION)
        return name in self.products

    def visible_panels(self, names: Iterable[str]) -> list[str]:
        """Of the panels ``names``, those shown, in order: not hidden, and of a product the shown
        stream has (another stream's products keep their panels, out of sight)."""
        return [n for n in sorted(names, key=panel_order) if n not in self.hidden and self.has_product(n)]

    def set_panel_visible(self, name: str, visible: bool) -> None:
        (self.hidden.discard if visible else self.hidden.add)(name)

    def toggle_panel_number(self, names: Iterable[str], number: int) -> tuple[str, bool] | None:
        """Key ``number`` (1 … 9) on the panels ``names`` (in the Panels menu's order): (name, now
        visible), or None when there is no such panel."""
        ordered = sorted(names, key=panel_order)
        if not 1 <= number <= len(ordered):
            return None
        name = ordered[number - 1]
        visible = name in self.hidden
        self.set_panel_visible(name, visible)
        return name, visible

    def set_cmap(self, product: str, name: str) -> None:
        self.cmaps[product] = name

    def roi_product(self, names: Iterable[str]) -> str | None:
        """The restored product the ROI trace compares raw with: the first of RESTORED present."""
        present = set(names)
        return next((r for r in RESTORED if r in present), None)

    # -- levels ------------------------------------------------------------------------------------
    def panel_levels(self, name: str) -> PanelLevels:
        """The levels of panel ``name`` (made on first use, auto)."""
        lv = self.levels.get(name)
        if lv is None:
            lv = self.levels[name] = PanelLevels()
        return lv

    def set_levels(self, name: str, values: tuple[float, float], *, fixed: bool = False) -> None:
        """Panel ``name``'s levels: ``fixed`` by hand (auto-levels leave them), or computed."""
        self.panel_levels(name).set(values, fixed=fixed)

    def set_auto_levels(self, on: bool) -> None:
        """Continuous auto-levels on (every panel follows them again, recomputed now) or off."""
        self.auto_levels = bool(on)
        if on:
            for lv in self.levels.values():
                lv.auto = True
            self.last_levels = 0.0

    def auto_contrast(self) -> None:
        """Every panel's levels from its current frame, now: every panel follows auto-levels again."""
        for lv in self.levels.values():
            lv.auto = True

    def follows_auto_levels(self, name: str) -> bool:
        return self.auto_levels and self.panel_levels(name).auto

    def levels_due(self, now: float) -> bool:
        """Levels and histograms are recomputed once every LEVELS_EVERY_S: True when due (and noted)."""
        if now - self.last_levels > LEVELS_EVERY_S:
            self.last_levels = now
            return True
        return False

    # -- overlays ----------------------------------------------------------------------------------
    def set_overlay(self, on: bool) -> None:
        """Every channel of the selected position and z in its colour, or the selected channel alone."""
        self.overlay = bool(on)
        if self.overlay and len(self.seen["c"]) < 2:
            self.say("overlay", "Overlay channels: the stream has one channel so far.", "info", 4)

    def set_trust_overlay(self, on: bool, keys: Iterable[Key] = ()) -> None:
        """Tint low-trust regions of every product a trust engine scores, or hide the tints.
        ``keys``: the frames held (to say when no trust map came yet)."""
        self.trust_overlay = bool(on)
        has_maps = any(k[1].startswith(TRUST_PREFIX) for k in keys if k[0] == self.streams.selected)
        if self.trust_overlay and not has_maps:
            self.say(
                "trust",
                "Trust map: no trust map received yet; run the daemon with --engines trust (docs/trust.md).",
                "info",
                6,
            )
        elif not self.trust_overlay:
            self.unsay("trust")

    def set_roi_visible(self, on: bool) -> None:
        self.roi_visible = bool(on)

    # -- pause and the event in focus ----------------------------------------------------------------
    def set_paused(self, on: bool) -> None:
        """Freeze the display (the daemon goes on), or resume live: resuming leaves the event in focus."""
        self.paused = bool(on)
        if on:
            self.say("paused", "Paused: the display is frozen, the daemon goes on. Space resumes.", "info")
        else:
            self.unsay("paused")
            self.unsay("event")
            self.focused_event = None

    def toggle_pause(self) -> None:
        self.set_paused(not self.paused)

    def go_live(self) -> bool:
        """Back to live (Esc): True when the display was paused."""
        if not self.paused:
            return False
        self.set_paused(False)
        return True

    def focus_event(self, event: Mapping[str, Any]) -> int | None:
        """A clicked event: pause and focus it; its seq (the frames to show are the buffered ones
        nearest it), or None when it has none (nothing happens)."""
        seq = event.get("seq")
        if seq is None:
            return None
        if not self.paused:
            self.set_paused(True)
        self.focused_event = dict(event)
        return int(seq)

    def say_event(self, event: Mapping[str, Any], shown: list[int], rule: str | None, buffer_mb: int) -> None:
        """The banner for the event in focus: the nearest buffered frame shown (``shown``: the seqs
        drawn; ``rule``: how its box was scaled) or that its frame is gone."""
        seq = event.get("seq")
        score = event.get("score")
        what = f"event {event.get('id', '?')} at t {event.get('t', '?')} (seq {seq}" + (
            f", score {score:.2f})" if isinstance(score, (int, float)) else ")"
        )
        if shown and seq is not None:
            near = min(shown, key=lambda s: abs(s - int(seq)))
            box = (
                " Its box is drawn at an assumed scale: the event gives neither its frame's pixel size nor shape."
                if rule == "assumed"
                else ""
            )
            self.say(
                "event", f"Showing {what} — nearest buffered frame seq {near}.{box} Esc or Space: back to live.", "info"
            )
        else:
            self.say(
                "event",
                f"{what}: its frame is no longer in the recent-frame buffer ({buffer_mb} MB). Esc: back to live.",
                "warn",
            )

    def event_to_mark(self, events: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
        """The newest event with a centroid, when it lies in the shown stream at the selected
        position and z (else None): it gets a ring on the raw panel."""
        newest = next((e for e in reversed(list(events)) if e.get("centroid") is not None), None)
        if newest is None:
            return None
        if newest.get("stream", self.streams.selected) != self.streams.selected:
            return None
        if (newest.get("p", self.selection["p"]), newest.get("z", self.selection["z"])) != (
            self.selection["p"],
            self.selection["z"],
        ):
            return None
        return newest

    def mark_event(self, now: float) -> None:
        self.event_mark_until = now + EVENT_MARK_S

    def event_mark_expired(self, now: float) -> bool:
        """True once (and the ring is forgotten) when the ring's time is over."""
        if self.event_mark_until and now > self.event_mark_until:
            self.event_mark_until = 0.0
            return True
        return False

    # -- the daemon --------------------------------------------------------------------------------
    def note_link(self, kind: str, payload: Any) -> None:
        """What the control thread brought back (``DaemonLink.drain()``): the status, events, and
        what the banner says of replies and of the daemon going and coming back."""
        if kind == "status":
            self.status = payload
        elif kind == "events":
            self.events.extend(payload)
            self.events = self.events[-EVENTS_KEPT:]
        elif kind == "reply":
            request, reply = payload
            if not reply.get("ok"):
                self.say(
                    "reply",
                    f"The daemon refused {request.get('cmd')} {request.get('engine', '')}: {reply.get('error')}",
                    "warn",
                    8,
                )
        elif kind == "down":
            self.say(
                "daemon",
                f"No livescope daemon answers at {payload}: is it running (`livescope daemon`)? "
                "Reconnecting by itself…",
                "error",
            )
        elif kind == "refused":
            self.say("daemon", f"The daemon at {self.control} refuses this viewer: {payload}", "error")
        elif kind == "up":
            if "daemon" in self.messages:
                self.say("daemon", "Connected to the daemon again.", "ok", 4)
        elif kind == "restarted":
            self.say("daemon", "The daemon restarted: counters, events and plots start over.", "info", 8)
            self.events.clear()

    # -- the display's own rate --------------------------------------------------------------------
    def note_drawn(self, drawn: int, now: float) -> None:
        """``drawn`` panels were drawn in one redraw at ``now``."""
        if drawn:
            self.frames_drawn += drawn
            self.redraws += 1
            self.display_times.append(now)

    def display_fps(self, now: float | None = None) -> float:
        """Redraws per second over the last 2 s."""
        now = time.monotonic() if now is None else now
        self.display_times = [t for t in self.display_times if now - t < 2.0]
        return len(self.display_times) / 2.0
