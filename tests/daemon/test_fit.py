"""Fitting a denoiser on the user's own stream: from a file, and live with a hot swap that loses
no frame; model paths from the control socket stay inside the output folder."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("torch")

from livescope.bridges.sim import SimConfig, SimSample  # noqa: E402
from livescope.bridges.transport import FramePublisher  # noqa: E402
from livescope.daemon.cli import main, run_daemon  # noqa: E402
from livescope.daemon.config import DaemonConfig  # noqa: E402
from livescope.daemon.control import ControlClient  # noqa: E402
from livescope.engines import modelfile  # noqa: E402
from tests.conftest import wait_for  # noqa: E402


def test_fit_a_file_writes_a_model_and_loss_curve(tmp_path, capsys):
    import tifffile

    sample = SimSample(SimConfig(shape=(64, 64), seed=2))
    tifffile.imwrite(tmp_path / "movie.tif", np.stack([sample.render(t) for t in range(6)]))
    out = tmp_path / "mine.lsm"
    assert main(["fit", str(tmp_path / "movie.tif"), "--out", str(out), "--steps", "3", "--frames", "6", "--seconds", "60"]) == 0
    model = modelfile.load(out)
    assert model.hash and "movie.tif" in model.metadata["training"]["data"]
    curve = (tmp_path / "mine.lsm.loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 4
    assert "model written" in capsys.readouterr().out


def test_fit_decompose_then_process_with_the_learned_model(tmp_path, capsys):
    """`livescope fit --task decompose` writes a cascade that `process` (and the daemon) run."""
    import tifffile
    import zarr

    sample = SimSample(SimConfig(shape=(48, 48), seed=3))
    movie = np.stack([sample.render(t) for t in range(40)])
    tifffile.imwrite(tmp_path / "movie.tif", movie)
    out = tmp_path / "lags.lsm"
    assert main(["fit", str(tmp_path / "movie.tif"), "--task", "decompose", "--out", str(out),
                 "--steps", "8", "--seconds", "60"]) == 0
    assert "decompose.model=" in capsys.readouterr().out
    model = modelfile.load(out)
    assert model.task == "decompose" and model.arch["lags"] == [8, 4, 2, 1]
    assert main(["process", str(tmp_path / "movie.tif"), "--out", str(tmp_path / "o.zarr"),
                 "--engines", "decompose", "--param", "decompose.method=learned",
                 "--param", f"decompose.model={out}", "--workers", "0"]) == 0
    parts = {k: zarr.open_array(str(tmp_path / "o.zarr" / k / "0"))[...]
             for k in ("background", "slow", "fast", "residual")}
    total = sum(parts.values()).reshape(movie.shape)
    np.testing.assert_allclose(total, movie, atol=0.05)
    import json

    prov = json.loads((tmp_path / "o.zarr" / "zarr.json").read_text())["attributes"]
    prov = prov.get("livescope", prov)["provenance"]
    assert prov["engines"]["decompose"]["method"] == "learned"
    assert main(["fit", "--live", "--task", "decompose"]) == 2
    assert "method=learned" in capsys.readouterr().err


def test_compile_without_tensorrt_names_the_fix(capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the GPU tests cover compile")
    except ImportError:
        pass
    assert main(["compile"]) == 2
    assert "NVIDIA GPU" in capsys.readouterr().err


def test_live_fit_hot_swaps_without_losing_frames(tmp_path, free_address):
    cfg = DaemonConfig(source="zmq", engines=["denoise"], out=tmp_path / "live.zarr", frames=40,
                       ingest=free_address(), publish=None, control=free_address(), exit_on_end=False,
                       engine_params={"denoise": {"backend": "onnxruntime", "tile": 0}})
    sample = SimSample(SimConfig(shape=(64, 64), seed=3))
    states = {}

    def drive(pipeline):
        def run():
            client = ControlClient(cfg.control)
            pub = FramePublisher(cfg.ingest, stream="cam", block=True)
            try:
                wait_for(lambda: client.status().get("ok"), message="control socket")
                assert client.request("fit", engine="denoise", frames=8, steps=3, seconds=60)["ok"]
                assert not client.request("fit", engine="denoise", frames=8)["ok"]  # one at a time
                for t in range(40):
                    pub.send(sample.render(t), index={"t": t}, camera={"offset": 100.0, "gain": 0.5})
                    if t == 20:  # keep streaming while the fit finishes, then let the swap happen
                        st = wait_for(lambda: (client.status().get("fit") or {}).get("state") in ("done", "failed")
                                      and client.status(), timeout=120, message="the fit")
                        states["fit"] = st["fit"]
                states["final"] = client.status()
            finally:
                pub.close()
                client.close()

        threading.Thread(target=run, daemon=True).start()

    summary = run_daemon(cfg, on_started=drive)
    fit = states["fit"]
    assert fit["state"] == "done", fit
    assert fit["collected"] == 8 and fit["step"] == 3 and len(fit["loss_curve"]) == 3
    assert fit["model"].startswith(str(cfg.out / "models"))
    assert summary["engines"]["denoise"]["params"]["model"] == fit["model"]
    assert summary["frames"]["saved"] == 40 and summary["frames"]["lost"] == 0
    assert modelfile.load(fit["model"]).hash != modelfile.load(None).hash


def test_swap_model_paths_are_confined_to_the_output_folder(tmp_path, free_address):
    from livescope.daemon.control import ControlServer
    from livescope.daemon.pipeline import Pipeline

    cfg = DaemonConfig(source="zmq", engines=["denoise"], out=tmp_path / "o.zarr", ingest=free_address(),
                       publish=None, control=free_address(), exit_on_end=False)
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    client = ControlClient(cfg.control)
    try:
        for path in ("/etc/passwd", "../../outside.lsm", str(tmp_path / "elsewhere.lsm")):
            reply = client.request("swap_model", engine="denoise", path=path)
            assert reply["ok"] is False and "outside the output folder" in reply["error"]
        assert client.request("swap_model", engine="denoise", path="default")["ok"]
    finally:
        client.close()
        server.close()
        pipeline.close()
