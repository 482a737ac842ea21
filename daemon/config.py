"""Daemon configuration: defaults, an optional TOML file, then command-line overrides, checked
at start: a wrong type, an unknown key, engine or engine parameter, or a missing file stops the
daemon before it starts, with a message that names the key and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictStr, TypeAdapter, ValidationError

from ..bridges.files import SAMPLING_KEYS, check_sampling
from ..bridges.transport import DEFAULT_CONTROL, DEFAULT_INGEST, DEFAULT_PUBLISH
from .chain import EngineSlot, auto_products

__all__ = ["PATH_PARAMS", "DaemonConfig", "client_curve", "load_config", "parse_params", "validate_config"]

log = logging.getLogger(__name__)

# engine parameters that name a file: checked at start, confined to the output folder when they
# come over the control socket (Pipeline._confined); fit_out is written, the others are read
PATH_PARAMS = ("model", "psf", "calibration", "fit_out")

# field types as checked by load_config (a DaemonConfig built in code is not checked): TOML's own
# types, no guessing (a string is not a number, a number is not a flag)
_Flag = StrictBool
_Text = StrictStr
_Int = Annotated[int, Field(strict=True)]
_Count = Annotated[int, Field(strict=True, ge=1)]
_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_NonNegative = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
_Positive = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]


@dataclasses.dataclass
class DaemonConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")

    source: _Text = "sim"  # sim | mmcore | file:PATH | zmq
    mm_config: _Text | None = None  # Micro-Manager .cfg for --source mmcore (none: the built-in microscope)
    sequence: _Text | None = None  # useq MDASequence YAML/JSON for sim/mmcore
    engines: list[_Text] = dataclasses.field(default_factory=list)
    engine_params: dict[_Text, dict[_Text, Any]] = dataclasses.field(default_factory=dict)
    out: Path | None = None
    overwrite: _Flag = False
    resume: _Flag = False  # add this run to an existing store as new segments
    ingest: _Text = DEFAULT_INGEST
    publish: _Text | None = DEFAULT_PUBLISH
    control: _Text | None = DEFAULT_CONTROL
    restore: _Text | None = None  # synchronous restore socket for capture-time hooks (off by default)
    # ZeroMQ CURVE on every socket the daemon binds: always for a non-loopback address, on
    # loopback when asked (closes previews and ingest to the PC's other users); keys from curve_dir
    curve: _Flag = False
    curve_dir: _Text | None = None  # default: livescope.bridges.auth.default_keys_dir()
    frames: _Count | None = None  # time points for sim/file; frames to receive for zmq
    # sim microscope
    sim_shape: tuple[_Count, _Count] = (256, 256)
    sim_channels: Annotated[tuple[_Text, ...], Field(min_length=1)] = ("GFP",)
    sim_z: _Count = 1
    sim_interval_s: _NonNegative = 0.05
    sim_drift: tuple[_Number, _Number] = (0.0, 0.0)
    sim_seed: _Int = 0
    # file replay
    rate_fps: _Positive | None = None
    axes: _Text | None = None  # file:PATH's axes where the file does not say them (--axes TZCYX)
    # sampling for streams whose frames do not say it (a plain TIFF replayed, a bare publisher):
    # the widefield PSF model and measured-PSF resampling need the pixel size (and z step)
    pixel_size_um: _Number | None = None
    z_step_um: _Number | None = None
    interval_s: _Number | None = None
    # saving
    # True (every product), False (raw only), a list of products, or "auto": the chain's last
    # restored image and what each analysis keeps (docs/storage.md: bytes per frame)
    save_products: _Flag | list[_Text] | Literal["auto"] = "auto"
    save_live: _Flag = False  # save Micro-Manager live-mode and snap streams too (frames with live: true)
    float16: _Flag = False  # every product as float16 (same as product_dtype = "float16")
    # products' stored dtype: float16 halves the bytes (11-bit mantissa, values up to 65504; larger
    # ones are stored as 65504 and counted per frame in the saturated record); per-product overrides
    product_dtype: Literal["float16", "float32"] = "float16"
    product_dtypes: dict[_Text, Literal["float16", "float32"]] = dataclasses.field(default_factory=dict)
    # saved products of frames the live path skipped: restored in order from the saved raw
    # (daemon/completion.py): during the acquisition on spare capacity, only after it, or off
    complete: Literal["during", "after", "off"] = "during"
    # self-tuning deconvolution and the live resolution readout (daemon/tuning.py): they need the
    # camera's gain and offset (--calibration, or the stream's camera metadata)
    tune: Literal["auto", "off"] = "auto"
    tune_every_s: _Positive = 10.0
    resolution_every_s: _NonNegative = 2.0  # 0: no resolution readout
    compress_raw: _Flag = False
    fsync: _Flag = False
    memory_budget_mb: _NonNegative = 1024.0
    # camera noise calibration (JSON from `livescope calibrate --out`): denoise and trust use it
    calibration: _Text | None = None
    min_free_gb: _NonNegative = 1.0  # refuse to start with less free space at --out; warn while running
    # previews
    preview_hz: Annotated[float, Field(strict=True, gt=0, le=1000, allow_inf_nan=False)] = 20.0
    preview_size: _Count = 512
    # engine failure policy
    max_engine_failures: _Count = 5
    exit_on_end: _Flag = True

    def open_binds(self) -> list[str]:
        """The sockets this daemon would bind on a non-loopback address, as ``--name ADDRESS``."""
        from ..bridges.auth import is_loopback

        return [
            f"--{name} {address}"
            for name in ("ingest", "publish", "control", "restore")
            if (address := getattr(self, name)) and not is_loopback(address)
        ]

    def wants_curve(self) -> bool:
        return bool(self.curve or self.curve_dir or self.open_binds())

    def saves(self, product: str) -> bool:
        if product == "raw":
            return True
        if isinstance(self.save_products, bool):
            return self.save_products
        if self.save_products == "auto":
            return product in auto_products(tuple(self.engines), json.dumps(self.engine_params, sort_keys=True))
        return product in self.save_products

    def stored_dtypes(self) -> dict[str, str]:
        """The stored dtype of every product this chain makes (float16 or float32)."""
        default = "float16" if self.float16 else self.product_dtype
        names = {o for n in self.engines for o in EngineSlot(n, self.engine_params.get(n, {})).image_outputs()}
        return {p: self.product_dtypes.get(p, default) for p in sorted(names)}


def client_curve(curve: bool = False, curve_dir: str | Path | None = None) -> Any:
    """The CURVE keys a client (CLI, viewer, publisher) uses: None unless asked for with ``--curve``
    or ``--curve-dir``; then the client key pair and the server's public key from the folder."""
    if not (curve or curve_dir):
        return None
    from ..bridges.auth import CurveClient

    return CurveClient.from_dir(curve_dir)


