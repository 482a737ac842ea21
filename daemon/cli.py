"""The ``livescope`` command line. Logging is configured here, and only here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("livescope.cli")

DEMO_ENGINES = ("register", "denoise", "deconvolve", "decompose")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    try:  # importing pymmcore-plus sets the root logger to DEBUG: let it, then set ours
        import pymmcore_plus._logger  # noqa: F401
    except Exception:
        pass
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    # pymmcore-plus logs every MDA event at INFO on its own logger, Dask each worker's start and
    # stop: only with -vv
    for name in ("pymmcore-plus", "distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else max(level, logging.WARNING))
    # distributed sets its loggers' levels from dask's config when it is imported (later, by
    # `process`), and its worker processes do the same: say it in the config they all read
    if verbose >= 2:
        os.environ["DASK_LOGGING__DISTRIBUTED"] = "info"
    else:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


class _Help(argparse.HelpFormatter):
    """Every option's default in its help, where it has one worth saying (not None or off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or isinstance(action, argparse._HelpAction | argparse._CountAction)
        ):
            return text
        shown = " ".join(str(v) for v in default) if isinstance(default, tuple | list) else default
        return f"{text} (default: {shown})".replace("%", "%%").replace("%%(", "%(")


def _finish_parser(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """Defaults shown in every help, and -v / -q after the command too (``livescope daemon -v``)."""
    parser.formatter_class = _Help
    if not top:
        parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output")
        parser.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS, help="less log output")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _finish_parser(child, top=False)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engines",
        default=None,
        help="comma-separated engine chain, e.g. register,denoise,deconvolve (`livescope engines` lists them)",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="ENGINE.NAME=VALUE",
        help="an engine parameter, e.g. deconvolve.iterations=2 (repeatable)",
    )
    g = p.add_argument_group("deconvolution PSF (see docs/deconvolution.md)")
    g.add_argument("--psf", help="measured PSF file (TIFF, 2-D or 3-D)")
    g.add_argument("--psf-sigma", type=float, help="Gaussian PSF sigma in pixels")
    g.add_argument("--na", type=float, help="numerical aperture (widefield PSF model)")
    g.add_argument("--wavelength", type=float, help="emission wavelength in nm (widefield PSF model)")
    g.add_argument("--ri", type=float, help="immersion refractive index (widefield PSF model)")
    p.add_argument("--model", help="denoising model file (default: the shipped model)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"], help="inference backend")


def _add_curve_options(p: argparse.ArgumentParser, *, daemon: bool = False) -> None:
    g = p.add_argument_group("ZeroMQ CURVE (docs/reliability.md#curve)")
    if daemon:
        g.add_argument(
            "--curve",
            action="store_true",
            default=None,
            help="CURVE on every socket, loopback too (closes previews and ingest to other users of "
            "the PC); always on for a non-loopback address",
        )
        g.add_argument(
            "--curve-dir",
            default=None,
            help="the keys folder (server key pair + allowed/ client keys; "
            "default: see `livescope keys init`); implies --curve",
        )
    else:
        g.add_argument("--curve", action="store_true", help="the daemon runs CURVE: use the client keys")
        g.add_argument(
            "--curve-dir",
            default=None,
            help="folder with client.key_secret and the daemon's server.key; implies --curve",
        )


def _client_curve(args: argparse.Namespace) -> Any:
    from .config import client_curve

    return client_curve(getattr(args, "curve", False), getattr(args, "curve_dir", None))


def _engine_params(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from .config import parse_params

    params = parse_params(args.param)
    dec = {
        k: v
        for k, v in (
            ("psf", args.psf),
            ("psf_sigma", args.psf_sigma),
            ("na", args.na),
            ("wavelength_nm", args.wavelength),
            ("refractive_index", args.ri),
        )
        if v is not None
    }
    if dec:
        params.setdefault("deconvolve", {}).update(dec)
    den = {k: v for k, v in (("model", args.model), ("backend", args.backend)) if v is not None}
    if den:
        params.setdefault("denoise", {}).update(den)
    return params


_UNITS_MB = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0**2}


def size_mb(text: str) -> float:
    """A memory size as every option takes it: a number of MB, or a number with a unit
    (``512MB``, ``2GB``, ``2 GiB``; binary multiples). Returns MB."""
    match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give MB (2048) or a unit (2GB, 512MB)")
    value = float(match.group(1)) * _UNITS_MB[match.group(2).lower()]
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be 0 or more")
    return value


def _engines(arg: str | None) -> list[str] | None:
    if arg is None:
        return None
    return [e.strip() for e in arg.split(",") if e.strip()]


