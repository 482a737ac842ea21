"""BioImage Model Zoo packages in livescope (engines/modelzoo.py, engines/modelzoo_export.py):
a real CAREamics export reproduces CAREamics' own prediction, livescope's shipped model
round-trips through a package, the processing steps compute what the spec says, on 0.4 and 0.5
packages, in any axis order, with padding to the sizes a model takes."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bioimageio.spec", reason='bioimageio.spec is not installed: pip install "livescope[bioimageio]"')
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
yaml = pytest.importorskip("yaml")

from livescope.engines import EngineError, FrameInfo, StreamSpec, create_engine, modelfile, modelzoo  # noqa: E402
from tests.conftest import REAL_DATA  # noqa: E402

CAREAMICS = Path(__file__).resolve().parents[1] / "data" / "bmz_careamics_n2v"
CAREAMICS_ZIP = CAREAMICS / "careamics_n2v.bioimageio.zip"


def _engine(model, shape, backend="onnxruntime", **kw):
    eng = create_engine("denoise", model=str(model), backend=backend, **kw)
    eng.setup(StreamSpec(shape=tuple(shape), dtype="float32", bits=16))
    return eng


def _run(eng, frames):
    return [eng.process(f, FrameInfo(seq=i))["denoised"] for i, f in enumerate(frames)]


# ------------------------------------------------------------------------------ a real CAREamics export


def test_a_careamics_export_reproduces_careamics_own_prediction():
    """CAREamics 0.3.5 fitted N2V and exported it with ``export_to_bmz`` (its state dict), and
    bioimageio.core added TorchScript and ONNX weights (bench/bench_bioimageio.py
    --make-test-package); livescope runs the zip with both and gives CAREamist.predict's numbers."""
    crop = np.load(CAREAMICS / "input_crop.npy")
    expected = np.load(CAREAMICS / "careamics_prediction.npy")
    model = modelzoo.load(CAREAMICS_ZIP)
    assert model.formats == ["onnx", "torchscript", "pytorch_state_dict"]
    assert "fixed_zero_mean_unit_variance" in [op.name for op in model.preprocessing + model.postprocessing]
    assert model.architecture and model.architecture["import_from"] == "careamics.models.unet"
    scale = float(np.ptp(expected))
    for backend in ("onnxruntime", "torch"):
        eng = _engine(CAREAMICS_ZIP, crop.shape, backend=backend, tile=0)
        (out,) = _run(eng, [crop])
        assert eng.describe()["backend_running"] == backend
        np.testing.assert_allclose(out, expected, atol=2e-5 * scale, rtol=0)
    described = eng.describe()["model_package"]
    assert described["format"] == "bioimageio" and described["name"] == "livescope-test-n2v-migration"
    assert described["hash"] == model.hash and len(model.hash) == 16


def test_the_package_test_tensors_match_as_the_model_zoo_checks_them(tmp_path):
    """The package's own test input gives its test output (what bioimageio.core's test checks),
    from the zip, the unpacked folder and its rdf.yaml alike."""
    with zipfile.ZipFile(CAREAMICS_ZIP) as zf:
        zf.extractall(tmp_path / "unpacked")
    rdf = yaml.safe_load((tmp_path / "unpacked" / "rdf.yaml").read_text())
    test_in = np.load(tmp_path / "unpacked" / rdf["inputs"][0]["test_tensor"]["source"])
    test_out = np.load(tmp_path / "unpacked" / rdf["outputs"][0]["test_tensor"]["source"])
    for source in (CAREAMICS_ZIP, tmp_path / "unpacked", tmp_path / "unpacked" / "rdf.yaml"):
        assert modelzoo.is_package(source)
        model = modelzoo.load(source)
        runner = modelzoo.make_runner(model, "onnxruntime")
        out = model.predict(np.squeeze(test_in), runner.run)
        np.testing.assert_allclose(out, np.squeeze(test_out), atol=1e-4 * float(np.ptp(test_out)), rtol=0)


# ------------------------------------------------------------------------------ livescope's own export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    import tifffile

    from livescope.engines.modelzoo_export import export_bioimageio

    movie = tifffile.imread(REAL_DATA / "cancer_cell_migration_crop.tif")[5:8]
    out = tmp_path_factory.mktemp("export") / "shipped"
    return export_bioimageio(None, out, sample=movie[0]), movie


