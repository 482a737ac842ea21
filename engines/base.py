"""The engine contract: a small protocol, a registry by name, and the stream description.

An engine is pure compute. The daemon owns run state: it creates one engine instance per
(position, channel) of a stream, calls ``setup`` with the stream's description, then ``process``
for every frame (or z-stack, when ``needs_volume``) that the engine can keep up with. Temporal
engines keep their window of past frames in the instance, so state never mixes positions or
channels.

Required: ``name``, ``outputs``, ``setup(spec)``, ``process(frame, info) -> {output: array}``.
Optional, read with a default by the daemon:

- ``needs_volume`` (False): receive whole (z, y, x) stacks instead of planes;
- ``window`` (0): past frames the engine keeps (warm-up needed when reprocessing in time chunks);
- ``passes`` (``outputs[0]``): the output handed to the next engine of the chain; ``None`` to pass
  the engine's own input on unchanged (e.g. the decomposition, which splits rather than restores);
- ``scalar_outputs`` (()): outputs that are per-frame numbers, not images (e.g. ``novelty``);
- ``set_param(name, value)``: change a parameter live (control socket ``set``);
- ``describe() -> dict``: parameters and model hashes for provenance;
- ``close()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

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


class EngineError(RuntimeError):
    """An engine cannot run as configured; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What an engine needs to know about the frames it will see.

    ``shape`` is (y, x) for planes, (z, y, x) when the engine asked for volumes.
    Physical sizes are in micrometres and seconds; ``None`` when the acquisition did not say.
    """

    shape: tuple[int, ...]
    dtype: str = "uint16"
    bits: int = 16
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    interval_s: float | None = None
    position: int = 0
    channel: str = "default"
    camera_offset: float | None = None
    camera_gain: float | None = None
    binning: int = 1
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def saturation(self) -> int:
        return 2**self.bits - 1


@dataclasses.dataclass(frozen=True)
class FrameInfo:
    """Per-frame facts handed to ``Engine.process``."""

    seq: int
    timestamp: float = 0.0  # seconds since the start of the stream
    index: Mapping[str, int] = dataclasses.field(default_factory=dict)  # p, c, z, t
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]

    def setup(self, spec: StreamSpec) -> None: ...

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]: ...


_REGISTRY: dict[str, Callable[..., Engine]] = {}
_LAZY: dict[str, str] = {
    # name -> module (relative to this package) that registers it on import; keeps heavy
    # dependencies (torch, onnxruntime) out of ``import livescope.engines``.
    "passthrough": ".passthrough",
    "deconvolve": ".deconvolve",
    "denoise": ".denoise",
    "decompose": ".decompose",
    "register": ".register",
    "trust": ".trust",
    "restore": ".netdeconv",
}


def register_engine(name: str) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    """Class decorator: make an engine available to ``create_engine(name)``."""

    def deco(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load(name: str) -> Callable[..., Engine]:
    if name not in _REGISTRY and name in _LAZY:
        import importlib

        try:
            importlib.import_module(_LAZY[name], __package__)
        except ModuleNotFoundError as exc:  # the engine's module or one of its dependencies
            raise EngineError(
                f"engine {name!r} is not available: {exc}. "
                "Install livescope with its dependencies (`make demo` or `pip install -e .`)."
            ) from exc
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EngineError(
            f"unknown engine {name!r}; available: {', '.join(available_engines())}"
        ) from None


def available_engines() -> list[str]:
    """Engine names that can be created here (their modules import)."""
    import importlib.util

    names = set(_REGISTRY)
    for name, mod in _LAZY.items():
        if importlib.util.find_spec(__package__ + mod) is not None:
            names.add(name)
    return sorted(names)


def create_engine(name: str, **params: Any) -> Engine:
    """A new, not yet set up, engine instance."""
    return _load(name)(**params)


def engine_outputs(name: str) -> tuple[str, ...]:
    return tuple(_load(name).outputs)  # type: ignore[attr-defined]


def engine_factory(name: str) -> Callable[..., Engine]:
    """The registered class (or factory) of an engine, for class-level facts such as ``needs_volume``."""
    return _load(name)