def build_parser() -> argparse.ArgumentParser:
    from ..bridges.transport import DEFAULT_CONTROL, DEFAULT_INGEST, DEFAULT_PUBLISH

    parser = argparse.ArgumentParser(prog="livescope", description="A live companion for microscopes.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output (errors only)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("demo", help="the simulated microscope through the daemon, all engines, a live window")
    p.add_argument("--headless", action="store_true", help="no window: a progress bar, a summary and a PNG")
    p.add_argument(
        "--frames", type=int, default=None, help="time points to acquire (default 200 headless, 1000 with a window)"
    )
    p.add_argument("--out", default="livescope-demo.zarr", help="OME-Zarr output (replaced on each demo run)")
    p.add_argument("--png", default=None, help="summary picture (default OUT.png)")
    p.add_argument(
        "--engines", default=None, help=f"engine chain (default: those available of {','.join(DEMO_ENGINES)})"
    )
    p.add_argument("--channels", type=int, default=1, choices=[1, 2], help="simulated channels")
    p.add_argument("--z", type=int, default=1, help="simulated z planes")
    p.add_argument("--size", type=int, default=256, help="simulated frame size (pixels)")

    p = sub.add_parser("daemon", help="run the daemon: ingest -> engines -> store and previews")
    p.add_argument(
        "--config",
        help="TOML file with daemon settings (docs/config.md), or with --source mmcore a Micro-Manager .cfg file",
    )
    p.add_argument(
        "--source",
        default=None,
        help="sim | mmcore (runs the MDA in-process) | file:PATH | zmq[:ADDR] (bind --ingest) (default sim)",
    )
    p.add_argument("--sequence", default=None, help="useq MDASequence YAML/JSON for --source sim/mmcore")
    _add_engine_options(p)
    p.add_argument("--out", default=None, help="OME-Zarr output folder (none: no saving)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="add this run to an existing --out as new segments (after a crash too)",
    )
    p.add_argument("--ingest", default=None, help=f"frame socket to bind (default {DEFAULT_INGEST})")
    p.add_argument("--publish", default=None, help=f"preview socket to bind (default {DEFAULT_PUBLISH})")
    p.add_argument("--control", default=None, help=f"control socket to bind (default {DEFAULT_CONTROL})")
    p.add_argument(
        "--restore",
        default=None,
        help="bind a synchronous restore socket (e.g. tcp://127.0.0.1:5574) "
        "for capture-time hooks such as livescope.bridges.pycromanager.restore",
    )
    p.add_argument("--frames", type=int, default=None, help="stop after N time points (sim, file) or frames (zmq)")
    p.add_argument("--rate", type=float, default=None, dest="rate_fps", help="file replay rate in frames/s")
    p.add_argument(
        "--axes",
        default=None,
        help="file:PATH's axes, one letter per axis in the file's order (T, P "
        "position, C, Z, Y, X), where it does not say them or says them wrong, e.g. TZCYX",
    )
    p.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        dest="pixel_size_um",
        help="pixel size in um for streams whose frames do not say it (after binning)",
    )
    p.add_argument(
        "--z-step",
        type=float,
        default=None,
        dest="z_step_um",
        help="z step in um for streams whose frames do not say it",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=None,
        dest="interval_s",
        help="seconds between time points for streams whose frames do not say it",
    )
    p.add_argument(
        "--compress",
        action="store_true",
        default=None,
        dest="compress_raw",
        help="blosc zstd + bitshuffle on raw (lossless)",
    )
    p.add_argument(
        "--float16", action="store_true", default=None, help="save every product as float16 (the default dtype)"
    )
    p.add_argument(
        "--product-dtype",
        choices=["float16", "float32"],
        default=None,
        help="the products' stored dtype (default float16: half the bytes; values beyond 65504 are "
        "stored as 65504 and counted per frame)",
    )
    p.add_argument(
        "--save",
        default=None,
        metavar="PRODUCTS",
        help="which products to save: auto (default: the chain's last restored image and the "
        "decomposition's background, slow and fast), all, none, or a comma-separated list",
    )
    p.add_argument("--no-products", action="store_true", help="save raw only (same as --save none)")
    p.add_argument(
        "--save-live",
        action="store_true",
        default=None,
        help="also save Micro-Manager live-mode and snap streams (by default they are restored and "
        "previewed, not saved)",
    )
    p.add_argument(
        "--complete",
        choices=["during", "after", "off"],
        default=None,
        help="saved products of the frames the live path had no time for: restored in order from the "
        "saved raw, on spare capacity during the acquisition and the rest after it (during, the "
        "default), only after it (after), or left skipped (off)",
    )
    p.add_argument(
        "--tune",
        choices=["auto", "off"],
        default=None,
        help="self-tuning deconvolution and the live resolution readout (default auto: on when the "
        "camera's gain and offset are known, from --calibration or the stream)",
    )
    p.add_argument("--fsync", action="store_true", default=None, help="fsync every shard (power-loss safety, slower)")
    p.add_argument(
        "--calibration",
        default=None,
        metavar="CAL.json",
        help="camera noise calibration from `livescope calibrate --out` (gain, offset, read "
        "noise): the denoiser's normalisation and the trust checks use it",
    )
    p.add_argument(
        "--memory-budget",
        type=size_mb,
        default=None,
        dest="memory_budget_mb",
        metavar="SIZE",
        help="frames buffered for the store before frames are recorded lost: MB, or with a unit "
        "(2GB, 512MB) (default 1024 MB)",
    )
    p.add_argument(
        "--sim-channels", type=int, default=None, choices=[1, 2], help="built-in microscope: channels (GFP, mCherry)"
    )
    p.add_argument("--sim-z", type=int, default=None, help="built-in microscope: z planes per time point (1)")
    p.add_argument("--sim-size", type=int, default=None, help="built-in microscope: frame size in pixels (256)")
    p.add_argument(
        "--sim-interval", type=float, default=None, dest="sim_interval_s", help="seconds between time points"
    )
    p.add_argument("--sim-drift", type=float, nargs=2, default=None, metavar=("DY", "DX"), help="sample drift px/frame")
    p.add_argument("--progress", action="store_true", help="a progress bar (with --frames)")
    _add_curve_options(p, daemon=True)

    p = sub.add_parser("view", help="the live viewer (subscribes to a daemon's previews)")
    p.add_argument("--connect", default=DEFAULT_PUBLISH, help="the daemon's preview socket")
    p.add_argument("--control", default=DEFAULT_CONTROL, help="the daemon's control socket (telemetry)")
    p.add_argument("--screenshot", default=None, help="save a PNG of the window after --seconds and exit")
    p.add_argument("--seconds", type=float, default=None, help="close after this many seconds")
    p.add_argument("--settings", default=None, help="where the window layout is remembered (an .ini file)")
    _add_curve_options(p)

    p = sub.add_parser("process", help="the same engine chain offline on a TIFF or OME-Zarr movie")
    p.add_argument("input", help="a TIFF / OME-TIFF, an OME-Zarr image or livescope store, or an NDTiff folder")
    p.add_argument("--out", required=True, help="the OME-Zarr folder to write (raw copy and products)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--frames", type=int, default=None, help="only the first N time points (default: all)")
    p.add_argument("--no-raw", action="store_true", help="do not copy the raw frames into the output")
    p.add_argument(
        "--axes",
        default=None,
        help="the input's axes, one letter per axis in the file's order (T, "
        "P position, C, Z, Y, X), where it does not say them or says them wrong, e.g. TZCYX",
    )
    g = p.add_argument_group("scale (dask.distributed; see docs/process.md)")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local Dask workers (default: one per core, up to 4; 0 = no Dask, one process)",
    )
    g.add_argument("--scheduler", default=None, help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (HPC, k8s)")
    g.add_argument("--chunk-t", type=int, default=None, help="time points per task")
    g.add_argument("--tile", type=int, default=None, help="spatial tile size in pixels (engines that allow tiling)")
    g.add_argument(
        "--memory-limit",
        type=size_mb,
        default=None,
        metavar="SIZE",
        help="per local worker: MB, or with a unit (4GB, 512MB) (default: Dask's share of the RAM)",
    )
    g.add_argument("--resume", action="store_true", help="finish an interrupted run: complete chunks are skipped")
    g.add_argument("--threads", action="store_true", help="local workers as threads, not processes")
    g = p.add_argument_group("sampling (default: what the movie's metadata says; these override it)")
    g.add_argument("--pixel-size", type=float, default=None, help="pixel size in um, after binning")
    g.add_argument("--z-step", type=float, default=None, help="z step in um")
    g.add_argument("--interval", type=float, default=None, help="seconds between time points")
    _add_engine_options(p)

    p = sub.add_parser(
        "fit",
        help="fit a model on your own data (self-supervised): denoising (default), the "
        "learned decomposition (--task decompose) or deconvolution (--task deconvolve|restore), "
        "from a file or live",
    )
    p.add_argument("input", nargs="?", help="a TIFF / OME-Zarr movie or frame (omit with --live)")
    p.add_argument("--out", help="the model file to write (.lsmodel)")
    p.add_argument("--live", action="store_true", help="fit on the running daemon's stream and hot-swap the model")
    p.add_argument("--control", default=DEFAULT_CONTROL, help="with --live: the daemon's control socket")
    p.add_argument(
        "--task",
        choices=("denoise", "decompose", "deconvolve", "restore"),
        default="denoise",
        help="decompose: the learned multi-lag predictors (docs/decomposition.md); deconvolve / "
        "restore: a network taught by WB-RL with your PSF (docs/learned_deconvolution.md)",
    )
    p.add_argument(
        "--engine",
        default=None,
        help="with --live: the daemon's engine to fit for (default: the task's name: denoise, deconvolve or restore)",
    )
    p.add_argument("--lags", default="1,2,4,8", help="with --task decompose: the lags, in frames")
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames to fit on (live: the next N frames; default 32, 400 for --task decompose)",
    )
    p.add_argument("--steps", type=int, default=None, help="default 400 (denoise, deconvolve), 1000 (decompose)")
    p.add_argument("--seconds", type=float, default=600.0, help="time budget")
    p.add_argument("--from-model", default=None, help="continue from this model (default: the shipped one)")
    p.add_argument("--clean", default=None, help="supervised: clean images to crappify (PSSR-style)")
    p.add_argument("--past-frames", type=int, default=0, help="k past frames as extra input channels (new model)")
    g = p.add_argument_group(
        "with --task deconvolve / restore: the teacher's PSF and settings (file fits; live "
        "fits take the running engine's)"
    )
    g.add_argument(
        "--psf",
        help="measured PSF (TIFF of a bead, 2-D or 3-D) or .npy of one PSF or a grid "
        "(ny, nx, ky, kx) of per-region PSFs",
    )
    g.add_argument("--psf-sigma", type=float, help="Gaussian PSF sigma in pixels (default 1.5)")
    g.add_argument(
        "--psf-sigma-corner",
        type=float,
        help="field-varying blur: the Gaussian sigma in the corners "
        "(it grows with the squared distance from the centre, where it is --psf-sigma)",
    )
    g.add_argument("--psf-regions", type=int, default=3, help="with --psf-sigma-corner: regions per axis (default 3)")
    g.add_argument("--na", type=float, help="numerical aperture (widefield PSF model; needs --pixel-size)")
    g.add_argument("--wavelength", type=float, default=520.0, help="emission wavelength in nm (widefield model)")
    g.add_argument("--ri", type=float, default=1.515, help="immersion refractive index (widefield model)")
    g.add_argument("--pixel-size", type=float, default=None, help="pixel size in um (default: the movie's)")
    g.add_argument("--teacher", choices=("wb", "rl"), default="wb", help="the classical teacher (default wb)")
    g.add_argument("--teacher-iterations", type=int, default=None, help="its iterations (default 2 for wb, 3 for rl)")
    g.add_argument(
        "--restore-window",
        type=int,
        default=5,
        help="with --task restore: frames averaged for the teacher (the scene must be still over them)",
    )
    _add_curve_options(p)

    p = sub.add_parser("compile", help="build a TensorRT engine for a model ahead of time (NVIDIA GPU)")
    p.add_argument("model", nargs="?", default=None, help="a .lsmodel model (default: the shipped one)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=2,
        default=(512, 512),
        metavar=("H", "W"),
        help="the frame size the engine is built for (TensorRT engines are built per shape profile)",
    )

    p = sub.add_parser("calibrate", help="camera noise calibration (gain, offset, read noise) from a movie")
    p.add_argument("input", help="a TIFF time-lapse of the camera's frames")
    p.add_argument("--dark", default=None, help="dark frames (TIFF): offset and read noise separately, sCMOS maps")
    p.add_argument("--out", default=None, help="write the calibration as JSON")

    p = sub.add_parser("status", help="ask a running daemon for its status (JSON)")
    p.add_argument("--control", default=DEFAULT_CONTROL, help="the daemon's control socket")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    _add_curve_options(p)

    p = sub.add_parser("stop", help="ask a running daemon to stop (flushes and closes its store)")
    p.add_argument("--control", default=DEFAULT_CONTROL, help="the daemon's control socket")
    _add_curve_options(p)

    p = sub.add_parser("keys", help="ZeroMQ CURVE keys: needed to bind other addresses than loopback, or --curve")
    ks = p.add_subparsers(dest="keys_command", required=True)
    k = ks.add_parser("init", help="make a server key pair, a client key pair and an allow-list with that client")
    k.add_argument(
        "--dir",
        default=None,
        help="the keys folder (default: $LIVESCOPE_KEYS_DIR, else "
        "~/.config/livescope/keys, %%APPDATA%%\\livescope\\keys on Windows)",
    )
    k.add_argument("--force", action="store_true", help="replace existing keys (clients holding old keys are refused)")
    k = ks.add_parser("client", help="make a client key pair only (on a viewer's or a camera's machine)")
    k.add_argument("--dir", default=None, help="where to write the client key pair (default: the keys folder)")
    k.add_argument("--force", action="store_true", help="replace an existing client key pair")
    k = ks.add_parser("allow", help="allow a client: copy its public key (.key) into the daemon's allow-list")
    k.add_argument("public_key", help="the client's public key file (CLIENT.key, never the .key_secret)")
    k.add_argument("--dir", default=None, help="the daemon's keys folder")
    k.add_argument("--name", default=None, help="name in the allow-list (default: the file's name)")

    p = sub.add_parser("recover", help="after a crash: trim a store to the frames it recorded as saved")
    p.add_argument("store", help="the store's root folder")

    p = sub.add_parser(
        "complete",
        help="restore the product frames a daemon's store is missing (stopped mid-completion, killed, "
        "or run with --complete off), in order from the saved raw",
    )
    p.add_argument("store", help="the daemon's store (its root folder)")
    p.add_argument(
        "--engines", default=None, help="comma-separated engine chain (default: the one the store's provenance names)"
    )
    p.add_argument(
        "--param", action="append", default=None, metavar="ENGINE.NAME=VALUE", help="an engine parameter (repeatable)"
    )
    g = p.add_argument_group("on Dask (as livescope process; default: in order, in this process)")
    g.add_argument("--workers", type=int, default=None, help="local Dask workers")
    g.add_argument("--scheduler", default=None, help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--threads", action="store_true", help="local workers as threads, not processes")
    p = sub.add_parser(
        "export",
        help="write a livescope denoising model as a BioImage Model Zoo package (docs/models.md)",
    )
    p.add_argument("model", nargs="?", default=None, help="a .lsmodel file (default: the shipped one)")
    p.add_argument("--format", choices=("bioimageio",), default="bioimageio", help="the package format")
    p.add_argument("--out", required=True, help="the package folder to write (a .zip name writes the zip)")
    p.add_argument(
        "--sample",
        required=True,
        help="a frame (or movie: its first frame) of your camera and sample: fixes the package's "
        "normalisation and is its test input",
    )
    p.add_argument("--name", default=None, help="the package's name (default: from the model)")
    p = sub.add_parser("engines", help="the engines this installation can run, their outputs and parameters")
    p.add_argument("name", nargs="?", default=None, help="one engine (default: all)")
    _finish_parser(parser)
    return parser


def _has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_daemon(cfg: Any, *, progress: bool = False, on_started: Any = None) -> dict[str, Any]:
    """Run the pipeline (and the configured source) until the source ends, N frames, or a signal."""
    from .control import ControlServer
    from .pipeline import Pipeline
    from .sources import make_source

    pipeline = Pipeline(cfg)
    try:
        control = ControlServer(cfg.control, pipeline.handle, curve=pipeline.curve) if cfg.control else None
    except Exception:
        pipeline.close()
        raise
    pipeline.start()
    if control:
        control.start()
    # in-process sources connect where the pipeline lets them in (an owner-only ipc endpoint with CURVE)
    import dataclasses

    source = make_source(dataclasses.replace(cfg, ingest=pipeline.source_ingest))
    old_handlers = {}

    def _on_signal(signum: int, _frame: Any) -> None:
        if pipeline.state == "completing":
            log.warning("signal %d: completion stopped; the rest stays recorded as skipped", signum)
            pipeline.completer.abandon()
            return
        log.warning("signal %d: stopping (flushing the store; a second signal skips completing products)", signum)
        pipeline.request_stop()

    for signame in ("SIGINT", "SIGTERM", "SIGBREAK"):
        sig = getattr(signal, signame, None)
        if sig is not None:
            try:
                old_handlers[sig] = signal.signal(sig, _on_signal)
            except ValueError:  # not the main thread (tests)
                pass
    bar = None
    try:
        if source is not None:
            source.start()
        if on_started is not None:
            on_started(pipeline)
        if progress and cfg.frames:
            from tqdm import tqdm

            planes = len(cfg.sim_channels) * cfg.sim_z if cfg.source == "sim" else 1
            bar = tqdm(total=cfg.frames * planes, desc="frames saved", unit="frame")
        while not pipeline.wait(timeout=0.25):
            if bar is not None:
                st = pipeline.status()["frames"]
                bar.n = st["saved"]
                bar.set_postfix(received=st["received"], lost=st["lost"], refresh=False)
                bar.refresh()
    finally:
        if source is not None:
            source.stop()
        if bar is not None:
            bar.n = pipeline.status()["frames"]["saved"]
            bar.refresh()
            bar.close()  # the products' completion (if any) has a bar of its own
        summary = pipeline.close(progress=progress)
        if control:
            control.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    if source is not None and hasattr(source, "stats"):
        summary["source_stats"] = source.stats()
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    f = summary["frames"]
    skipped = ", ".join(f"{k} {v}" for k, v in (f["skipped"] or {}).items()) or "none"
    print(
        f"frames: received {f['received']}, saved {f['saved']}, lost {f['lost']}, "
        f"rejected {f['rejected']}; skipped under load (raw keeps them): {skipped}"
    )
    for name, e in summary["engines"].items():
        lat = e["latency"]
        state = "on" if e["enabled"] else f"off ({e['reason']})"
        print(
            f"engine {name:11s} {state}: processed {e['processed']}, "
            f"p50 {lat.get('p50_ms', float('nan')):.1f} ms, p99 {lat.get('p99_ms', float('nan')):.1f} ms"
        )
    if summary.get("store"):
        s = summary["store"]
        print(f"store: {s['path']} ({s['bytes_written'] / 2**20:.1f} MB written; images: {', '.join(s['images'])})")
    comp = summary.get("completion") or {}
    if comp.get("frames_completed") or comp.get("frames_to_go"):
        left = f", {comp['frames_to_go']} left skipped" if comp["frames_to_go"] else ""
        lost = f", {comp['unrecoverable']} without raw" if comp.get("unrecoverable") else ""
        print(
            f"products completed in order: {comp['frames_completed']} frame(s), from the first the live path skipped on"
            f"{left}{lost} (--complete {comp['mode']})"
        )
    tuning = summary.get("tuning") or {}
    if tuning.get("runs"):
        last = (tuning.get("last") or {}).get("best") or {}
        setting = " ".join(f"{k} {v}" for k, v in last.items())
        first = " of the denoised frame" if (tuning.get("last") or {}).get("denoise_first") else ""
        print(
            f"self-tuning: {tuning['runs']} runs, {tuning['changes']} changes, {tuning['cpu_s']:.1f} s CPU; "
            f"deconvolution now {setting}{first}"
        )
    if summary.get("events"):
        print(f"events flagged: {summary['events']}")


def cmd_demo(args: argparse.Namespace) -> int:
    from ..bridges.transport import free_tcp_address
    from ..engines import available_engines
    from .config import DaemonConfig, validate_config

    headless = args.headless or not _has_display()
    if args.engines is not None:
        engines = _engines(args.engines) or []
    else:
        have = set(available_engines())
        engines = [e for e in DEMO_ENGINES if e in have]
    frames = args.frames or (200 if headless else 1000)
    cfg = DaemonConfig(
        source="sim",
        engines=engines,
        out=Path(args.out),
        overwrite=True,
        frames=frames,
        ingest=free_tcp_address(),
        publish=free_tcp_address(),
        control=free_tcp_address(),
        sim_shape=(args.size, args.size),
        sim_channels=("GFP", "mCherry")[: args.channels],
        sim_z=args.z,
        sim_interval_s=0.05,
        sim_drift=(0.02, -0.015),
    )
    cfg = validate_config(
        cfg, {"engines": "--engines", "frames": "--frames", "sim_shape": "--size", "sim_z": "--z", "out": "--out"}
    )
    print(
        f"livescope demo: simulated microscope, {frames} time points of {args.size}x{args.size}, "
        f"engines: {', '.join(engines) or 'none'}; saving to {cfg.out}"
    )
    viewer = None

    def _start_viewer(pipeline: Any) -> None:
        nonlocal viewer
        if not headless:
            viewer = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "livescope.ui.viewer",
                    "--connect",
                    str(cfg.publish),
                    "--control",
                    str(cfg.control),
                ]
            )

    t0 = time.perf_counter()
    summary = run_daemon(cfg, progress=headless, on_started=_start_viewer)
    elapsed = time.perf_counter() - t0
    print(f"done in {elapsed:.1f} s")
    _print_summary(summary)
    png = Path(args.png) if args.png else Path(str(cfg.out).rstrip("/\\") + ".png")
    try:
        subprocess.run(
            [sys.executable, "-m", "livescope.ui.snapshot", str(cfg.out), str(png)],
            check=True,
            env={**os.environ, **({"QT_QPA_PLATFORM": "offscreen"} if headless else {})},
        )
        print(f"picture of the last frame of each product: {png}")
    except subprocess.CalledProcessError as exc:
        print(f"could not write the summary picture ({exc}); install the ui extra: pip install 'livescope[ui]'")
    if viewer is not None:
        print("the viewer stays open until you close it")
        viewer.wait()
    return 0 if summary["frames"]["saved"] > 0 else 1