def test_the_shipped_model_round_trips_through_a_package(exported):
    """Exported with the normalisation its first frame fixes, the package gives what the denoise
    engine gives on that stream: onnxruntime to the last bit here, torch to float rounding."""
    rdf, movie = exported
    native = _run(_engine("default", movie.shape[1:], tile=0), movie)
    for backend, tol in (("onnxruntime", 1e-6), ("torch", 2e-6)):
        got = _run(_engine(rdf, movie.shape[1:], backend=backend, tile=0), movie)
        for a, b in zip(got, native, strict=True):
            np.testing.assert_allclose(a, b, atol=tol * float(np.ptp(b)), rtol=0)
    # tiled the same way on both sides: the same again
    native = _run(_engine("default", movie.shape[1:], tile=64, overlap=32), movie[:1])
    got = _run(_engine(rdf, movie.shape[1:], tile=64, overlap=32), movie[:1])
    np.testing.assert_allclose(got[0], native[0], atol=1e-6 * float(np.ptp(native[0])), rtol=0)


def test_the_export_validates_with_bioimageio_spec_and_keeps_livescopes_constants(exported):
    from bioimageio.spec import load_description

    rdf, _ = exported
    descr = load_description(str(rdf), perform_io_checks=True)  # hashes of every file checked too
    assert type(descr).__name__ == "ModelDescr", getattr(descr, "validation_summary", descr)
    assert descr.weights.onnx is not None and descr.weights.torchscript is not None
    config = yaml.safe_load(rdf.read_text())["config"]["livescope"]
    assert config["model_hash"] == modelfile.load(None).hash
    assert set(config["normalisation"]) == {"offset", "gain", "read_var", "low", "high"}


# ------------------------------------------------------------------------------ packages made here


