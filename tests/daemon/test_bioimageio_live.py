"""A BioImage Model Zoo package (a real CAREamics export, tests/data/bmz_careamics_n2v) runs live in
the daemon on the built-in simulated microscope: every saved denoised frame is the package's
output for the saved raw frame, and the daemon's summary names the package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

pytest.importorskip("bioimageio.spec", reason='bioimageio.spec is not installed: pip install "livescope[bioimageio]"')
pytest.importorskip("onnxruntime")

from livescope.daemon.cli import run_daemon  # noqa: E402
from livescope.daemon.config import DaemonConfig  # noqa: E402
from livescope.engines import modelzoo  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "data" / "bmz_careamics_n2v" / "careamics_n2v.bioimageio.zip"


def test_a_careamics_package_denoises_live_with_its_own_numbers(tmp_path, free_address):
    cfg = DaemonConfig(
        source="sim",
        frames=6,
        sim_shape=(96, 96),
        sim_interval_s=0.0,
        sim_seed=5,
        engines=["denoise"],
        engine_params={"denoise": {"model": str(PACKAGE), "backend": "onnxruntime", "tile": 0}},
        product_dtypes={"denoised": "float32"},
        out=tmp_path / "live.zarr",
        ingest=free_address(),
        publish=None,
        control=None,
    )
    summary = run_daemon(cfg)
    assert summary["frames"]["saved"] == 6 and summary["frames"]["lost"] == 0
    raw = zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")[...].reshape(6, 96, 96)
    denoised = zarr.open_array(str(cfg.out / "denoised" / "0"), mode="r")[...].reshape(6, 96, 96)
    model = modelzoo.load(PACKAGE)
    runner = modelzoo.make_runner(model, "onnxruntime")
    for t in range(6):  # the package on the saved raw frame, offline: the same numbers
        expected = model.predict(raw[t], runner.run)
        np.testing.assert_allclose(denoised[t], expected, atol=1e-5 * float(np.ptp(expected)), rtol=0)
    assert not np.allclose(denoised[0], raw[0])
    assert summary["engines"]["denoise"]["params"]["model"] == str(PACKAGE)
    # the store's provenance says which package made the products (its name, weights, hash)
    attrs = json.loads((cfg.out / "zarr.json").read_text())["attributes"]["livescope"]
    (described,) = _find(attrs, "engine_state")["denoise"].values()
    assert described["model_package"]["format"] == "bioimageio"
    assert described["model_package"]["name"] == "livescope-test-n2v-migration"
    assert described["model_package"]["hash"] == model.hash


def _find(tree, key):
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def test_the_daemon_takes_a_package_folder_and_refuses_one_without_rdf(tmp_path, free_address, capsys):
    """`--param denoise.model=FOLDER`: a package unpacked as a folder (with rdf.yaml) is checked at
    start like a file; a folder without one is refused before anything starts."""
    import shutil

    from livescope.daemon.cli import main

    folder = tmp_path / "n2v"
    shutil.unpack_archive(PACKAGE, folder)
    common = ["daemon", "--frames", "2", "--sim-size", "64", "--engines", "denoise", "--tune", "off"]
    common += ["--ingest", free_address(), "--control", free_address(), "--publish", ""]
    assert main([*common, "--param", f"denoise.model={folder}", "--out", str(tmp_path / "a.zarr")]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*common, "--param", f"denoise.model={empty}", "--out", str(tmp_path / "b.zarr")]) == 2
    assert "a folder without rdf.yaml" in capsys.readouterr().err