# the `livescope daemon` option of each setting whose option is not --SETTING-NAME (for errors)
DAEMON_FLAGS = {
    "mm_config": "--config",
    "engine_params": "--param",
    "rate_fps": "--rate",
    "pixel_size_um": "--pixel-size",
    "z_step_um": "--z-step",
    "interval_s": "--interval",
    "compress_raw": "--compress",
    "memory_budget_mb": "--memory-budget",
    "sim_interval_s": "--sim-interval",
    "sim_shape": "--sim-size",
    "save_products": "--save",
    "product_dtype": "--product-dtype",
    "source": "--source",
}


def cmd_daemon(args: argparse.Namespace) -> int:
    from .config import load_config

    source = args.source
    ingest = args.ingest
    if source and source.startswith("zmq:"):
        ingest, source = source[4:], "zmq"
    overrides: dict[str, Any] = dict(
        source=source,
        engines=_engines(args.engines),
        engine_params=_engine_params(args),
        out=args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        ingest=ingest,
        publish=args.publish,
        control=args.control,
        frames=args.frames,
        restore=args.restore,
        rate_fps=args.rate_fps,
        pixel_size_um=args.pixel_size_um,
        z_step_um=args.z_step_um,
        interval_s=args.interval_s,
        compress_raw=args.compress_raw,
        float16=args.float16,
        save_live=args.save_live,
        complete=args.complete,
        tune=args.tune,
        fsync=args.fsync,
        memory_budget_mb=args.memory_budget_mb,
        calibration=args.calibration,
        sim_z=args.sim_z,
        sim_interval_s=args.sim_interval_s,
        sim_drift=tuple(args.sim_drift) if args.sim_drift else None,
        curve=args.curve,
        curve_dir=args.curve_dir,
    )
    if args.axes:  # file replay only; DaemonConfig.axes
        overrides["axes"] = args.axes
    if args.sim_channels:
        overrides["sim_channels"] = ("GFP", "mCherry")[: args.sim_channels]
    if args.sim_size:
        overrides["sim_shape"] = (args.sim_size, args.sim_size)
    if args.save:
        choice = args.save.strip().lower()
        overrides["save_products"] = {"auto": "auto", "all": True, "none": False}.get(
            choice, [p for p in args.save.split(",") if p]
        )
    if args.product_dtype:
        overrides["product_dtype"] = args.product_dtype
    if args.no_products:
        overrides["save_products"] = False
    toml_config = args.config
    if args.config and Path(args.config).suffix.lower() == ".cfg":
        overrides["mm_config"], toml_config = args.config, None
    overrides["sequence"] = args.sequence
    cfg = load_config(toml_config, flags=DAEMON_FLAGS, **overrides)
    if cfg.source == "zmq":
        cfg.exit_on_end = False
    log.info(
        "daemon: source %s, engines %s, ingest %s, previews %s, control %s",
        cfg.source,
        cfg.engines,
        cfg.ingest,
        cfg.publish,
        cfg.control,
    )
    print(
        json.dumps(
            {
                "ingest": cfg.ingest,
                "publish": cfg.publish,
                "control": cfg.control,
                "out": str(cfg.out) if cfg.out else None,
                "curve": cfg.wants_curve(),
            }
        ),
        flush=True,
    )
    print(_what_it_does(cfg), file=sys.stderr, flush=True)
    summary = run_daemon(cfg, progress=args.progress)
    _print_summary(summary)
    return 0


