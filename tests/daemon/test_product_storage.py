"""What the daemon saves by default and in which dtype (#24: a data budget that fits real cameras)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from livescope.bridges.store import FLOAT16_MAX, ImageLayout, OmeZarrStore, read_records, to_stored
from livescope.daemon.chain import auto_products
from livescope.daemon.cli import main, run_daemon
from livescope.daemon.config import DaemonConfig, validate_config


def test_the_default_set_is_the_last_restored_image_and_the_decomposition():
    assert auto_products(("register", "denoise", "deconvolve", "decompose")) == {
        "deconvolved", "background", "slow", "fast",
    }  # fmt: skip
    assert auto_products(("register",)) == {"registered"}
    assert auto_products(("register", "denoise")) == {"denoised"}
    assert auto_products(("decompose",)) == {"background", "slow", "fast"}
    assert auto_products(("trust", "decompose")) == {"denoised", "trust_denoised", "background", "slow", "fast"}


def test_a_default_daemon_saves_the_default_set_as_float16(tmp_path, free_address):
    cfg = DaemonConfig(
        out=tmp_path / "s.zarr", ingest=free_address(), publish=None, control=None, source="sim", frames=6,
        sim_shape=(32, 32), sim_interval_s=0.0, engines=["register", "deconvolve", "decompose"],
    )  # fmt: skip
    summary = run_daemon(cfg)
    assert sorted(summary["store"]["images"]) == ["background", "deconvolved", "fast", "raw", "slow"]
    for name in ("background", "deconvolved", "fast", "slow"):
        arr = zarr.open_array(str(cfg.out / name / "0"), mode="r")
        assert arr.dtype == np.float16 and not np.isnan(arr[...]).any(), name
    assert zarr.open_array(str(cfg.out / "raw" / "0"), mode="r").dtype == np.uint16  # raw as sent


def test_save_all_float32_and_a_per_product_dtype_from_the_command_line(tmp_path, free_address, capsys):
    out = tmp_path / "a.zarr"
    argv = ["daemon", "--source", "sim", "--frames", "3", "--sim-size", "32", "--sim-interval", "0",
            "--engines", "register,deconvolve", "--save", "all", "--product-dtype", "float32", "--out", str(out),
            "--ingest", free_address(), "--publish", free_address(), "--control", free_address()]  # fmt: skip
    assert main(argv) == 0
    images = json.loads((out / "zarr.json").read_text())["attributes"]["livescope"]["images"]
    assert sorted(i["path"] for i in images) == ["deconvolved", "raw", "registered"]
    assert zarr.open_array(str(out / "registered" / "0"), mode="r").dtype == np.float32
    cfg = validate_config(
        DaemonConfig(engines=["register", "deconvolve"], product_dtypes={"registered": "float32"}, publish=None)
    )
    assert cfg.stored_dtypes() == {"deconvolved": "float16", "registered": "float32"}
    with pytest.raises(ValueError, match="product_dtypes names 'denoised'"):
        validate_config(DaemonConfig(engines=["deconvolve"], product_dtypes={"denoised": "float32"}))


def test_values_beyond_float16_are_clipped_and_counted_as_saturated(tmp_path):
    store = OmeZarrStore(tmp_path / "f.zarr", product_dtypes={"deconvolved": "float16"})
    layout = ImageLayout(plane_shape=(8, 8), dtype="float32", has_c=False, has_z=False, bits=16)
    w = store.image("deconvolved", 0, 0, layout)
    plane = np.full((8, 8), 1000.5, np.float32)
    plane[0, :3] = [70000.0, -1e6, 65504.0]  # two beyond the range, one on its edge
    plane[2, 2] = np.nan  # a failed pixel stays NaN, not counted
    w.write(0, 0, 0, plane, seq=0, time_s=0.0)
    w.flush()
    store.close()
    saved = zarr.open_array(str(tmp_path / "f.zarr" / "deconvolved" / "0"), mode="r")[0]
    assert saved.dtype == np.float16
    assert saved[0, :3].tolist() == [FLOAT16_MAX, -FLOAT16_MAX, FLOAT16_MAX] and saved[1, 1] == np.float16(1000.5)
    assert np.isnan(saved[2, 2]) and read_records(tmp_path / "f.zarr" / "deconvolved")["saturated"][0] == 2


def test_the_fast_float16_conversion_gives_numpys_bits():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(600, 300, 50_000), rng.uniform(-9e4, 9e4, 50_000), rng.uniform(0, 1e-4, 50_000)])
    x = x.astype(np.float32).reshape(150, 1000)
    pytest.importorskip("torch")  # loaded: to_stored converts with it
    fast, n = to_stored(x, np.dtype(np.float16))
    ref = np.clip(x, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)  # numpy's own conversion
    assert n == int((np.abs(x) > FLOAT16_MAX).sum()) > 0
    np.testing.assert_array_equal(fast.view(np.uint16), ref.view(np.uint16))
