"""The daemon's configuration is checked at start: in a TOML file and on the command line alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from livescope.daemon.cli import main
from livescope.daemon.config import DaemonConfig, load_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"

# (TOML text, what the message must say: the key, and the fix or the accepted values)
BAD_TOML = [
    ('engines = "denoise"', ["engines", 'engines = ["register", "denoise"]']),
    ('memory_budget_mb = "2GB"', ["memory_budget_mb", "a valid number", "2048"]),
    ('preview_hz = "fast"', ["preview_hz", "a valid number"]),
    ("preview_hz = 0", ["preview_hz", "greater than 0"]),
    ("frames = 2.5", ["frames", "integer"]),
    ('overwrite = "yes"', ["overwrite", "boolean"]),
    ("sim_shape = [0, 64]", ["sim_shape[0]", "greater than or equal to 1"]),
    ("pixel_size_um = -0.1", ["pixel_size_um", "positive", "e.g. pixel_size_um = 0.108"]),
    ('engine = ["denoise"]', ["unknown setting 'engine'", "did you mean 'engines'"]),
    ('engines = ["denoize"]', ["unknown engine 'denoize'", "available:", "denoise"]),
    ('engines = ["passthrough", "passthrough"]', ["listed twice"]),
    (
        'engines = ["denoise"]\n[params.denoise]\nmodle = "x.lsmodel"',
        ["[params.denoise]", "no parameter 'modle'", "did you mean 'model'", "it takes: model, backend"],
    ),
    (
        'engines = ["deconvolve"]\n[params.deconvolve]\npsf = "no-such-psf.tif"',
        ["deconvolve.psf", "no-such-psf.tif", "no such file"],
    ),
    ('engines = ["deconvolve"]\n[params.deconvolve]\nmethod = "fast"', ["engine deconvolve", "method must be"]),
    ("[params.denosie]\niterations = 2", ["no engine 'denosie'", "did you mean 'denoise'"]),
    ('[engines.denoise]\nmodel = "x.lsmodel"', ["engines", "[params.ENGINE]"]),
    ('calibration = "no-such-cal.json"', ["calibration", "no such file"]),
    ('source = "flie:movie.tif"', ["source", "file:PATH"]),
    ('engines = ["passthrough"]\nsave_products = ["denoised"]', ["save_products", "'denoised'", "passthrough, raw"]),
]


@pytest.mark.parametrize("text, says", BAD_TOML, ids=[t.splitlines()[0][:30] for t, _ in BAD_TOML])
def test_a_bad_toml_file_is_refused_naming_the_key_and_the_fix(tmp_path, monkeypatch, text, says):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message.startswith(str(path)), message  # which file
    for fragment in says:
        assert fragment in message, (fragment, message)


def test_every_problem_is_listed_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('memory_budget_mb = "2GB"\npreview_hz = "fast"\nframes = 0\n')
    with pytest.raises(ValueError, match="3 problems") as exc:
        load_config(path)
    assert all(key in str(exc.value) for key in ("memory_budget_mb", "preview_hz", "frames"))


# the same mistakes on the command line: refused before anything binds, exit status 2
BAD_CLI = [
    (["--engines", "denoise,nonsense"], ["--engines", "unknown engine 'nonsense'"]),
    (["--engines", "denoise", "--param", "denoise.modle=x.lsmodel"], ["--param denoise.modle", "did you mean 'model'"]),
    (["--engines", "deconvolve", "--psf", "no-such-psf.tif"], ["deconvolve.psf", "no such file"]),
    (["--engines", "deconvolve", "--param", "deconvolve.method=fast"], ["--param deconvolve.method", "method must be"]),
    (["--memory-budget", "-5"], ["--memory-budget", "'-5': a size must be 0 or more"]),
    (["--calibration", "no-such-cal.json"], ["--calibration", "no such file"]),
    (["--source", "file:no-such-movie.tif"], ["--source", "no such file"]),
]


@pytest.mark.parametrize("argv, says", BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_the_same_mistakes_on_the_command_line_stop_the_daemon_before_it_starts(
    tmp_path, monkeypatch, capsys, argv, says, free_address
):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["daemon", "--control", free_address(), "--ingest", free_address(), *argv])
    except SystemExit as exc:  # refused by the option's own type (argparse)
        status = exc.code
    assert status == 2
    captured = capsys.readouterr()
    assert '"ingest"' not in captured.out  # it did not start
    for fragment in says:
        assert fragment in captured.err, (fragment, captured.err)


def test_the_demo_refuses_an_unknown_engine(tmp_path, capsys):
    assert main(["demo", "--headless", "--engines", "passthrough,nonsense", "--out", str(tmp_path / "d.zarr")]) == 2
    assert "--engines: unknown engine 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "d.zarr").exists()


def test_a_good_file_and_the_command_line_make_a_typed_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "psf.tif").write_bytes(b"")  # only its existence is checked at start
    path = tmp_path / "good.toml"
    path.write_text(
        'source = "zmq:tcp://127.0.0.1:5999"\nengines = ["passthrough", "deconvolve"]\nout = "o.zarr"\n'
        'sim_shape = [64, 32]\nmemory_budget_mb = 512\nsave_products = ["deconvolved"]\n'
        '[params.passthrough]\ndelay_s = 0.01\n[params.deconvolve]\npsf = "psf.tif"\n'
    )
    cfg = load_config(path, frames=7, engine_params={"deconvolve": {"iterations": 2}})
    assert isinstance(cfg, DaemonConfig)
    assert cfg.source == "zmq" and cfg.ingest == "tcp://127.0.0.1:5999" and cfg.frames == 7
    assert cfg.out == Path("o.zarr") and cfg.sim_shape == (64, 32) and cfg.memory_budget_mb == 512.0
    assert cfg.engine_params == {"passthrough": {"delay_s": 0.01}, "deconvolve": {"psf": "psf.tif", "iterations": 2}}


def test_the_example_in_docs_config_md_loads(tmp_path, monkeypatch):
    text = DOCS.read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    for name in re.findall(r'^(?:psf|calibration) = "([^"]+)"', example, re.M):
        (tmp_path / name).write_bytes(b"")  # the example's files, present
    (tmp_path / "example.toml").write_text(example)
    cfg = load_config(tmp_path / "example.toml")
    assert cfg.engines and cfg.engine_params
    # and without its files it says which one is missing
    (tmp_path / "psf.tif").unlink()
    with pytest.raises(ValueError, match=r"deconvolve\.psf.*no such file"):
        load_config(tmp_path / "example.toml")
