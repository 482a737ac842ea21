"""The control socket's commands, as a table: one handler per command, each taking the running
pipeline and the request (already decoded and size-checked by :mod:`.control`) and returning the
reply. ``COMMANDS`` is the whole list; an unknown command names the known ones.

Every path a command takes (``swap_model``, a file parameter of ``set``) must lie inside the
output folder (:func:`confined`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engines import EngineError, engine_parameters
from .config import PATH_PARAMS

__all__ = ["COMMANDS", "confined", "handle"]

Reply = dict[str, Any]
# the pipeline (daemon/pipeline.py) is passed in; typed loosely so this table imports nothing of it
Handler = Callable[[Any, dict[str, Any]], Reply]


def _status(pipeline: Any, request: dict[str, Any]) -> Reply:
    return {"ok": True, **pipeline.status()}


def _stop(pipeline: Any, request: dict[str, Any]) -> Reply:
    pipeline.request_stop()
    return {"ok": True}


def _events(pipeline: Any, request: dict[str, Any]) -> Reply:
    after = request.get("after", 0)
    if not isinstance(after, int) or isinstance(after, bool):
        return {"ok": False, "error": "events needs an integer 'after' (the last id handled)"}
    limit = request.get("limit", 500)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
        return {"ok": False, "error": "events: 'limit' must be an integer from 1 to 10000"}
    return {"ok": True, "events": pipeline.events_after(after, limit), "last": pipeline.event_log.last_id}


def _emit(pipeline: Any, request: dict[str, Any]) -> Reply:
    """An external producer of events (a trust check, a user click in the viewer)."""
    ev = request.get("event")
    if not isinstance(ev, dict) or not all(isinstance(k, str) for k in ev):
        return {"ok": False, "error": "emit needs an 'event' object (string keys)"}
    if len(json.dumps(ev, default=str)) > 4096:  # the daemon keeps 10,000 events: each stays small
        return {"ok": False, "error": "emit: the event is over 4 kB as JSON; send a smaller one"}
    return {"ok": True, "event": pipeline.add_event(ev)}


def _fit(pipeline: Any, request: dict[str, Any]) -> Reply:
    name = request.get("engine", "denoise")
    if not isinstance(name, str):
        return {"ok": False, "error": "fit needs a string 'engine'"}
    state = pipeline.engine_states.get(name)
    if state is None or not state.enabled:
        return {"ok": False, "error": f"engine {name!r} is not running in this daemon"}
    job = pipeline.fit_job
    if job is not None and job.state in ("collecting", "fitting"):
        return {"ok": False, "error": "a fit is already running; see status.fit"}
    # the task follows the engine; "restore" on the deconvolve engine (or the reverse) is allowed
    tasks = {"denoise": ("denoise",), "deconvolve": ("deconvolve", "restore"), "restore": ("restore", "deconvolve")}
    if name not in tasks:
        return {"ok": False, "error": f"engine {name!r} cannot be fitted live; these can: {', '.join(tasks)}"}
    task = request.get("task") or tasks[name][0]
    if task not in tasks[name]:
        return {
            "ok": False,
            "error": f"engine {name!r} cannot run a model fitted for {task!r}; it takes: {', '.join(tasks[name])}",
        }
    if name == "deconvolve" and state.params.get("method", "wb") not in ("wb", "rl", "net"):
        return {"ok": False, "error": "deconvolve runs an unknown method"}
    frames, steps, seconds = request.get("frames", 32), request.get("steps", 200), request.get("seconds", 120.0)

    def number(v: Any, kind: tuple[type, ...]) -> bool:
        return isinstance(v, kind) and not isinstance(v, bool)

    if not (
        number(frames, (int,))
        and number(steps, (int,))
        and number(seconds, (int, float))
        and 2 <= frames <= 1000
        and 1 <= steps <= 100000
        and 0 < seconds <= 36000
    ):
        return {
            "ok": False,
            "error": "fit needs integers 2 <= frames <= 1000, 1 <= steps <= 100000 and a number 0 < seconds <= 36000",
        }
    return {"ok": True, "fit": pipeline.start_fit(name, frames, steps, seconds, str(task)).status()}


def _engine_command(pipeline: Any, request: dict[str, Any]) -> Reply:
    """enable, disable, set and swap_model: one engine, in every running chain, between frames."""
    cmd = request["cmd"]
    name = request.get("engine")
    if not isinstance(name, str):
        return {"ok": False, "error": f"{cmd} needs a string 'engine'"}
    state = pipeline.engine_states.get(name)
    if state is None:
        return {"ok": False, "error": f"no engine {name!r} in this daemon; it runs: {list(pipeline.engine_states)}"}
    with pipeline.between_frames():
        running = pipeline.running_engines(name)
        if cmd in ("enable", "disable"):
            pipeline.record_change(
                {"engine": name, "cmd": cmd},
                apply_chain=lambda chain, on=cmd == "enable": chain.set_enabled(
                    name, on, "disabled by a control command"
                ),
            )
            if cmd == "enable":
                state.enabled, state.reason, state.failures_in_row = True, "", 0
            else:
                state.enabled, state.reason = False, "disabled by a control command"
        elif cmd == "set":
            param, value = request.get("param"), request.get("value")
            if not isinstance(param, str):
                return {"ok": False, "error": "set needs a string 'param'"}
            try:
                accepted = engine_parameters(name)
            except EngineError:  # an engine that did not load: nothing to set
                return {"ok": False, "error": f"engine {name} is not available: {state.reason}"}
            if accepted is not None and param not in accepted:
                return {
                    "ok": False,
                    "error": f"engine {name} has no parameter {param!r}; it takes: {', '.join(accepted)}",
                }
            # a file parameter takes a path in the output folder; inline data (a PSF array, a
            # calibration object) names no file
            if param in PATH_PARAMS and (param, type(value)) not in (("psf", list), ("calibration", dict)):
                value = confined(pipeline.cfg.out, value)
            for eng in running:
                setter = getattr(eng, "set_param", None)
                if setter is None:
                    return {"ok": False, "error": f"engine {name} has no settable parameters"}
                setter(param, value)
            pipeline.record_change(
                {"engine": name, "cmd": "set", "param": param, "value": value, "previous": state.params.get(param)},
                lambda eng, param=param, value=value: eng.set_param(param, value),
            )
            state.params[param] = value
        else:
            path = confined(pipeline.cfg.out, request.get("path"))
            for eng in running:
                swap = getattr(eng, "swap_model", None)
                if swap is None:
                    return {"ok": False, "error": f"engine {name} has no model to swap"}
                swap(path)
            pipeline.record_change(
                {"engine": name, "cmd": "swap_model", "path": path, "previous": state.params.get("model")},
                lambda eng, path=path: eng.swap_model(path),
            )
            state.params["model"] = path
    pipeline.record_engine_params()
    return {"ok": True, "engine": name, "enabled": state.enabled}


COMMANDS: dict[str, Handler] = {
    "status": _status,
    "stop": _stop,
    "set": _engine_command,
    "enable": _engine_command,
    "disable": _engine_command,
    "swap_model": _engine_command,
    "events": _events,
    "emit": _emit,
    "fit": _fit,
}


def handle(pipeline: Any, request: dict[str, Any]) -> Reply:
    handler = COMMANDS.get(request["cmd"])
    if handler is None:
        return {"ok": False, "error": f"unknown command {request['cmd']!r}; try {', '.join(COMMANDS)}"}
    return handler(pipeline, request)


def confined(out: Any, path: Any) -> str | None:
    """A path from the control socket, which must lie inside the output folder ``out``, or name
    the default (None). A refused path is refused before anything outside is looked at, so the
    reply says nothing about files there."""
    if path is None or path in ("", "default", "none", "None"):
        return None
    if not isinstance(path, str) or "\0" in path:
        raise PermissionError("a path from the control socket must be a string naming a file in the output folder")
    if out is None:
        raise PermissionError("this daemon has no --out folder: paths from the control socket are refused")

    def inside(root: str, target: str) -> bool:
        try:
            return os.path.commonpath([root, target]) == root
        except ValueError:  # another drive (Windows)
            return False

    root = os.path.abspath(out)
    # first by name alone: an outside path (e.g. a network share) is never touched
    if not inside(root, os.path.normpath(os.path.join(root, path))):
        raise PermissionError(f"{path!r} is outside the output folder {root}; copy the file there first")
    real_root = str(Path(root).resolve())
    target = str((Path(real_root) / path).resolve())
    if not inside(real_root, target):  # a link inside that leads outside
        raise PermissionError(f"{path!r} is outside the output folder {root}; copy the file there first")
    return target
