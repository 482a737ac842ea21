from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from livescope.daemon.cli import build_parser, main


@pytest.mark.parametrize(
    "command", ["demo", "daemon", "view", "process", "status", "stop", "recover", "fit", "compile", "calibrate"]
)
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: livescope " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_headless_writes_store_summary_and_png(tmp_path):
    out = tmp_path / "demo.zarr"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "livescope",
            "demo",
            "--headless",
            "--frames",
            "12",
            "--engines",
            "passthrough",
            "--size",
            "64",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "frames: received 12, saved 12, lost 0" in res.stdout
    assert zarr.open_array(str(out / "raw" / "0"), mode="r").shape == (12, 64, 64)
    png = tmp_path / "demo.zarr.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_process_a_tiff_offline(tmp_path):
    import tifffile

    movie = np.random.default_rng(0).integers(0, 1000, (5, 24, 24), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    assert (
        main(["process", str(tmp_path / "m.tif"), "--out", str(tmp_path / "o.zarr"), "--engines", "passthrough"]) == 0
    )
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr" / "raw" / "0"))[...], movie)
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "o.zarr" / "passthrough" / "0"))[...], movie.astype(np.float32)
    )


def test_status_without_a_daemon_says_how_to_fix(free_address, capsys):
    assert main(["status", "--control", free_address(), "--timeout", "0.3"]) == 2
    assert "is it running" in capsys.readouterr().err


def test_param_parsing_and_bad_param():
    from livescope.daemon.config import parse_params

    assert parse_params(["deconvolve.iterations=3", "denoise.model=/a/b.lsm", "x.flag=true"]) == {
        "deconvolve": {"iterations": 3},
        "denoise": {"model": "/a/b.lsm"},
        "x": {"flag": True},
    }
    with pytest.raises(ValueError, match="ENGINE.NAME=VALUE"):
        parse_params(["iterations=3"])
    args = build_parser().parse_args(["daemon", "--psf-sigma", "2", "--engines", "deconvolve"])
    from livescope.daemon.cli import _engine_params

    assert _engine_params(args) == {"deconvolve": {"psf_sigma": 2.0}}


def test_toml_config(tmp_path):
    from livescope.daemon.config import load_config

    p = tmp_path / "c.toml"
    p.write_text('source = "zmq"\nengines = ["passthrough"]\nframes = 5\n[params.passthrough]\ndelay_s = 0.1\n')
    cfg = load_config(p, frames=7)
    assert cfg.source == "zmq" and cfg.frames == 7 and cfg.engine_params == {"passthrough": {"delay_s": 0.1}}
    p.write_text("nonsense = 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        load_config(p)


def test_calibrate_a_sim_movie_recovers_the_gain(tmp_path, capsys):
    import tifffile

    from livescope.bridges.sim import SimConfig, SimSample

    cfg = SimConfig(shape=(96, 96), seed=1, n_fast=0, n_slow=0)
    sample = SimSample(cfg)
    tifffile.imwrite(tmp_path / "m.tif", np.stack([sample.render(t) for t in range(16)]))
    assert main(["calibrate", str(tmp_path / "m.tif"), "--out", str(tmp_path / "cal.json")]) == 0
    result = json.loads((tmp_path / "cal.json").read_text())
    assert abs(result["gain_adu_per_e"] - 1 / cfg.gain) / (1 / cfg.gain) < 0.05
    assert abs(result["e_per_adu"] - cfg.gain) / cfg.gain < 0.05
    assert "calibration written" in capsys.readouterr().out


def test_process_on_two_dask_workers_from_the_cli(tmp_path):
    import tifffile

    movie = np.random.default_rng(1).integers(0, 1000, (8, 32, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    assert (
        main(
            [
                "process",
                str(tmp_path / "m.tif"),
                "--out",
                str(tmp_path / "o.zarr"),
                "--engines",
                "passthrough",
                "--workers",
                "2",
                "--threads",
                "--chunk-t",
                "3",
                "--tile",
                "16",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "o.zarr" / "passthrough" / "0"))[...], movie.astype(np.float32)
    )
