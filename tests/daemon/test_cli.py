from __future__ import annotations

import json
import os
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

    assert parse_params(["deconvolve.iterations=3", "denoise.model=/a/b.lsmodel", "x.flag=true"]) == {
        "deconvolve": {"iterations": 3},
        "denoise": {"model": "/a/b.lsmodel"},
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


def _all_actions(parser, name="livescope"):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_actions(sub, f"{name} {sub_name}")
        elif not isinstance(action, argparse._HelpAction):
            yield name, action


def test_every_option_of_every_command_says_what_it_does():
    missing = [f"{name} {a.option_strings or a.dest}" for name, a in _all_actions(build_parser()) if not a.help]
    assert not missing, missing


def test_defaults_are_shown_and_v_q_work_after_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # as read, not as wrapped
    assert "(default: tcp://127.0.0.1:5572)" in out and "(default: 3.0)" in out
    args = build_parser().parse_args(["status", "-v", "-v"])
    assert args.verbose == 2 and args.quiet == 0
    assert build_parser().parse_args(["-q", "stop"]).quiet == 1


def test_an_address_without_a_scheme_is_read_as_tcp_or_refused_with_the_form(capsys):
    from livescope.daemon.config import DaemonConfig, validate_config

    cfg = validate_config(DaemonConfig(ingest="127.0.0.1:7351", publish=":7352", control="7353"))
    assert (cfg.ingest, cfg.publish, cfg.control) == ("tcp://127.0.0.1:7351", "tcp://127.0.0.1:7352",
                                                       "tcp://127.0.0.1:7353")  # fmt: skip
    with pytest.raises(ValueError, match=r"give tcp://HOST:PORT"):
        validate_config(DaemonConfig(ingest="camera-pc"))
    assert main(["status", "--control", "127.0.0.1:1", "--timeout", "0.2"]) == 2
    assert "tcp://127.0.0.1:1 within 0.2 s" in capsys.readouterr().err


def test_engines_lists_each_engine_with_its_outputs_and_parameters(capsys):
    assert main(["engines", "deconvolve"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deconvolve:") and "images: deconvolved" in out
    assert "--param deconvolve.psf_sigma = 1.5" in out and "--param deconvolve.iterations" in out
    assert main(["engines", "nonesuch"]) == 2
    assert "available:" in capsys.readouterr().err


def test_a_bare_daemon_says_what_it_is_doing(free_address, capsys):
    argv = ["daemon", "--frames", "2", "--sim-interval", "0", "--ingest", free_address(), "--publish",
            free_address(), "--control", free_address()]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "the built-in simulated microscope for 2 time points" in err and "not saving (--out PATH" in err


def test_a_cpu_run_on_dask_logs_nothing_the_user_need_not_act_on(tmp_path):
    """No Dask INFO chatter (it configures its loggers on import, in workers too), no warning
    about TensorRT on a machine without it; -vv shows Dask's lines (the check can fail)."""
    import tifffile

    movie = np.random.default_rng(2).integers(100, 1000, (4, 32, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", movie, imagej=True, metadata={"axes": "TYX"})

    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}  # as a user's shell

    def run(*flags: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "livescope.daemon.cli", *flags, "process", str(tmp_path / "m.tif"),
             "--out", str(tmp_path / f"o{len(flags)}.zarr"), "--engines", "denoise,deconvolve",
             "--workers", "2", "--threads"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    quiet = [line for line in run().splitlines() if " INFO " in line or " WARNING " in line]
    assert quiet == []
    assert " INFO distributed." in run("-vv")


def test_memory_sizes_take_the_same_units_in_every_command():
    from livescope.daemon.cli import size_mb

    assert size_mb("2048") == 2048 and size_mb("2GB") == 2048 and size_mb("512 MB") == 512
    assert size_mb("2GiB") == 2048 and size_mb("1.5g") == 1536
    parser = build_parser()
    assert parser.parse_args(["daemon", "--memory-budget", "2GB"]).memory_budget_mb == 2048
    assert parser.parse_args(["process", "m.tif", "--out", "o", "--memory-limit", "4GB"]).memory_limit == 4096
    assert parser.parse_args(["process", "m.tif", "--out", "o", "--memory-limit", "4096"]).memory_limit == 4096
    for bad in ("2x", "-1", "GB"):
        with pytest.raises(SystemExit):
            parser.parse_args(["daemon", "--memory-budget", bad])
    # the sampling options are the same in daemon and process
    daemon = parser.parse_args(["daemon", "--pixel-size", "0.1", "--z-step", "0.3", "--interval", "2"])
    assert (daemon.pixel_size_um, daemon.z_step_um, daemon.interval_s) == (0.1, 0.3, 2.0)