def _what_it_does(cfg: Any) -> str:
    """One line on what this daemon will do, so a bare ``livescope daemon`` is not a silent mystery."""
    if cfg.source == "sim":
        source = "the built-in simulated microscope" + (
            f" for {cfg.frames} time points" if cfg.frames else " until Ctrl-C (--frames N to stop on its own)"
        )
    elif cfg.source == "zmq":
        source = f"frames from publishers connecting to {cfg.ingest} until Ctrl-C or `livescope stop`"
    else:
        source = f"frames from {cfg.source}"
    engines = f"engines {', '.join(cfg.engines)}" if cfg.engines else "no engines (--engines, see `livescope engines`)"
    saving = f"saving to {cfg.out}" if cfg.out else "not saving (--out PATH to save)"
    return f"livescope daemon: {source}; {engines}; {saving}; previews on {cfg.publish or 'nothing'}"


def cmd_view(args: argparse.Namespace) -> int:
    from ..ui.viewer import run_viewer

    return run_viewer(
        args.connect,
        args.control,
        screenshot=args.screenshot,
        seconds=args.seconds,
        settings_path=args.settings,
        curve=_client_curve(args),
    )


def cmd_process(args: argparse.Namespace) -> int:
    from .process import process_file

    engines = _engines(args.engines) or []
    result = process_file(
        args.input,
        args.out,
        engines,
        _engine_params(args),
        overwrite=args.overwrite,
        save_raw=not args.no_raw,
        frames=args.frames,
        workers=args.workers,
        scheduler=args.scheduler,
        chunk_t=args.chunk_t,
        tile=args.tile,
        resume=args.resume,
        memory_limit=None if args.memory_limit is None else f"{args.memory_limit:g}MB",
        processes=not args.threads,
        sampling={"pixel_size_um": args.pixel_size, "z_step_um": args.z_step, "interval_s": args.interval},
        axes=args.axes,
    )
    print(json.dumps(result, indent=1))
    return 0


