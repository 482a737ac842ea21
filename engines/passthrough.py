"""The identity engine: what the daemon costs per frame with no compute."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import FrameInfo, StreamSpec, register_engine


@register_engine("passthrough")
class Passthrough:
    name: ClassVar[str] = "passthrough"
    outputs: ClassVar[tuple[str, ...]] = ("passthrough",)

    def __init__(self, delay_s: float = 0.0) -> None:
        # delay_s simulates a slow engine (tests of frame skipping under load).
        self.delay_s = float(delay_s)
        self.spec: StreamSpec | None = None

    def setup(self, spec: StreamSpec) -> None:
        self.spec = spec

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        return {"passthrough": frame}

    def set_param(self, name: str, value: Any) -> None:
        if name != "delay_s":
            raise KeyError(f"passthrough has no parameter {name!r}; it has: delay_s")
        self.delay_s = float(value)

    def describe(self) -> dict[str, Any]:
        return {"delay_s": self.delay_s}
