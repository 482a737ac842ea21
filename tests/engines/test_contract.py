"""The engine contract, run over every engine available here.

One set of checks applied to each concrete engine, as python-microscope's testsuite does for each
device: the members the daemon reads, the parameter table (every parameter changes live; a bad
value is refused and the old one kept), the one ``describe()`` shape, the outputs ``process``
returns, and the capabilities an engine declares (state handed between time chunks, PSF, network,
model swap). Small synthetic streams: 32x32 planes, 4x32x32 stacks for engines asked for volumes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livescope.engines import available_engines, create_engine, engine_factory
from livescope.engines.base import (
    EVENTS,
    Applies,
    CarriesState,
    Chunkable,
    Closable,
    Configurable,
    Engine,
    EngineError,
    FrameInfo,
    HasKernel,
    Reach,
    ReportsMemory,
    Routed,
    RunsNetwork,
    StreamSpec,
    SwapsModel,
)
from livescope.engines.calibrate import NoiseModel
from livescope.engines.psf import gaussian_psf

OFFSET = 100.0
CAMERA = NoiseModel.from_camera(1.0, OFFSET, 2.0)  # the stream's calibration (what --calibration hands on)


@dataclasses.dataclass(frozen=True)
class Case:
    engine: str
    volume: bool = False

    def __str__(self) -> str:
        return self.engine + ("-volume" if self.volume else "")


def _ours(name: str) -> bool:
    """livescope's own engines (other test modules register fakes in the same registry)."""
    try:
        return engine_factory(name).__module__.startswith("livescope.engines.")
    except EngineError:  # listed, but its module or a dependency does not import here
        return True


NAMES = [n for n in available_engines() if _ours(n)]
VOLUME = ("deconvolve", "register", "restore")  # engines that take stacks when asked (volume=True)
CASES = [Case(n) for n in NAMES] + [Case(n, True) for n in VOLUME if n in NAMES]

# What each engine declares beyond the defaults: losing one is a break of the contract.
CAPABILITIES = {
    "passthrough": set(),
    "deconvolve": {HasKernel, SwapsModel, CarriesState},
    "denoise": {SwapsModel, CarriesState, RunsNetwork},
    "decompose": {SwapsModel, ReportsMemory},
    "register": set(),
    "trust": set(),
    "restore": {SwapsModel},
}
OPTIONAL = (HasKernel, SwapsModel, CarriesState, RunsNetwork, ReportsMemory)


# --------------------------------------------------------------------------- the stream


def spec(case: Case) -> StreamSpec:
    return StreamSpec(
        shape=(4, 32, 32) if case.volume else (32, 32),
        dtype="uint16",
        bits=16,
        pixel_size_um=0.1,
        z_step_um=0.3 if case.volume else None,
        interval_s=1.0,
        extra={"calibration": CAMERA.as_dict()},
    )


