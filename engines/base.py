"""The engine contract: protocols, one parameter mechanism, a registry by name, the stream description.

An engine is pure compute. The daemon owns run state: it creates one engine instance per
(position, channel) of a stream, calls ``setup`` with the stream's description, then ``process``
for every frame (or z-stack, when ``needs_volume``) that the engine can keep up with. Temporal
engines keep their window of past frames in the instance, so state never mixes positions or
channels.

Required (:class:`Engine`): ``name``, ``outputs``, ``setup(spec)``, ``process(frame, info)``,
which returns a :data:`Result`: ``{output: image or per-frame number, "events": [Event, ...]}``.

Optional, read with a default by the daemon; :class:`EngineBase` gives every livescope engine
these defaults and the one parameter mechanism:

- :class:`Routed`: ``needs_volume`` (False): receive whole (z, y, x) stacks instead of planes;
  ``passes`` (``outputs[0]``): the output handed to the next engine of the chain, ``None`` to
  pass the engine's own input on unchanged (the decomposition, which splits rather than
  restores); ``scalar_outputs`` (()): outputs that are per-frame numbers, not images;
- :class:`Configurable`: ``parameters`` (the declared table of :class:`Param`), ``set_param(name,
  value)`` (control socket ``set``; a refused value keeps the old one), ``describe()`` (one shape:
  ``{"engine", "parameters", ...facts}``, for provenance);
- :class:`Chunkable`: ``window`` (0: past frames that shape the output) and ``reach()``, the
  context a chunk needs when a saved movie is processed in time chunks and tiles;
- :class:`Closable`: ``close()``.

Capabilities some engines have, each a small protocol: :class:`HasKernel` (the PSF and camera
offset a deconvolution used), :class:`SwapsModel` (``swap_model(path)``), :class:`CarriesState`
(``export_state()`` / ``import_state(state)``: what the engine fixed on a stream's first frame,
handed to chunks that start later), :class:`RunsNetwork` (the model file, the stream's input
normalisation and a stateless ``predict``), :class:`ReportsMemory` (``state_nbytes()``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Required, TypedDict, runtime_checkable

__all__ = [
    "Applies",
    "CarriesState",
    "Chunkable",
    "Closable",
    "Configurable",
    "EVENTS",
    "Engine",
    "EngineBase",
    "EngineError",
    "Event",
    "FrameInfo",
    "HasKernel",
    "Param",
    "Reach",
    "ReportsMemory",
    "Result",
    "Routed",
    "RunsNetwork",
    "StreamSpec",
    "SwapsModel",
    "as_bool",
    "available_engines",
    "create_engine",
    "engine_factory",
    "engine_outputs",
    "is_none",
    "optional",
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


# --------------------------------------------------------------------------- what process() returns


class Event(TypedDict, total=False):
    """Something an engine noticed on a frame (``Result["events"]``); the daemon adds where and when
    (position, channel, time) and sends it on the feedback channel. Plain JSON values only."""

    kind: Required[str]  # "drift" (register), "novelty" (decompose), "consistency" (restore), "trust"
    seq: int  # the frame's ``FrameInfo.seq``
    score: float
    threshold: float
    message: str


Result = dict[str, Any]
"""What ``process`` returns: ``{output: value, ..., "events": [Event, ...]}``.

- every image output (``outputs`` not in ``scalar_outputs``) on every frame: an array of the
  frame's shape (z-stacks included);
- per-frame numbers: the ``scalar_outputs`` computed on this frame (a check that runs on some
  frames only leaves its number out on the others) and any 0-d extra the viewer shows (as
  ``consistency_threshold``); the daemon keeps every 0-d value as a float;
- ``"events"`` (:data:`EVENTS`): optional list of :class:`Event`.

