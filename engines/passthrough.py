"""The identity engine: what the daemon costs per frame with no compute."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import EngineBase, FrameInfo, Param, Reach, StreamSpec, register_engine


@register_engine("passthrough")
class Passthrough(EngineBase):
    name: ClassVar[str] = "passthrough"
    outputs: ClassVar[tuple[str, ...]] = ("passthrough",)
    parameters: ClassVar[dict[str, Param]] = {
        "delay_s": Param(0.0, float, doc="seconds of sleep per frame: a slow engine, for tests of frame skipping"),
    }

    delay_s: float  # set by ``_init_params``

    def __init__(self, delay_s: float = 0.0) -> None:
        self._init_params(locals())
        self.spec: StreamSpec | None = None

    def setup(self, spec: StreamSpec) -> None:
        self.spec = spec

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        return {"passthrough": frame}

    def reach(self) -> Reach:
        return Reach(0, 0)  # each pixel of each frame on its own