def movie(case: Case, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Two blobs and a ramp drifting by half a pixel per frame, Poisson photons over the offset."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32].astype(np.float64)
    frames = []
    for t in range(n):
        dy = 0.5 * t
        plane = (
            5
            + 150 * np.exp(-((yy - 12 - dy) ** 2 + (xx - 18) ** 2) / 30)
            + 80 * np.exp(-((yy - 24 - dy) ** 2 + (xx - 8) ** 2) / 12)
            + 2 * xx
        )
        photons = np.stack([plane * w for w in (0.5, 1.0, 0.8, 0.4)]) if case.volume else plane
        frames.append((rng.poisson(photons) + OFFSET).astype(np.uint16))
    return frames


def info(t: int) -> FrameInfo:
    return FrameInfo(seq=t, timestamp=float(t), index={"p": 0, "c": 0, "z": 0, "t": t})


@pytest.fixture(scope="module")
def restore_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped default network, labelled as a restore model with a Gaussian PSF: no
    deconvolution model is shipped, and the contract checks the plumbing, not the quality."""
    from livescope.engines import modelfile
    from livescope.engines.netdeconv import PSFField

    base = modelfile.load(None)
    meta = copy.deepcopy(base.metadata)
    meta.pop("training_features", None)
    meta.update(task="restore", psf=PSFField.of(gaussian_psf(1.5)).as_metadata(), field_shape=[32, 32], residual=False)
    return modelfile.ModelFile(meta, base.onnx, dict(base.weights)).save(
        tmp_path_factory.mktemp("models") / "restore.lsmodel"
    )


def params_for(case: Case, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The defaults, except what has none (restore's model) and ``volume`` for stack cases."""
    params: dict[str, Any] = {"volume": True} if case.volume else {}
    if case.engine == "restore":
        params["model"] = str(request.getfixturevalue("restore_model"))
    return params


def open_engine(case: Case, request: pytest.FixtureRequest) -> Any:
    try:
        eng = create_engine(case.engine, **params_for(case, request))
    except EngineError as exc:
        if "not available" in str(exc):
            pytest.skip(str(exc))
        raise
    eng.setup(spec(case))
    request.addfinalizer(eng.close)
    return eng


def _carries_state(case: Case) -> bool:
    try:
        return issubclass(engine_factory(case.engine), CarriesState)
    except EngineError:
        return False


cases = pytest.mark.parametrize("case", CASES, ids=str)
stateful_cases = pytest.mark.parametrize("case", [c for c in CASES if _carries_state(c)], ids=str)


# --------------------------------------------------------------------------- members


@cases
def test_declares_the_members_the_daemon_reads(case: Case, request: pytest.FixtureRequest) -> None:
    eng = open_engine(case, request)
    for proto in (Engine, Routed, Configurable, Chunkable, Closable):
        assert isinstance(eng, proto), f"{case}: not {proto.__name__}"
    assert eng.name == case.engine
    outputs = tuple(eng.outputs)
    assert outputs and all(isinstance(o, str) for o in outputs) and len(set(outputs)) == len(outputs)
    assert set(eng.scalar_outputs) <= set(outputs)
    assert eng.passes is None or eng.passes in outputs
    assert eng.needs_volume is case.volume
    assert isinstance(eng.window, int) and eng.window >= 0
    reach = eng.reach()
    assert isinstance(reach, Reach) and reach.multiple >= 1
    assert reach.halo is None or reach.halo >= 0
    assert reach.warmup is None or reach.warmup >= eng.window  # a chunk warms up over the window
    have = {p for p in OPTIONAL if isinstance(eng, p)}
    if case.engine in CAPABILITIES:
        assert have == CAPABILITIES[case.engine], f"{case}: declares {sorted(p.__name__ for p in have)}"
    if SwapsModel in have:
        assert "model" in eng.parameters


@cases
def test_parameter_table_is_the_constructor(case: Case, request: pytest.FixtureRequest) -> None:
    """``create_engine(name, **params)`` and the table agree: same names, same defaults."""
    eng = open_engine(case, request)
    sig = inspect.signature(engine_factory(case.engine)).parameters
    keywords = [n for n, p in sig.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    assert list(eng.parameters) == keywords
    for name, p in eng.parameters.items():
        assert p.default == sig[name].default, name
        assert isinstance(p.applies, Applies) and callable(p.convert)
        if p.setter:
            assert callable(getattr(eng, p.setter)), name


# --------------------------------------------------------------------------- parameters

NO_BAD = "no bad value"  # the parameter takes any text (checked where it is used)
BAD = "not-a-number!"
# (engine, parameter) -> (good, bad) where the rule of ``values_for`` does not fit
SPECIAL: dict[tuple[str, str], tuple[Any, Any]] = {
    ("passthrough", "delay_s"): (0.001, BAD),
    ("deconvolve", "psf"): ("gaussian", "no-such-psf.tif"),
    ("deconvolve", "psf_pixel_size_um"): (0.1, BAD),  # the stream's: no 10x resampling
    ("deconvolve", "psf_z_step_um"): (0.3, BAD),
    ("deconvolve", "psf_2d"): ("projection", "sideways"),
    ("deconvolve", "method"): ("rl", "magic"),
    ("deconvolve", "beta"): (0.5, BAD),
    ("deconvolve", "boundary"): ("reflect", "wrap"),
    ("deconvolve", "device"): ("cpu", "tpu"),
    ("deconvolve", "model"): (None, NO_BAD),  # a path, opened when method="net"
    ("denoise", "model"): ("default", "no-such-model.lsmodel"),
    ("denoise", "backend"): ("onnxruntime", "magic"),
    ("denoise", "calibration"): (CAMERA.as_dict(), "no-such-calibration.json"),
    ("decompose", "model"): (None, "no-such-model.lsmodel"),
    ("decompose", "backend"): ("auto", NO_BAD),
    ("decompose", "fit_out"): (None, NO_BAD),
    ("decompose", "method"): ("rolling", "magic"),
    ("register", "reference"): ("rolling", "last"),
    ("register", "whiten"): (0.5, 2.0),
    ("register", "fill"): ("zero", "smear"),
    ("register", "stage_affine"): ([0.1, 0.0, 0.0, 0.0, 0.1, 0.0], "1,2,3"),
    ("trust", "restore"): ("denoise", "deconvolve"),
    ("trust", "calibration"): (CAMERA.as_dict(), "no-such-calibration.json"),
    ("restore", "model"): ("restore_model", "no-such-model.lsmodel"),
    ("restore", "backend"): ("onnxruntime", "magic"),
}


def values_for(case: Case, name: str, current: Any, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """A valid value other than the current one where there is one, and a refused one."""
    good, bad = SPECIAL.get((case.engine, name), (None, None))
    if (case.engine, name) not in SPECIAL:
        if isinstance(current, bool):  # a switch: flip it (not volume: it changes what arrives)
            good, bad = (current if name == "volume" else not current), NO_BAD
        elif isinstance(current, (int, float)):
            good, bad = (current * 2 if current else 1), BAD
        elif current is None:
            good, bad = 1, BAD
        else:
            good, bad = current, BAD
    if good == "gaussian":
        good = gaussian_psf((2.0, 1.5, 1.5), ndim=3) if case.volume else gaussian_psf(1.5)
    elif good == "restore_model":
        good = str(request.getfixturevalue("restore_model"))
    return good, bad


@cases
def test_every_parameter_changes_live_and_a_bad_value_is_refused(case: Case, request: pytest.FixtureRequest) -> None:
    eng = open_engine(case, request)
    frames = movie(case)
    eng.process(frames[0], info(0))
    first = next(iter(eng.parameters))
    with pytest.raises(KeyError, match=first):
        eng.set_param("no_such_parameter", 1)
    for name, p in eng.parameters.items():
        good, bad = values_for(case, name, eng.parameter_values()[name], request)
        if p.applies is Applies.FIXED:  # the same value is no change; another one is refused
            good = eng.parameter_values()[name]
            bad = (not good) if isinstance(good, bool) else bad
        eng.set_param(name, good)
        shown = p.show(p.convert(good)) if p.show else p.convert(good)
        assert eng.parameter_values()[name] == shown, name
        if bad is NO_BAD:
            continue
        before = eng.parameter_values()
        with pytest.raises((EngineError, ValueError, TypeError, OSError)):
            eng.set_param(name, bad)
        assert eng.parameter_values() == before, f"{name}={bad!r} refused but not rolled back"
    out = eng.process(frames[1], info(1))  # still usable, with every parameter changed
    assert set(eng.outputs) - set(eng.scalar_outputs) <= set(out)


# --------------------------------------------------------------------------- describe


def _check_description(eng: Any) -> None:
    d = eng.describe()
    assert d["engine"] == eng.name
    assert list(d["parameters"]) == list(eng.parameters)
    assert d["parameters"] == eng.parameter_values()
    facts = set(d) - {"engine", "parameters"}
    assert not facts & set(eng.parameters), "a parameter is reported outside 'parameters'"
    json.dumps(d, default=str)  # the daemon stores it in the provenance as JSON


@cases
def test_describe_has_the_one_shape(case: Case, request: pytest.FixtureRequest) -> None:
    eng = open_engine(case, request)
    _check_description(eng)
    eng.process(movie(case)[0], info(0))
    _check_description(eng)


# --------------------------------------------------------------------------- process


@cases
def test_process_returns_the_declared_outputs(case: Case, request: pytest.FixtureRequest) -> None:
    eng = open_engine(case, request)
    frames = movie(case)
    images = set(eng.outputs) - set(eng.scalar_outputs)
    for t, frame in enumerate(frames):
        out = eng.process(frame, info(t))
        for key in images:
            a = np.asarray(out[key])
            assert a.shape == frame.shape, (key, a.shape)
            assert a.dtype in (np.float32, frame.dtype), (key, a.dtype)
        if eng.passes is not None:
            assert eng.passes in out
        for key, value in out.items():
            if key == EVENTS:
                assert isinstance(value, list)
                for ev in value:
                    assert isinstance(ev, dict) and isinstance(ev["kind"], str)
                    json.dumps(ev, default=float)
            elif key not in images:  # a declared scalar, or an extra number (consistency_threshold)
                assert np.ndim(value) == 0, key
                v = float(value)
                assert math.isfinite(v) or (key in eng.scalar_outputs and math.isnan(v)), (key, v)
                assert key in eng.outputs or key not in eng.scalar_outputs


# --------------------------------------------------------------------------- capabilities


@stateful_cases
def test_state_handed_to_a_later_chunk_round_trips(case: Case, request: pytest.FixtureRequest) -> None:
    first = open_engine(case, request)
    frames = movie(case)
    first.process(frames[0], info(0))
    state = first.export_state()
    assert state, "the first frame fixed nothing to hand on"
    carried = json.loads(json.dumps(state))  # plain JSON values: it travels in the job file
    later, fresh = open_engine(case, request), open_engine(case, request)
    later.import_state(carried)
    assert later.export_state() == state
    images = sorted(set(first.outputs) - set(first.scalar_outputs))
    a, b, c = (e.process(frames[1], info(1)) for e in (first, later, fresh))
    for key in images:
        np.testing.assert_array_equal(b[key], a[key])  # as if it had seen the stream's first frame
    assert any(not np.array_equal(c[k], a[k]) for k in images), "the state makes no difference"


@cases
def test_declared_capabilities_work(case: Case, request: pytest.FixtureRequest) -> None:
    eng = open_engine(case, request)
    frame = movie(case)[0]
    eng.process(frame, info(0))
    if isinstance(eng, HasKernel):
        kernel = np.asarray(eng.kernel)
        assert kernel.ndim == frame.ndim and kernel.sum() == pytest.approx(1.0, rel=1e-3)
        offset = eng.camera_offset(frame)  # estimated on the first frame: the dark background's level
        assert OFFSET <= offset <= OFFSET + 10 and offset == eng.describe()["offset_used"]
    if isinstance(eng, RunsNetwork):
        assert eng.model_file is not None and eng.normalisation is not None
        before = eng.normalisation
        assert np.asarray(eng.predict(frame)).shape == frame.shape
        assert eng.normalisation is before  # stateless
    if isinstance(eng, ReportsMemory):
        assert eng.state_nbytes() > 0
    if isinstance(eng, SwapsModel):
        before = eng.describe()["parameters"]
        with pytest.raises((EngineError, OSError)):
            eng.swap_model("no-such-model.lsmodel")
        assert eng.describe()["parameters"] == before
        eng.process(frame, info(1))
