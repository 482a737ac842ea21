"""The wheel users install with pip (docs/install.md) holds all of livescope and runs on its own.

Built as ``make wheel`` builds it (``pip wheel --no-deps --no-build-isolation``), unpacked into a
folder outside the repository, and run from there with the repository out of the path: a module,
the shipped model or a data file left out of the package list fails here, not on a user's PC.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "engines/models", "bridges", "daemon", "ui", "ui/napari")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert "Warning" not in build.stderr, build.stderr[-3000:]  # e.g. a package folder left out
    (found,) = out.glob("livescope-*.whl")
    return found


def test_the_wheel_holds_every_module_the_model_and_the_plugin_manifest(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"livescope/{p.relative_to(REPO).as_posix()}" for d in PACKAGES for p in (REPO / d).glob("*.py")}
    want |= {
        "livescope/__init__.py",
        "livescope/py.typed",
        "livescope/engines/models/denoise_default.lsmodel",
        "livescope/ui/napari/napari.yaml",
        "livescope/data/sample_nuclei.tif",
    }
    assert want - names == set()
    assert not [n for n in names if n.startswith(("livescope/tests/", "livescope/bench/", "livescope/.venv"))]
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(meta).decode()
    assert "livescope = livescope.daemon.cli:main" in entry_points
    assert "livescope.ui.napari:napari.yaml" in entry_points
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_livescope_runs_from_the_unpacked_wheel_alone(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))  # before the editable install's finder

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )

    where = run("-c", "import livescope; print(livescope.__file__)")
    assert where.returncode == 0 and where.stdout.strip().startswith(str(site)), where
    engines = run("-m", "livescope.daemon.cli", "engines")
    assert engines.returncode == 0, engines.stderr
    assert "denoise" in engines.stdout and "deconvolve" in engines.stdout
    sample = site / "livescope" / "data" / "sample_nuclei.tif"
    out = tmp_path / "out.zarr"
    process = run(
        "-m", "livescope.daemon.cli", "process", str(sample), "--out", str(out),
        "--engines", "denoise", "--frames", "2", "--workers", "0",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert (out / "zarr.json").is_file()
