"""Pure compute on arrays. Imports nothing else of livescope."""

from __future__ import annotations

from .base import (
    Applies,
    CarriesState,
    Chunkable,
    Configurable,
    Engine,
    EngineBase,
    EngineError,
    Event,
    FrameInfo,
    HasKernel,
    Param,
    Reach,
    Result,
    RunsNetwork,
    StreamSpec,
    SwapsModel,
    available_engines,
    create_engine,
    engine_factory,
    engine_outputs,
    register_engine,
)

__all__ = [
    "Applies",
    "CarriesState",
    "Chunkable",
    "Configurable",
    "Engine",
    "EngineBase",
    "EngineError",
    "Event",
    "FrameInfo",
    "HasKernel",
    "Param",
    "Reach",
    "Result",
    "RunsNetwork",
    "StreamSpec",
    "SwapsModel",
    "available_engines",
    "create_engine",
    "engine_factory",
    "engine_outputs",
    "engine_parameters",
    "register_engine",
]


def engine_parameters(name: str) -> tuple[str, ...] | None:
    """The parameter names ``create_engine(name, **params)`` accepts: its constructor's keywords.
    None when it takes any keyword (an engine that hands the rest on, as ``trust`` does to the
    engine it wraps, checks them itself when it is created)."""
    import inspect

    params = inspect.signature(engine_factory(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