def parse_params(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["deconvolve.iterations=2", "denoise.backend=torch"]`` -> nested dict (values as TOML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--param {item!r}: expected ENGINE.NAME=VALUE, e.g. deconvolve.iterations=2")
        key, raw = item.split("=", 1)
        engine, name = key.split(".", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as a path
        out.setdefault(engine, {})[name] = value
    return out


def load_config(path: str | Path | None, *, flags: Mapping[str, str] | None = None, **overrides: Any) -> DaemonConfig:
    """Defaults < TOML file (top-level keys as in DaemonConfig, engine parameters in
    ``[params.ENGINE]`` tables) < overrides that are not None; then checked (:func:`validate_config`).
    ``flags`` names the command-line option of an override (``{"memory_budget_mb": "--memory-budget"}``)
    for the error messages; by default ``--memory-budget-mb``."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    params: dict[str, dict[str, Any]] = {}
    param_origin: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    fields = {f.name for f in dataclasses.fields(DaemonConfig)}
    if path is not None:
        try:
            toml = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc}); see docs/config.md for an example") from None
        for table in ("engine_params", "params"):
            raw = toml.pop(table, {})
            if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
                problems.append(
                    f"{path}: {table}: engine parameters go in tables, one per engine: "
                    "[params.deconvolve] then iterations = 2 on the next line"
                )
                continue
            for engine, values in raw.items():
                for name, value in values.items():
                    params.setdefault(engine, {})[name] = value
                    param_origin[(engine, name)] = f"{path} [params.{engine}]"
        for key, value in toml.items():
            if key not in fields:
                problems.append(
                    f"{path}: unknown setting {key!r}{_did_you_mean(key, fields)}; the settings "
                    "are listed in docs/config.md"
                )
            data[key], origin[key] = value, str(path)
    for key, value in overrides.items():
        if value is None:
            continue
        where = (flags or {}).get(key) or "--" + key.replace("_", "-")
        if key == "engine_params":
            for engine, values in value.items():
                for name, v in values.items():
                    params.setdefault(engine, {})[name] = v
                    param_origin[(engine, name)] = f"--param {engine}.{name}"
            continue
        if key not in fields:
            problems.append(f"{where}: unknown setting {key!r}")
        data[key], origin[key] = value, where
    if problems:
        raise ValueError(_problems(problems))
    source = data.get("source")
    if isinstance(source, str) and source.startswith("zmq:"):  # zmq:ADDRESS binds ADDRESS for ingest
        data["source"], address = "zmq", source[4:]
        if data.get("ingest", address) != address:
            raise ValueError(
                f"{origin['source']}: source = {source!r} and ingest = {data['ingest']!r} name two "
                "ingest addresses; keep one"
            )
        data["ingest"], origin["ingest"] = address, origin["source"]
    data["engine_params"] = params
    return _validate(data, origin, param_origin)


def normalize_address(address: str, what: str = "address") -> str:
    """A ZeroMQ address: ``HOST:PORT`` (or ``:PORT``, ``PORT``) is read as ``tcp://HOST:PORT``; any
    other address without a scheme is refused naming the form to use."""
    import re

    if "://" in address:
        return address
    m = re.fullmatch(r"(?:(\[[0-9a-fA-F:.]+\]|[\w.-]+)?:)?(\d{1,5})", address.strip())
    if m:
        host = m.group(1) or "127.0.0.1"
        return f"tcp://{host}:{m.group(2)}"
    raise ValueError(
        f"{what} = {address!r} is not a ZeroMQ address: give tcp://HOST:PORT (e.g. tcp://127.0.0.1:5570) or ipc://PATH"
    )


def validate_config(cfg: DaemonConfig, origin: Mapping[str, str] | None = None) -> DaemonConfig:
    """Check a DaemonConfig built in code the way :func:`load_config` checks a file; returns a
    checked copy or raises ValueError naming each problem and its fix. ``origin`` names where a
    setting came from (``{"engines": "--engines"}``) for the messages."""
    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return _validate(data, origin or {}, {})


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(DaemonConfig)


def _validate(
    data: dict[str, Any], origin: Mapping[str, str], param_origin: Mapping[tuple[str, str], str]
) -> DaemonConfig:
    def where(key: str) -> str:
        return origin.get(key, "configuration")

    if data.get("out") == "":
        raise ValueError(f"{where('out')}: out is empty; give the OME-Zarr folder, or leave it out to save nothing")
    for key in ("ingest", "publish", "control", "restore"):
        value = data.get(key)
        if isinstance(value, str) and value:
            data[key] = normalize_address(value, f"{where(key)}: {key}")
    lines: dict[str, str] = {}
    try:
        cfg: DaemonConfig = _adapter().validate_python(data)
    except ValidationError as exc:
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            at = key + "".join(f"[{part}]" for part in err["loc"][1:] if isinstance(part, int))
            lines.setdefault(at, f"{where(key)}: {at} = {_toml(err['input'])}: {err['msg']}; {_example(key)}")
        # the rest is checked too, with defaults for the settings refused: every problem at once
        wrong = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        try:
            cfg = _adapter().validate_python({k: v for k, v in data.items() if k not in wrong})
        except ValidationError:
            raise ValueError(_problems(list(lines.values()))) from None
    problems: list[str] = list(lines.values())
    for key in SAMPLING_KEYS:
        try:
            check_sampling({key: getattr(cfg, key)})
        except ValueError as exc:
            problems.append(f"{where(key)}: {exc}; {_example(key)}")
    problems += _check_source(cfg, where)
    for key in ("calibration", "sequence", "mm_config"):
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            problems.append(f"{where(key)}: {key} = {_toml(value)}: {_missing(value)}")
    problems += _check_engines(cfg, where, param_origin)
    if problems:
        raise ValueError(_problems(problems))
    return cfg


def _check_source(cfg: DaemonConfig, where: Any) -> list[str]:
    src = cfg.source
    if src in ("sim", "mmcore", "zmq"):
        return []
    if src.startswith("file:"):
        return [] if Path(src[5:]).exists() else [f"{where('source')}: source = {_toml(src)}: {_missing(src[5:])}"]
    return [f"{where('source')}: source = {_toml(src)}: not a source; {_example('source')}"]


def _check_engines(cfg: DaemonConfig, where: Any, param_origin: Mapping[tuple[str, str], str]) -> list[str]:
    """Each engine exists and imports, each parameter is one it takes, each file parameter names a
    file, and each engine can be created with its parameters (as the daemon will, per stream)."""
    from ..engines import EngineError, available_engines, create_engine, engine_factory, engine_parameters

    problems: list[str] = []
    bad: set[str] = set()  # engines with a problem already: not created
    for i, name in enumerate(cfg.engines):
        try:
            engine_factory(name)
        except EngineError as exc:
            problems.append(f"{where('engines')}: {exc}")
            bad.add(name)
        if name in cfg.engines[:i]:
            problems.append(f"{where('engines')}: engine {name!r} is listed twice; an engine runs once in the chain")
    for engine, params in cfg.engine_params.items():

        def at(param: str, engine: str = engine) -> str:
            return param_origin.get((engine, param), "configuration")

        if engine not in cfg.engines:
            if engine not in available_engines():
                names = available_engines()
                problems.append(
                    f"{at(next(iter(params), ''))}: no engine {engine!r}{_did_you_mean(engine, names)}; "
                    f"available: {', '.join(names)}"
                )
            elif params:
                log.warning("parameters for %s, which is not in the engine chain %s, are not used", engine, cfg.engines)
            continue
        if engine in bad:
            continue
        accepted = engine_parameters(engine)
        for param, value in params.items():
            if accepted is not None and param not in accepted:
                bad.add(engine)
                problems.append(
                    f"{at(param)}: {engine} has no parameter {param!r}{_did_you_mean(param, accepted)}; "
                    f"it takes: {', '.join(accepted)}"
                )
            elif param in PATH_PARAMS and isinstance(value, str) and value not in ("", "default", "none", "None"):
                # fit_out is written: its folder must exist; the others are read
                missing = str(Path(value).parent) if param == "fit_out" else value
                # a Model Zoo package may be given as its folder (holding rdf.yaml)
                readable = Path(value).is_file() or (param == "model" and (Path(value) / "rdf.yaml").is_file())
                if not (Path(missing).is_dir() if param == "fit_out" else readable):
                    bad.add(engine)
                    why = (
                        "a folder without rdf.yaml: give a model file, or a BioImage Model Zoo package "
                        "(its folder, rdf.yaml or zip)"
                        if param == "model" and Path(value).is_dir()
                        else _missing(missing)
                    )
                    problems.append(f"{at(param)}: {engine}.{param} = {_toml(value)}: {why}")
    products = {"raw"}
    for name in dict.fromkeys(cfg.engines):
        if name in bad:
            continue
        params = cfg.engine_params.get(name, {})
        try:  # the daemon creates the engine per stream: a bad value fails here, not on the first frame
            made = create_engine(name, **params)
        except Exception as exc:
            origin = sorted({param_origin.get((name, p), "configuration") for p in params}) or [where("engines")]
            problems.append(
                f"{', '.join(origin)}: engine {name} cannot start with parameters {_toml(params)}: "
                f"{type(exc).__name__}: {exc}"
            )
            continue
        scalars = set(getattr(made, "scalar_outputs", ()))
        products.update(o for o in getattr(made, "outputs", ()) if o not in scalars)
        close = getattr(made, "close", None)
        if close is not None:
            close()
    if cfg.product_dtypes and not problems:
        unknown = [p for p in cfg.product_dtypes if p not in products or p == "raw"]
        if unknown:
            problems.append(
                f"{where('product_dtypes')}: product_dtypes names {', '.join(map(repr, unknown))}, which the "
                f"engine chain does not make (raw is kept as the camera sent it); it makes: "
                f"{', '.join(sorted(products - {'raw'}))}"
            )
    if isinstance(cfg.save_products, list) and not problems:
        unknown = [p for p in cfg.save_products if p not in products]
        if unknown:
            problems.append(
                f"{where('save_products')}: save_products names {', '.join(map(repr, unknown))}, which "
                f"the engine chain does not make; it makes: {', '.join(sorted(products))}"
            )
    return problems


_EXAMPLES = {
    "source": '"sim", "mmcore", "zmq" or "file:PATH" (--source)',
    "mm_config": '"rig.cfg"',
    "sequence": '"mda.yaml"',
    "out": '"D:/data/exp42.zarr"',
    "engines": '["register", "denoise"] (--engines register,denoise; parameters go in [params.ENGINE])',
    "engine_params": "a table per engine: [params.deconvolve] then iterations = 2 (--param deconvolve.iterations=2)",
    "restore": '"tcp://127.0.0.1:5574"',
    "curve_dir": '"~/keys"',
    "frames": "100",
    "rate_fps": "10.0",
    "pixel_size_um": "0.108",
    "z_step_um": "0.3",
    "interval_s": "0.5",
    "calibration": '"cal.json"',
    "save_products": '"auto", true, false or a list of products: ["denoised"]',
    "sim_channels": '["GFP", "mCherry"]',
    "memory_budget_mb": "2048 (megabytes, a number)",
    "preview_hz": "20 (previews per second, up to 1000)",
}


def _example(key: str) -> str:
    if key in _EXAMPLES:
        return f"e.g. {key} = {_EXAMPLES[key]}"
    default = next((f.default for f in dataclasses.fields(DaemonConfig) if f.name == key), None)
    if default is None or default is dataclasses.MISSING:
        return "see docs/config.md"
    return f"e.g. {key} = {_toml(default)} (the default)"


def _toml(value: Any) -> str:
    """A value as it would be written in TOML (for messages)."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _missing(path: str) -> str:
    if path.startswith("~"):
        return "no such file (~ is not expanded here: write the full path)"
    if not Path(path).is_absolute():
        return f"no such file; relative paths are read from the folder the daemon starts in, {Path.cwd()}"
    return "no such file"


def _problems(lines: list[str]) -> str:
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in the configuration:\n  " + "\n  ".join(lines)
