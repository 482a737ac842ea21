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
    out = tmp_path / "mine.lsmodel"
    assert (
        main(
            ["fit", str(tmp_path / "movie.tif"), "--out", str(out), "--steps", "3", "--frames", "6", "--seconds", "60"]
        )
        == 0
    )
    model = modelfile.load(out)
    assert model.hash and "movie.tif" in model.metadata["training"]["data"]
    curve = (tmp_path / "mine.lsmodel.loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 4
    assert "model written" in capsys.readouterr().out


def test_fit_decompose_then_process_with_the_learned_model(tmp_path, capsys):
    """`livescope fit --task decompose` writes a cascade that `process` (and the daemon) run."""
    import tifffile
    import zarr

    sample = SimSample(SimConfig(shape=(48, 48), seed=3))
    movie = np.stack([sample.render(t) for t in range(40)])
    tifffile.imwrite(tmp_path / "movie.tif", movie)
    out = tmp_path / "lags.lsmodel"
    assert (
        main(
            [
                "fit",
                str(tmp_path / "movie.tif"),
                "--task",
                "decompose",
                "--out",
                str(out),
                "--steps",
                "8",
                "--seconds",
                "60",
            ]
        )
        == 0
    )
    assert "decompose.model=" in capsys.readouterr().out
    model = modelfile.load(out)
    assert model.task == "decompose" and model.arch["lags"] == [8, 4, 2, 1]
    assert (
        main(
            [
                "process",
                str(tmp_path / "movie.tif"),
                "--out",
                str(tmp_path / "o.zarr"),
                "--engines",
                "decompose",
                "--param",
                "decompose.method=learned",
                "--param",
                f"decompose.model={out}",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    parts = {
        k: zarr.open_array(str(tmp_path / "o.zarr" / k / "0"))[...] for k in ("background", "slow", "fast", "residual")
    }
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
    cfg = DaemonConfig(
        source="zmq",
        engines=["denoise"],
        out=tmp_path / "live.zarr",
        frames=40,
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=False,
        engine_params={"denoise": {"backend": "onnxruntime", "tile": 0}},
    )
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
                        st = wait_for(
                            lambda: (
                                (client.status().get("fit") or {}).get("state") in ("done", "failed")
                                and client.status()
                            ),
                            timeout=120,
                            message="the fit",
                        )
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

    cfg = DaemonConfig(
        source="zmq",
        engines=["denoise"],
        out=tmp_path / "o.zarr",
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=False,
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    client = ControlClient(cfg.control)
    try:
        for path in ("/etc/passwd", "../../outside.lsmodel", str(tmp_path / "elsewhere.lsmodel")):
            reply = client.request("swap_model", engine="denoise", path=path)
            assert reply["ok"] is False and "outside the output folder" in reply["error"]
        assert client.request("swap_model", engine="denoise", path="default")["ok"]
    finally:
        client.close()
        server.close()
        pipeline.close()


def test_fit_deconvolve_from_a_file_then_process(tmp_path, capsys):
    """`livescope fit --task deconvolve` with a field-varying Gaussian PSF on the sim's blur that
    grows towards the corners; `process` runs it as `deconvolve --method net`, plane by plane on
    z-stacks."""
    import tifffile
    import zarr

    cfg = SimConfig(shape=(48, 48), seed=5, psf_sigma=1.2, psf_sigma_corner=2.5)
    sample = SimSample(cfg)
    movie = np.stack([sample.render(t) for t in range(6)])
    tifffile.imwrite(tmp_path / "movie.tif", movie)
    out = tmp_path / "deconv.lsmodel"
    assert (
        main(
            [
                "fit",
                str(tmp_path / "movie.tif"),
                "--task",
                "deconvolve",
                "--out",
                str(out),
                "--steps",
                "3",
                "--psf-sigma",
                "1.2",
                "--psf-sigma-corner",
                "2.5",
                "--seconds",
                "60",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "deconvolve.method=net" in printed and "2.5 px (corners)" in printed
    model = modelfile.load(out)
    assert model.task == "deconvolve" and model.metadata["psf"]["grid"] == [3, 3]
    assert model.metadata["field_shape"] == [48, 48] and "movie.tif" in model.metadata["training"]["data"]
    assert len((tmp_path / "deconv.lsmodel.loss.csv").read_text().splitlines()) == 4
    # z-stacks: (t, z, y, x) with 3 planes, the network applied plane by plane
    stacks = np.stack([np.stack([sample.render(t, 0, z, (z - 1) * 0.5) for z in range(3)]) for t in range(2)])
    tifffile.imwrite(tmp_path / "stacks.tif", stacks, imagej=True, metadata={"axes": "TZYX"})
    assert (
        main(
            [
                "process",
                str(tmp_path / "stacks.tif"),
                "--out",
                str(tmp_path / "o.zarr"),
                "--engines",
                "deconvolve",
                "--param",
                "deconvolve.method=net",
                "--param",
                f"deconvolve.model={out}",
                "--param",
                "deconvolve.volume=true",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    got = zarr.open_array(str(tmp_path / "o.zarr" / "deconvolved" / "0"))[...]
    assert got.shape[-3:] == (3, 48, 48) and np.isfinite(got).all() and got.max() > 0
    assert main(["fit", str(tmp_path / "movie.tif"), "--task", "deconvolve", "--out", str(out), "--na", "1.2"]) == 2
    assert "--pixel-size" in capsys.readouterr().err


def _live_fit(cfg, request, sample, n=30, at=12):
    """Run the daemon on `n` streamed frames, ask for a fit, let it finish at frame `at`."""
    states = {}

    def drive(pipeline):
        def run():
            client = ControlClient(cfg.control)
            pub = FramePublisher(cfg.ingest, stream="cam", block=True)
            try:
                wait_for(lambda: client.status().get("ok"), message="control socket")
                states["reply"] = client.request("fit", **request)
                for t in range(n):
                    pub.send(sample.render(t), index={"t": t}, camera={"offset": 100.0, "gain": 0.5})
                    if t == at and states["reply"]["ok"]:
                        st = wait_for(
                            lambda: (
                                (client.status().get("fit") or {}).get("state") in ("done", "failed")
                                and client.status()
                            ),
                            timeout=120,
                            message="the fit",
                        )
                        states["fit"] = st["fit"]
            finally:
                pub.close()
                client.close()

        threading.Thread(target=run, daemon=True).start()

    states["summary"] = run_daemon(cfg, on_started=drive)
    return states


def test_live_fit_turns_classical_deconvolution_into_the_network(tmp_path, free_address):
    """The classical engine teaches with its own PSF; the fitted network replaces it between
    two frames (method=net), no frame lost; a refit of the network on `restore` is refused."""
    import zarr

    cfg = DaemonConfig(
        source="zmq",
        engines=["deconvolve"],
        out=tmp_path / "live.zarr",
        frames=30,
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=False,
        engine_params={"deconvolve": {"psf_sigma": 1.6}},
    )
    sample = SimSample(SimConfig(shape=(48, 48), seed=3, psf_sigma=1.2, psf_sigma_corner=2.5))
    states = _live_fit(
        cfg, {"engine": "deconvolve", "task": "deconvolve", "frames": 6, "steps": 3, "seconds": 60}, sample
    )
    fit, summary = states["fit"], states["summary"]
    assert fit["state"] == "done", fit
    assert fit["task"] == "deconvolve" and fit["collected"] == 6 and fit["step"] == 3
    assert fit["model"].startswith(str(cfg.out / "models"))
    params = summary["engines"]["deconvolve"]["params"]
    assert params["method"] == "net" and params["model"] == fit["model"]
    model = modelfile.load(fit["model"])
    assert model.task == "deconvolve" and model.metadata["teacher"]["method"] == "wb"
    kernel = np.asarray(model.metadata["psf"]["kernels"])[0, 0]
    from livescope.engines.psf import crop_psf, gaussian_psf

    np.testing.assert_allclose(kernel, crop_psf(gaussian_psf(1.6)), atol=1e-6)  # the engine's PSF
    assert summary["frames"]["saved"] == 30 and summary["frames"]["lost"] == 0
    got = zarr.open_array(str(cfg.out / "deconvolved" / "0"))[...].reshape(30, 48, 48)
    # products may skip frames under load (the fit shares the CPU; raw keeps every frame), but the
    # frames after the swap that were processed went through the network
    done = [t for t in range(13, 30) if np.isfinite(got[t]).all()]
    assert done and all((got[t] >= 0).all() and got[t].max() > 0 for t in done)


def test_live_fit_refits_a_restore_model_and_refuses_wrong_tasks(tmp_path, free_address):
    from livescope.engines.netdeconv import fit_deconvolution, radial_psf_grid

    sample = SimSample(SimConfig(shape=(48, 48), seed=4, psf_sigma=1.2, psf_sigma_corner=2.5))
    out = tmp_path / "live.zarr"
    first = fit_deconvolution(
        np.stack([sample.render(t) for t in range(4)]).astype(np.float32),
        psf=radial_psf_grid((48, 48), 1.2, 2.5),
        task="restore",
        steps=2,
        offset=100.0,
        base=8,
        depth=2,
        restore_window=3,
    )
    start = first.model.save(tmp_path / "first.lsmodel")
    cfg = DaemonConfig(
        source="zmq",
        engines=["restore"],
        out=out,
        frames=20,
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=False,
        engine_params={"restore": {"model": str(start), "backend": "onnxruntime", "tile": 0}},
    )
    states = _live_fit(cfg, {"engine": "restore", "frames": 5, "steps": 2, "seconds": 60}, sample, n=20, at=8)
    fit = states["fit"]
    assert fit["state"] == "done" and fit["task"] == "restore", fit
    model = modelfile.load(fit["model"])
    assert model.task == "restore" and model.metadata["psf"]["grid"] == [3, 3]
    assert model.metadata["field_shape"] == [48, 48] and model.hash != first.model.hash
    assert states["summary"]["engines"]["restore"]["params"]["model"] == fit["model"]
    assert states["summary"]["frames"]["lost"] == 0

    from livescope.daemon.pipeline import Pipeline

    cfg2 = DaemonConfig(
        source="zmq",
        engines=["restore"],
        out=tmp_path / "o2.zarr",
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=False,
        engine_params={"restore": {"model": str(start)}},
    )
    pipeline = Pipeline(cfg2)
    try:
        assert (
            "cannot run a model fitted for 'denoise'"
            in pipeline.handle({"cmd": "fit", "engine": "restore", "task": "denoise"})["error"]
        )
        assert "not running" in pipeline.handle({"cmd": "fit", "engine": "denoise"})["error"]
    finally:
        pipeline.close()
