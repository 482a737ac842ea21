"""Pure compute on arrays. Imports nothing else of livescope."""

from __future__ import annotations

from .base import (
    Engine,
    EngineError,
    FrameInfo,
    StreamSpec,
    available_engines,
    create_engine,
    engine_factory,
    engine_outputs,
    register_engine,
)

__all__ = [
    "Engine",
    "EngineError",
    "FrameInfo",
    "StreamSpec",
    "available_engines",
    "create_engine",
    "engine_factory",
    "engine_outputs",
    "register_engine",
]