A plain dict, not a result class: the daemon and ``livescope process`` iterate its items and hand
``result[passes]`` on, so a class would change what they read.
"""

EVENTS = "events"


# --------------------------------------------------------------------------- the protocols


@runtime_checkable
class Engine(Protocol):
    """What every engine has; the daemon reads the rest with defaults (see the module doc)."""

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]

    def setup(self, spec: StreamSpec) -> None: ...

    def process(self, frame: Any, info: FrameInfo) -> Result: ...


@runtime_checkable
class Routed(Protocol):
    """How the daemon routes frames and outputs (defaults: planes, ``outputs[0]``, no scalars)."""

    scalar_outputs: tuple[str, ...]

    @property
    def needs_volume(self) -> bool: ...

    @property
    def passes(self) -> str | None: ...


@runtime_checkable
class Configurable(Protocol):
    """Parameters declared in one table, changed live, reported in one shape."""

    parameters: ClassVar[Mapping[str, Param]]

    def set_param(self, name: str, value: Any) -> None: ...

    def describe(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Reach:
    """The context a chunk of a saved movie needs for one engine: ``halo`` pixels per side (None:
    the whole frame) and ``warmup`` past frames (None: the whole past, so time runs in order);
    tile origins and sizes on multiples of ``multiple`` (a network's pooling grid)."""

    halo: int | None
    warmup: int | None
    multiple: int = 1


@runtime_checkable
class Chunkable(Protocol):
    """What reprocessing in time chunks and tiles needs to stay exact (valid after ``setup``)."""

    @property
    def window(self) -> int: ...

    def reach(self) -> Reach: ...


@runtime_checkable
class Closable(Protocol):
    def close(self) -> None: ...


@runtime_checkable
class HasKernel(Protocol):
    """A deconvolution: the PSF it uses at the frames' sampling (None before setup, or when a
    network replaces it) and the camera offset it subtracts from a frame. The trust engine
    re-blurs the output with both."""

    @property
    def kernel(self) -> Any: ...

    def camera_offset(self, frame: Any) -> float: ...


@runtime_checkable
class SwapsModel(Protocol):
    def swap_model(self, path: Any) -> None:
        """Open the new model now and use it from the next frame on; a bad file raises here and
        the running model stays."""
        ...


@runtime_checkable
class CarriesState(Protocol):
    """What an engine fixed on a stream's first frame (an estimated camera offset, the input
    normalisation), as plain JSON values, so that a chunk starting later in the stream computes
    what the whole stream would have. ``import_state`` goes after ``setup`` (which starts the
    state over); ``import_state(export_state())`` changes nothing."""

    def export_state(self) -> dict[str, Any]: ...

    def import_state(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class RunsNetwork(Protocol):
    """A network engine, for checks that re-run it (trust's test-time augmentation and feature
    distance): the model file in use (None before setup), the stream's input normalisation
    (None before the first frame) and the network's output on any frame, without past frames
    and without touching the engine's state."""

    @property
    def model_file(self) -> Any: ...

    @property
    def normalisation(self) -> Any: ...

    def predict(self, frame: Any) -> Any: ...


@runtime_checkable
class ReportsMemory(Protocol):
    def state_nbytes(self) -> int:
        """Bytes of frame-sized state held (constant once the engine's buffers are full)."""
        ...


# --------------------------------------------------------------------------- parameters


class Applies(enum.Enum):
    """What a live change of a parameter does to a running engine."""

    LIVE = "live"  # read from the next frame on; nothing else changes
    RESET = "reset"  # the running state starts over (past frames, reference, estimated offset ...)
    REBUILD = "rebuild"  # what the engine derived from its parameters is made again (PSF, filters, backend)
    FIXED = "fixed"  # cannot change on a running engine (it changes what the daemon sends): refused


def is_none(value: Any) -> bool:
    """None, or the words a command line or config file uses for it ("", "none")."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def as_bool(value: Any) -> bool:
    """A switch from a command line or config file: "1", "true", "yes", "on" (any case) are on."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert``, with None (or "none", "") kept as None."""

    def conv(value: Any) -> Any:
        return None if is_none(value) else convert(value)

    return conv


def _same(value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of an engine, declared in its ``parameters`` table ({name: Param}).

    ``default`` is the constructor's default (the contract test holds them equal); ``convert``
    turns what a command line, config file or control message gives (text, JSON) into the
    value the engine keeps, raising ValueError/TypeError/EngineError on nonsense; ``check``
    returns None for a good converted value, else the message (naming the fix) of the
    EngineError that refuses it. ``applies``: what a live change does (:class:`Applies`).
    ``attr``: the attribute holding it (default: its name); ``show``: its value as ``describe()``
    reports it (JSON values). ``setter``: the name of an engine method that takes a live value
    instead (``swap_model``: it checks, applies and keeps the old one on error itself).
    ``fixed``: the message that refuses a live change of an ``Applies.FIXED`` parameter.
    """

    default: Any = None
    convert: Callable[[Any], Any] = _same
    check: Callable[[Any], str | None] | None = None
    applies: Applies = Applies.LIVE
    attr: str | None = None
    show: Callable[[Any], Any] | None = None
    setter: str | None = None
    fixed: str = ""
    doc: str = ""


class EngineBase:
    """The defaults of the optional members, and the one parameter mechanism.

    A subclass declares ``parameters`` ({name: :class:`Param`}), takes them as constructor keywords
    (``create_engine(name, **params)`` and ``engine_parameters`` read the signature) and calls
    ``self._init_params(locals())``; it may override the hooks ``_validate`` (checks across
    parameters, and defaults that depend on another parameter), ``_rebuild(name)``
    (``Applies.REBUILD``), ``_reset_state(name)`` (``Applies.RESET``) and ``_details`` (its facts
    in ``describe()``). A refused change (any exception from conversion, check, ``_validate`` or
    a hook) puts every parameter back as it was.
    """

    name: ClassVar[str] = ""
    outputs: ClassVar[tuple[str, ...]] = ()
    scalar_outputs: ClassVar[tuple[str, ...]] = ()
    # the image outputs a store keeps by default (None: all); the daemon's "auto" product set keeps
    # only the chain's last restored image of the restoring engines, and these of the others
    saved_by_default: ClassVar[tuple[str, ...] | None] = None
    if TYPE_CHECKING:
        # Read-only to callers: a subclass may make them properties (``needs_volume`` following
        # ``volume``, ``window`` following its parameters); at run time, class attributes.
        @property
        def needs_volume(self) -> bool: ...

        @property
        def window(self) -> int: ...
    else:
        needs_volume = False
        window = 0
    parameters: ClassVar[Mapping[str, Param]] = {}

    @property
    def passes(self) -> str | None:
        return self.outputs[0] if self.outputs else None

    def close(self) -> None:
        """Let go of what the engine holds (buffers, backends); default: nothing."""

    def reach(self) -> Reach:
        """Default: whole frames (the engine may normalise over them, and a per-frame number is
        about the whole frame); in time order when it keeps a past (``window``)."""
        return Reach(None, 0 if not self.window else None)

    # ---- parameters

    def _init_params(self, values: Mapping[str, Any]) -> None:
        """Every declared parameter from the constructor's keywords, converted and checked, then
        the engine-wide checks (``_validate``)."""
        for name, p in self.parameters.items():
            setattr(self, p.attr or name, self._accept(name, values.get(name, p.default)))
        self._validate()

    def _accept(self, name: str, value: Any) -> Any:
        p = self.parameters[name]
        value = p.convert(value)
        if p.check is not None:
            problem = p.check(value)
            if problem:
                raise EngineError(problem)
        return value

    def set_param(self, name: str, value: Any) -> None:
        """Change one parameter of the running engine. Unknown names raise KeyError (naming the
        parameters there are), refused values EngineError (or the converter's ValueError); either
        way the engine keeps its previous setting and stays usable."""
        p = self.parameters.get(name)
        if p is None:
            raise KeyError(f"{self.name} has no parameter {name!r}; it has: {', '.join(self.parameters)}")
        if p.setter:
            getattr(self, p.setter)(value)
            return
        if p.applies is Applies.FIXED:
            if self._accept(name, value) != getattr(self, p.attr or name):
                raise EngineError(
                    p.fixed
                    or f"{self.name}: {name} cannot change on a running engine; "
                    f"restart it with --param {self.name}.{name}=..."
                )
            return
        saved = {p_.attr or n: getattr(self, p_.attr or n) for n, p_ in self.parameters.items()}
        try:
            setattr(self, p.attr or name, self._accept(name, value))
            self._validate()
            if p.applies is Applies.REBUILD:
                self._rebuild(name)
            elif p.applies is Applies.RESET:
                self._reset_state(name)
        except BaseException:
            for attr, old in saved.items():  # keep the engine usable with its previous setting
                setattr(self, attr, old)
            raise

    def _validate(self) -> None:
        """Checks that involve several parameters (raise EngineError naming the fix), and
        defaults that depend on another parameter (None -> the plane or stack default)."""

    def _rebuild(self, name: str) -> None:
        """``name`` (an ``Applies.REBUILD`` parameter) changed: make again what derives from it."""

    def _reset_state(self, name: str) -> None:
        """``name`` (an ``Applies.RESET`` parameter) changed: start the running state over."""

    def parameter_values(self) -> dict[str, Any]:
        """Every declared parameter's current value, as ``describe()`` reports it."""
        out = {}
        for name, p in self.parameters.items():
            value = getattr(self, p.attr or name)
            out[name] = p.show(value) if p.show is not None else value
        return out

    def describe(self) -> dict[str, Any]:
        """``{"engine": name, "parameters": {every declared parameter}, ...facts}``: the facts
        (model hash, PSF used, estimated offset, ...) are the engine's own keys beside these two."""
        return {"engine": self.name, "parameters": self.parameter_values(), **self._details()}

    def _details(self) -> dict[str, Any]:
        """The engine's facts for ``describe()`` (not its parameters)."""
        return {}


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
        raise EngineError(f"unknown engine {name!r}; available: {', '.join(available_engines())}") from None


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