def _control_request(
    address: str, cmd: str, timeout_s: float = 3.0, indent: int | None = None, curve: Any = None
) -> int:
    """One control command, its JSON reply printed; a daemon that does not answer says how to fix it."""
    from .control import ControlClient, ControlTimeout

    client = ControlClient(address, timeout_s=timeout_s, curve=curve)
    try:
        print(json.dumps(client.request(cmd), indent=indent))
    except ControlTimeout as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return _control_request(args.control, "status", args.timeout, indent=1, curve=_client_curve(args))


def cmd_stop(args: argparse.Namespace) -> int:
    return _control_request(args.control, "stop", curve=_client_curve(args))


def cmd_keys(args: argparse.Namespace) -> int:
    from ..bridges import auth

    if args.keys_command == "init":
        made = auth.init_keys(args.dir, overwrite=args.force)
        print(
            f"CURVE keys in {made['folder']} (folder and secret keys readable only by you):\n"
            f"  server: {made['server_secret'].name} (secret, stays here), {made['server_public'].name} (public)\n"
            f"  client: {made['client_secret'].name} + {made['client_public'].name}, allowed in {made['allowed']}\n"
            "A client on another machine needs client.key_secret and server.key in its own keys folder "
            "(--curve-dir). Allow more clients with `livescope keys allow CLIENT.key`. Then run "
            "`livescope daemon --curve` (or bind a non-loopback address)."
        )
    elif args.keys_command == "client":
        public, secret = auth.make_client_keys(args.dir, overwrite=args.force)
        print(
            f"client keys: {secret} (secret, stays on this machine) and {public}. Copy {public.name} to the "
            "daemon's PC and run `livescope keys allow client.key --name NAME` there; copy the daemon's "
            f"server.key into {public.parent}."
        )
    else:
        dest = auth.allow_client(args.public_key, args.dir, name=args.name)
        print(f"allowed: {dest} (running daemons pick it up at the client's next connection)")
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from ..engines import available_engines, engine_factory
    from ..engines.base import EngineError

    names = available_engines()
    if args.name is not None and args.name not in names:
        print(f"livescope engines: no engine {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    for name in [args.name] if args.name else names:
        try:
            cls = engine_factory(name)
        except EngineError as exc:
            print(f"{name}: not available here ({exc})\n")
            continue
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        scalars = set(getattr(cls, "scalar_outputs", ()))
        outputs = [o for o in getattr(cls, "outputs", ()) if o not in scalars]
        print(
            f"  images: {', '.join(outputs) or '-'}"
            + (f"; per-frame numbers: {', '.join(sorted(scalars))}" if scalars else "")
        )
        for pname, param in (getattr(cls, "parameters", None) or {}).items():
            default = "" if param.default is None else f" = {param.default!r}"
            print(f"  --param {name}.{pname}{default}" + (f"  {param.doc}" if param.doc else ""))
        print()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from ..bridges.movies import open_movie
    from ..engines.modelzoo_export import export_bioimageio

    src = open_movie(args.sample)
    frame = src.read(0, 1, 0, 0, (0, src.sizes["y"]), (0, src.sizes["x"]), 0)
    frame = np.asarray(frame).reshape(-1, src.sizes["y"], src.sizes["x"])[0]
    out = export_bioimageio(
        args.model, args.out, sample=frame, name=args.name, zip_package=str(args.out).endswith(".zip")
    )
    print(f"BioImage Model Zoo package written: {out} (use it with --param denoise.model={out})")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    from .completion import complete_store
    from .config import parse_params

    engines = [e for e in args.engines.split(",") if e] if args.engines else None
    params = parse_params(args.param) if args.param else None
    if params and engines is None:
        print("livescope complete: --param needs --engines (the chain they belong to)", file=sys.stderr)
        return 2
    done = complete_store(
        args.store,
        engines,
        params,
        progress=True,
        workers=args.workers,
        scheduler=args.scheduler,
        processes=not args.threads,
    )
    print(json.dumps({"completed": done}, indent=1))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from ..bridges.store import recover

    print(json.dumps(recover(args.store), indent=1))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    decompose = args.task == "decompose"
    if args.frames is None:
        args.frames = 400 if decompose else 32
    if args.steps is None:
        args.steps = 1000 if decompose else 400
    if args.live and decompose:
        print(
            "livescope fit --live --task decompose: the decompose engine fits on the live stream by "
            "itself; run the daemon with --param decompose.method=learned (docs/decomposition.md)",
            file=sys.stderr,
        )
        return 2
    if args.live:
        return _fit_live(args)
    if not args.input or not args.out:
        print("livescope fit: give INPUT and --out MODEL.lsmodel (or --live)", file=sys.stderr)
        return 2
    if decompose:
        return _fit_decompose(args)
    if args.task in ("deconvolve", "restore"):
        return _fit_deconvolution(args)
    import numpy as np

    from ..engines import fit as fitting
    from ..engines import modelfile
    from .sources import read_movie

    arr = _fit_frames(args)
    clean = None
    if args.clean:
        cdata, _, _ = read_movie(args.clean)
        clean = [np.asarray(c, dtype=np.float32) for c in cdata]
    base = modelfile.load(args.from_model) if args.from_model or args.past_frames == 0 else None
    result = fitting.fit(
        arr.astype(np.float32),
        model=base,
        past_frames=args.past_frames,
        steps=args.steps,
        time_budget_s=args.seconds,
        clean=clean,
        description=f"livescope fit {args.input}",
    )
    out = result.model.save(args.out)
    losses = result.losses
    curve = Path(str(out) + ".loss.csv")
    curve.write_text("step,loss\n" + "".join(f"{i},{v:.6g}\n" for i, v in enumerate(losses)))
    print(
        f"model written to {out} ({len(losses)} steps in {result.seconds:.0f} s; loss "
        f"{losses[0]:.4g} -> {min(losses[-20:]):.4g}; curve in {curve})"
    )
    return 0


def _fit_frames(args: argparse.Namespace) -> Any:
    """The first ``--frames`` time points of INPUT as (t, y, x): the first channel and plane of a
    (t, c, z, y, x) movie."""
    import numpy as np

    from .sources import read_movie

    data, axes, _ = read_movie(args.input)
    arr = np.asarray(data[: args.frames])
    if len([a for a in axes if a not in ("y", "x")]) > 1:
        arr = arr.reshape(arr.shape[0], -1, *arr.shape[-2:])[:, 0]
    return arr


def _fit_decompose(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ..engines.multilag import fit_multilag

    arr = _fit_frames(args)
    lags = [int(v) for v in str(args.lags).split(",") if v.strip()]
    with tqdm(total=args.steps, desc="fitting the multi-lag predictors", unit="step") as bar:

        def progress(step: int, steps: int, loss: float) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4g}", refresh=True)

        model = fit_multilag(
            arr.astype(np.float32),
            lags=lags,
            steps=args.steps,
            time_budget_s=args.seconds,
            progress=progress,
            metadata={"description": f"livescope fit --task decompose {args.input}"},
        )
    out = model.save(args.out)
    t = model.metadata["training"]
    loss = "n/a" if t.get("final_loss") is None else f"{t['final_loss']:.4g}"
    print(
        f"model written to {out} ({t['steps']} steps in {t['seconds']:.0f} s, lags {lags}, loss "
        f"{loss}); use it with --param decompose.method=learned "
        f"--param decompose.model={out}"
    )
    return 0


def _fit_deconvolution(args: argparse.Namespace) -> int:
    """A network taught by the classical engine (WB-RL) with the given PSF, fitted on the movie's
    planes; z-stacks give one time-lapse per plane (the network is 2-D, applied plane by plane)."""
    import numpy as np
    from tqdm import tqdm

    from ..engines import modelfile
    from ..engines.netdeconv import fit_deconvolution, psf_from_options
    from .sources import read_movie

    data, axes, info = read_movie(args.input)
    arr = np.asarray(data[: args.frames], dtype=np.float32)
    if "c" in axes:  # the first channel
        arr = np.take(arr, 0, axis=axes.index("c"))
    arr = arr.reshape(arr.shape[0], -1, *arr.shape[-2:])  # (t, planes, y, x)
    stacks = [arr[:, z] for z in range(arr.shape[1])]  # one time-lapse per plane
    psf, what = psf_from_options(
        arr.shape[-2:],
        psf=args.psf,
        psf_sigma=args.psf_sigma,
        psf_sigma_corner=args.psf_sigma_corner,
        regions=args.psf_regions,
        na=args.na,
        wavelength_nm=args.wavelength,
        refractive_index=args.ri,
        pixel_size_um=args.pixel_size or info.get("pixel_size_um"),
    )
    teacher: dict[str, Any] = {"method": args.teacher}
    if args.teacher_iterations is not None:
        teacher["iterations"] = args.teacher_iterations
    elif args.teacher == "rl":
        teacher["iterations"] = 3  # early-stopped RL measured best at low photon counts (docs)
    base = modelfile.load(args.from_model) if args.from_model else None
    with tqdm(total=args.steps, desc=f"fitting ({args.task}, teacher {args.teacher})", unit="step") as bar:

        def progress(step: int, loss: float) -> None:
            bar.n = step + 1
            bar.set_postfix(loss=f"{loss:.4g}", refresh=step % 10 == 0)

        result = fit_deconvolution(
            stacks if len(stacks) > 1 else stacks[0],
            psf=psf,
            teacher_params=teacher,
            task=args.task,
            steps=args.steps,
            time_budget_s=args.seconds,
            model=base,
            restore_window=args.restore_window,
            callback=progress,
            description=f"livescope fit --task {args.task} {args.input}; PSF: {what}",
        )
    out = result.model.save(args.out)
    losses = result.losses
    curve = Path(str(out) + ".loss.csv")
    curve.write_text("step,loss\n" + "".join(f"{i},{v:.6g}\n" for i, v in enumerate(losses)))
    use = (
        f"--engines restore --param restore.model={out}"
        if args.task == "restore"
        else f"--param deconvolve.method=net --param deconvolve.model={out}"
    )
    print(
        f"model written to {out} ({len(losses)} steps in {result.seconds:.0f} s; loss {losses[0]:.4g} -> "
        f"{min(losses[-20:]):.4g}; PSF: {what}; consistency threshold "
        f"{result.model.metadata['consistency']['threshold']:.3g}; curve in {curve}); use it with {use}"
    )
    return 0


def _fit_live(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .control import ControlClient

    client = ControlClient(args.control, timeout_s=5.0, curve=_client_curve(args))
    try:
        engine = args.engine or args.task
        reply = client.request(
            "fit", engine=engine, task=args.task, frames=args.frames, steps=args.steps, seconds=args.seconds
        )
        if not reply.get("ok"):
            print(f"livescope fit --live: {reply.get('error')}", file=sys.stderr)
            return 2
        bar = tqdm(total=args.steps, desc="fitting on the live stream", unit="step")
        while True:
            fit = client.status().get("fit") or {}
            bar.n = fit.get("step", 0)
            losses = fit.get("loss_curve") or []
            bar.set_postfix(
                state=fit.get("state"),
                collected=fit.get("collected"),
                loss=f"{losses[-1]:.4g}" if losses else "-",
                refresh=False,
            )
            bar.refresh()
            if fit.get("state") in ("done", "failed"):
                break
            time.sleep(0.5)
        bar.close()
        if fit["state"] == "failed":
            print(f"fitting failed: {fit.get('error')}", file=sys.stderr)
            return 1
        print(f"new model {fit['model']} is running (loss {losses[0]:.4g} -> {losses[-1]:.4g})")
        return 0
    finally:
        client.close()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..engines.calibrate import calibrate_file

    result = calibrate_file(args.input, dark=args.dark)
    text = json.dumps(result, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    if args.out:
        Path(args.out).write_text(text)
        print(f"calibration written to {args.out}")
    print(text if len(text) < 4000 else text[:4000] + "\n...")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from ..engines.inference import compile_model

    path = compile_model(args.model, tuple(args.shape))
    print(f"TensorRT engine cached at {path}")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "daemon": cmd_daemon,
    "view": cmd_view,
    "process": cmd_process,
    "status": cmd_status,
    "stop": cmd_stop,
    "recover": cmd_recover,
    "complete": cmd_complete,
    "export": cmd_export,
    "engines": cmd_engines,
    "fit": cmd_fit,
    "compile": cmd_compile,
    "calibrate": cmd_calibrate,
    "keys": cmd_keys,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose - args.quiet)
    try:
        from .config import normalize_address

        for attr in ("control", "connect"):  # the client commands' addresses (the daemon's: in its config)
            value = getattr(args, attr, None)
            if isinstance(value, str) and value and args.command != "daemon":
                setattr(args, attr, normalize_address(value, f"--{attr}"))
        return COMMANDS[args.command](args)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        if args.verbose:
            raise
        print(f"livescope {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
