"""Which stream the viewer shows, when one daemon previews several.

A daemon previews every stream it ingests: each camera (``camA``, ``camB``), the cameras of a
pymmcore-plus Multi Camera (``mmcore/Camera-1``), Micro-Manager's live mode (``mmcore-live``,
its previews say ``"live": true``) and its snaps (``mmcore-snap``). The viewer shows one at a
time. :class:`StreamChooser` holds that choice as plain Python (no Qt), so it is tested alone:

- streams are listed in the order they were first seen;
- each stream keeps its own position / channel / z selection and the values seen so far, so
  switching back restores what was picked there;
- *following* (on until the user picks a stream): the first stream seen is shown; when the shown
  stream has been quiet for more than ``quiet_s`` (2 s) and a live-mode stream is sending, the
  live stream is shown (the microscopist focusing in live mode wants to see it); when a shown
  live-mode stream has gone quiet and another stream is sending, that one is shown again (live
  mode stopped, the acquisition goes on). A stream that sends is never left by following, and
  one ordinary stream never replaces another (a time-lapse between two time points stays put).
- picking a stream by hand stops following until it is turned on again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["QUIET_S", "AXES", "StreamInfo", "StreamChooser"]

QUIET_S = 2.0  # a stream without a preview for longer is quiet: following may leave it
AXES = ("p", "c", "z")


@dataclasses.dataclass
class StreamInfo:
    """What the viewer knows of one stream: when it sent, whether it is live mode, the values
    seen on each axis (value -> label) and the selection made there (None: never shown yet)."""

    name: str
    first_seen: float
    last_seen: float
    live: bool = False
    seen: dict[str, dict[int, str]] = dataclasses.field(default_factory=lambda: {a: {} for a in AXES})
    selection: dict[str, int] | None = None

    def default_selection(self) -> dict[str, int]:
        """0 on each axis where the stream has it (the viewer's start), else its smallest value."""
        return {a: 0 if (0 in self.seen[a] or not self.seen[a]) else min(self.seen[a]) for a in AXES}


class StreamChooser:
    """The streams seen, the one shown, and whether the viewer follows live mode by itself."""

    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self.quiet_s = float(quiet_s)
        self.streams: dict[str, StreamInfo] = {}  # first-seen order
        self.selected: str | None = None
        self.follow = True  # off once the user picks a stream

    # -- what arrived ------------------------------------------------------------------------------
    def note(self, stream: str, now: float, *, live: bool = False) -> StreamInfo:
        """A preview of ``stream`` arrived at ``now`` (the viewer's monotonic clock)."""
        info = self.streams.get(stream)
        if info is None:
            info = self.streams[stream] = StreamInfo(stream, now, now)
        info.last_seen = max(info.last_seen, now)
        info.live = info.live or bool(live)
        return info

    def names(self) -> list[str]:
        return list(self.streams)

    def label(self, stream: str) -> str:
        info = self.streams.get(stream)
        return f"{stream} (live)" if info is not None and info.live else stream

    @property
    def several(self) -> bool:
        """More than one stream seen: the viewer shows its stream selector."""
        return len(self.streams) > 1

    def quiet(self, stream: str, now: float) -> bool:
        info = self.streams.get(stream)
        return info is None or now - info.last_seen > self.quiet_s

    # -- choosing ----------------------------------------------------------------------------------
    def auto_pick(self, now: float) -> str | None:
        """While following: the stream to show instead of the selected one, or None to stay."""
        if not self.follow or not self.streams:
            return None
        if self.selected is None or self.selected not in self.streams:
            return next(iter(self.streams))
        if not self.quiet(self.selected, now):
            return None
        sending = [s for s, info in self.streams.items() if s != self.selected and not self.quiet(s, now)]
        live = [s for s in sending if self.streams[s].live]
        if live:
            return live[0]
        if self.streams[self.selected].live and sending:
            return sending[0]
        return None

    def select(self, stream: str, *, by_user: bool = False) -> dict[str, int]:
        """Show ``stream``; returns its selection (p, c, z), the one kept from its last showing.
        A pick by the user stops following."""
        if stream not in self.streams:
            raise KeyError(f"no stream {stream!r} seen yet; seen: {', '.join(self.streams) or 'none'}")
        if by_user:
            self.follow = False
        self.selected = stream
        info = self.streams[stream]
        if info.selection is None:
            info.selection = info.default_selection()
        return info.selection

    def info(self, stream: str | None = None) -> StreamInfo | None:
        return self.streams.get(self.selected if stream is None else stream)  # type: ignore[arg-type]

    def adopt_selection(self, stream: str, selection: dict[str, Any]) -> None:
        """The first stream shown takes the selection the viewer started with (the same dict)."""
        self.streams[stream].selection = selection