def _onnx_graph(input_axes: str, gain: float, offset: float, opset: int = 17) -> bytes:
    """y = gain * x + offset, as a graph with dynamic sizes in the given axes."""
    from onnx import TensorProto, helper

    dims = [{"b": "batch", "c": 1, "y": "y", "x": "x"}[a] for a in input_axes]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["raw", "g"], ["scaled"]),
            helper.make_node("Add", ["scaled", "o"], ["out"]),
        ],
        "affine",
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor("g", TensorProto.FLOAT, [], [gain]),
            helper.make_tensor("o", TensorProto.FLOAT, [], [offset]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _write(folder: Path, rdf: dict, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text("test package\n")
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder / "rdf.yaml"


def _common(fmt: str) -> dict:
    return {
        "format_version": fmt,
        "type": "model",
        "name": "livescope test package",
        "description": "an affine map for the tests",
        "authors": [{"name": "livescope tests"}],
        "cite": [{"text": "livescope", "url": "https://example.org/livescope"}],
        "license": "BSD-3-Clause",
        "documentation": "README.md",
        "tags": ["test"],
    }


def _package_04(folder: Path, frame: np.ndarray) -> Path:
    """Format 0.4: bcyx, per-sample percentile scaling in, the same percentiles of the input out,
    a halo of 4, sizes 16 + 8 n."""
    arr = frame[None, None].astype(np.float32)
    buf = {"weights.onnx": _onnx_graph("bcyx", 2.0, 1.0), "in.npy": _npy(arr), "out.npy": _npy(arr)}
    scale = {"mode": "per_sample", "axes": "xy", "min_percentile": 1.0, "max_percentile": 99.8}
    rdf = _common("0.4.10") | {
        "timestamp": "2026-01-01T00:00:00",
        "test_inputs": ["in.npy"],
        "test_outputs": ["out.npy"],
        "inputs": [
            {
                "name": "raw",
                "axes": "bcyx",
                "data_type": "float32",
                "data_range": [float("-inf"), float("inf")],
                "shape": {"min": [1, 1, 16, 16], "step": [0, 0, 8, 8]},
                "preprocessing": [{"name": "scale_range", "kwargs": scale}],
            }
        ],
        "outputs": [
            {
                "name": "out",
                "axes": "bcyx",
                "data_type": "float32",
                "data_range": [float("-inf"), float("inf")],
                "shape": {"reference_tensor": "raw", "scale": [1, 1, 1, 1], "offset": [0, 0, 0, 0]},
                "halo": [0, 0, 4, 4],
                "postprocessing": [{"name": "scale_range", "kwargs": scale | {"reference_tensor": "raw"}}],
            }
        ],
        "weights": {"onnx": {"source": "weights.onnx", "opset_version": 17}},
    }
    return _write(folder, rdf, buf)


def _package_05(folder: Path, weights: dict, files: dict[str, bytes]) -> Path:
    """Format 0.5: byx (no channel axis), sizes 8 + 4 n, per-sample zero mean / unit variance
    and clipping in, the input's mean and variance out."""
    size = {"min": 8, "step": 4}
    rdf = _common("0.5.4") | {
        "inputs": [
            {
                "id": "raw",
                "axes": [
                    {"type": "batch"},
                    {"type": "space", "id": "y", "size": size},
                    {"type": "space", "id": "x", "size": size},
                ],
                "data": {"type": "float32"},
                "preprocessing": [
                    {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"]}},
                    {"id": "clip", "kwargs": {"min": -2.0, "max": 2.0}},
                ],
            }
        ],
        "outputs": [
            {
                "id": "out",
                "axes": [
                    {"type": "batch"},
                    {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"}},
                    {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"}},
                ],
                "data": {"type": "float32"},
                "postprocessing": [
                    {"id": "scale_mean_variance", "kwargs": {"reference_tensor": "raw", "axes": ["y", "x"]}}
                ],
            }
        ],
        "weights": weights,
    }
    return _write(folder, rdf, files)


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture
def frame():
    import tifffile

    return tifffile.imread(REAL_DATA / "cancer_cell_migration_crop.tif")[0, :61, :75].astype(np.float32)


def test_a_format_04_package_with_percentile_scaling_and_a_halo(tmp_path, frame):
    model = modelzoo.load(_package_04(tmp_path / "p04", frame))
    assert (model.min_size, model.step, model.halo, model.multiple) == ((16, 16), (8, 8), 4, 8)
    lo, hi = np.percentile(frame.astype(np.float64), [1.0, 99.8])
    x = (frame - np.float32(lo)) / np.float32(hi - lo + 1e-6)
    expected = (2 * x + 1 - np.float32(lo)) / np.float32(hi - lo + 1e-6)
    eng = _engine(tmp_path / "p04" / "rdf.yaml", frame.shape, tile=32, overlap=8)
    assert eng.reach().halo >= 4
    (out,) = _run(eng, [frame])  # 61x75 in 32-pixel tiles padded to 16 + 8 n: stitched exactly
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_a_format_05_package_without_channel_axis_is_padded_to_a_size_it_takes(tmp_path, frame):
    rdf = _package_05(
        tmp_path / "p05", {"onnx": {"source": "w.onnx", "opset_version": 17}}, {"w.onnx": _onnx_graph("byx", 3.0, 0.5)}
    )
    model = modelzoo.load(rdf)
    assert model.input_axes == "byx" and model.step == (4, 4)
    small = frame[:5, :6]  # smaller than the model's 8x8 minimum: padded, then cropped
    for f in (frame, small):
        f64 = f.astype(np.float64)
        x = np.clip((f - f64.mean()) / (f64.std() + 1e-6), -2, 2)
        y = 3 * x + 0.5
        expected = (y - y.mean()) / (y.std() + 1e-6) * (f64.std() + 1e-6) + f64.mean()
        (out,) = _run(_engine(rdf, f.shape, tile=0), [f])
        np.testing.assert_allclose(out, expected, atol=1e-3, rtol=1e-5)


def test_torchscript_only_package_runs_on_torch_with_one_line_for_the_backend_passed_over(tmp_path, frame, caplog):
    torch = pytest.importorskip("torch")

    class Affine(torch.nn.Module):
        def forward(self, x):
            return x * 3.0 + 0.5

    path = tmp_path / "w.pt"
    torch.jit.script(Affine()).save(str(path))
    weights = {"torchscript": {"source": "w.pt", "pytorch_version": torch.__version__.split("+")[0]}}
    rdf = _package_05(tmp_path / "ts", weights, {"w.pt": path.read_bytes()})
    with caplog.at_level(logging.INFO, logger="livescope.engines.inference"):
        eng = _engine(rdf, frame.shape, backend="onnxruntime", tile=0)
    assert eng.describe()["backend_running"] == "torch"
    passed = [r for r in caplog.records if "onnxruntime unavailable" in r.getMessage()]
    assert len(passed) == 1 and "no ONNX weights" in passed[0].getMessage()
    (out,) = _run(eng, [frame])
    onnx_rdf = _package_05(
        tmp_path / "ox", {"onnx": {"source": "w.onnx", "opset_version": 17}}, {"w.onnx": _onnx_graph("byx", 3.0, 0.5)}
    )
    (ref,) = _run(_engine(onnx_rdf, frame.shape, tile=0), [frame])
    np.testing.assert_allclose(out, ref, atol=1e-4)


# ------------------------------------------------------------------------------ refusals that name the fix


def test_packages_livescope_cannot_run_are_refused_with_the_reason(tmp_path):
    rdf = _package_05(
        tmp_path / "three",
        {"onnx": {"source": "w.onnx", "opset_version": 17}},
        {"w.onnx": _onnx_graph("byx", 1.0, 1.0)},
    )
    data = yaml.safe_load(rdf.read_text())
    for tensor in ("inputs", "outputs"):
        data[tensor][0]["axes"].insert(1, {"type": "channel", "channel_names": ["a", "b", "c"]})
    rdf.write_text(yaml.safe_dump(data))
    with pytest.raises(modelfile.ModelFileError, match="3 channels; livescope runs single-channel"):
        modelzoo.load(rdf)
    with pytest.raises(modelfile.ModelFileError, match="does not exist"):
        modelzoo.load(tmp_path / "nowhere" / "rdf.yaml")
    (tmp_path / "bad.yaml").write_text("type: model\nname: x\n")
    with pytest.raises(modelfile.ModelFileError, match="not a valid BioImage Model Zoo model"):
        modelzoo.load(tmp_path / "bad.yaml")


def test_without_bioimageio_spec_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    with pytest.raises(modelfile.ModelFileError, match=r"livescope\[bioimageio\]"):
        modelzoo.load(CAREAMICS_ZIP)


def test_the_restore_engine_points_a_package_to_the_denoise_engine():
    from livescope.engines.netdeconv import NetDeconvolver

    with pytest.raises(EngineError, match="denoise.model=PATH/rdf.yaml"):
        NetDeconvolver(CAREAMICS_ZIP)


def test_livescope_model_files_still_load_and_are_not_packages(tmp_path):
    shipped = modelfile.default_model_path()
    assert not modelzoo.is_package(shipped) and not modelzoo.is_package(None)
    assert modelzoo.load_model(shipped).hash == modelfile.load(None).hash
    legacy = tmp_path / "old.lsm"
    shutil.copy(shipped, legacy)
    assert modelzoo.load_model(legacy).hash == modelfile.load(None).hash


def test_a_corrupted_weights_file_is_refused(tmp_path):
    folder = tmp_path / "c"
    rdf = _package_05(
        folder, {"onnx": {"source": "w.onnx", "opset_version": 17}}, {"w.onnx": _onnx_graph("byx", 1.0, 1.0)}
    )
    data = yaml.safe_load(rdf.read_text())
    data["weights"]["onnx"]["sha256"] = hashlib.sha256(b"other").hexdigest()
    rdf.write_text(yaml.safe_dump(data))
    with pytest.raises(modelfile.ModelFileError, match="(?i)sha256.*corrupt"):
        modelzoo.load(rdf)


def test_the_test_package_credits_its_data():
    fit = json.loads((CAREAMICS / "careamics_fit.json").read_text())
    assert fit["versions"]["careamics"] == "0.3.5"
    assert "CC BY 4.0" in (CAREAMICS / "README.md").read_text()


def test_a_package_hot_swaps_in_and_out_between_frames():
    crop = np.load(CAREAMICS / "input_crop.npy")
    eng = _engine("default", crop.shape, tile=0)
    native = eng.process(crop, FrameInfo(seq=0))["denoised"]
    eng.swap_model(str(CAREAMICS_ZIP))
    got = eng.process(crop, FrameInfo(seq=1))["denoised"]
    expected = np.load(CAREAMICS / "careamics_prediction.npy")
    np.testing.assert_allclose(got, expected, atol=2e-5 * float(np.ptp(expected)), rtol=0)
    assert eng.describe()["model_package"]["format"] == "bioimageio" and eng.window == 0
    eng.swap_model(None)  # back to the shipped model: its normalisation is fixed again on the next frame
    np.testing.assert_allclose(eng.process(crop, FrameInfo(seq=2))["denoised"], native, rtol=1e-6, atol=1e-3)
    assert eng.describe()["model_package"] is None
