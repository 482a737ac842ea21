"""Daemon configuration: defaults, an optional TOML file, then command-line overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from ..bridges.files import SAMPLING_KEYS, check_sampling
from ..bridges.transport import DEFAULT_CONTROL, DEFAULT_INGEST, DEFAULT_PUBLISH

__all__ = ["DaemonConfig", "client_curve", "load_config", "parse_params"]


@dataclasses.dataclass
class DaemonConfig:
    source: str = "sim"  # sim | mmcore | file:PATH | zmq
    mm_config: str | None = None  # Micro-Manager .cfg for --source mmcore (none: the built-in microscope)
    sequence: str | None = None  # useq MDASequence YAML/JSON for sim/mmcore
    engines: list[str] = dataclasses.field(default_factory=list)
    engine_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    out: Path | None = None
    overwrite: bool = False
    resume: bool = False  # add this run to an existing store as new segments
    ingest: str = DEFAULT_INGEST
    publish: str | None = DEFAULT_PUBLISH
    control: str | None = DEFAULT_CONTROL
    restore: str | None = None  # synchronous restore socket for capture-time hooks (off by default)
    # ZeroMQ CURVE on every socket the daemon binds: always for a non-loopback address, on
    # loopback when asked (closes previews and ingest to the PC's other users); keys from curve_dir
    curve: bool = False
    curve_dir: str | None = None  # default: livescope.bridges.auth.default_keys_dir()
    frames: int | None = None  # time points for sim/file; frames to receive for zmq
    # sim microscope
    sim_shape: tuple[int, int] = (256, 256)
    sim_channels: tuple[str, ...] = ("GFP",)
    sim_z: int = 1
    sim_interval_s: float = 0.05
    sim_drift: tuple[float, float] = (0.0, 0.0)
    sim_seed: int = 0
    # file replay
    rate_fps: float | None = None
    # sampling for streams whose frames do not say it (a plain TIFF replayed, a bare publisher):
    # the widefield PSF model and measured-PSF resampling need the pixel size (and z step)
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    interval_s: float | None = None
    # saving
    save_products: bool | list[str] = True
    float16: bool = False
    compress_raw: bool = False
    fsync: bool = False
    memory_budget_mb: float = 1024.0
    # camera noise calibration (JSON from `livescope calibrate --out`): denoise and trust use it
    calibration: str | None = None
    min_free_gb: float = 1.0  # refuse to start with less free space at --out; warn while running
    # previews
    preview_hz: float = 20.0
    preview_size: int = 512
    # engine failure policy
    max_engine_failures: int = 5
    exit_on_end: bool = True

    def open_binds(self) -> list[str]:
        """The sockets this daemon would bind on a non-loopback address, as ``--name ADDRESS``."""
        from ..bridges.auth import is_loopback

        return [f"--{name} {address}" for name in ("ingest", "publish", "control", "restore")
                if (address := getattr(self, name)) and not is_loopback(address)]

    def wants_curve(self) -> bool:
        return bool(self.curve or self.curve_dir or self.open_binds())

    def saves(self, product: str) -> bool:
        if product == "raw":
            return True
        if isinstance(self.save_products, bool):
            return self.save_products
        return product in self.save_products


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


def load_config(path: str | Path | None, **overrides: Any) -> DaemonConfig:
    """Defaults < TOML file (top-level keys as in DaemonConfig, engine params in [engines.NAME]) <
    overrides that are not None."""
    cfg = DaemonConfig()
    if path is not None:
        data = tomllib.loads(Path(path).read_text())
        params = data.pop("engine_params", {}) | data.pop("params", {})
        for key, value in data.items():
            if not hasattr(cfg, key):
                raise ValueError(f"{path}: unknown setting {key!r}")
            setattr(cfg, key, value)
        for engine, p in params.items():
            cfg.engine_params.setdefault(engine, {}).update(p)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "engine_params":
            for engine, p in value.items():
                cfg.engine_params.setdefault(engine, {}).update(p)
        else:
            setattr(cfg, key, value)
    check_sampling({k: getattr(cfg, k) for k in SAMPLING_KEYS})
    if cfg.out is not None:
        cfg.out = Path(cfg.out)
    cfg.sim_shape = tuple(cfg.sim_shape)  # type: ignore[assignment]
    cfg.sim_channels = tuple(cfg.sim_channels)
    return cfg
