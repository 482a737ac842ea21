"""``livescope process`` inputs beyond one position of planes: NDTiff datasets with several stage
positions (read with Pycro-Manager's own reader, ``ndstorage``), livescope's own multi-position
output read back, and engines that run on whole z-stacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from livescope.bridges.store import STATUS, read_records
from livescope.daemon.distributed import open_source, plan_job, run_job
from livescope.daemon.process import process_file

pytest.importorskip("distributed", reason="dask.distributed is not installed: pip install 'dask[distributed]'")


def _array(path: Path) -> np.ndarray:
    return zarr.open_array(str(path / "0"), mode="r")[...]


def _assert_same_output(ref: Path, out: Path, images: list[str]) -> None:
    for name in images:
        a, b = _array(ref / name), _array(out / name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
        ra, rb = read_records(ref / name), read_records(out / name)
        assert sorted(ra) == sorted(rb), name
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{name} record {k}")


def test_ndtiff_positions_channels_and_planes_map_onto_output_positions(tmp_path, client):
    ndstorage = pytest.importorskip("ndstorage", reason="ndstorage (Pycro-Manager's NDTiff reader) is not installed")
    rng = np.random.default_rng(5)
    movie = rng.integers(0, 4000, (4, 3, 2, 2, 20, 24), dtype=np.uint16)  # t, position, c, z, y, x
    ds = ndstorage.NDTiffDataset(str(tmp_path / "nd"), name="acq", writable=True)
    ds.initialize({})
    for t, p, c, z in np.ndindex(*movie.shape[:4]):  # acquisition order: t, position, channel, z
        ds.put_image(
            {"time": t, "position": p, "channel": c, "z": z},
            movie[t, p, c, z],
            {"PixelType": "GRAY16", "Width": 24, "Height": 20, "BitDepth": 16},
        )
    ds.finish()
    src = open_source(tmp_path / "nd")
    assert src.sizes == {"t": 4, "p": 3, "c": 2, "z": 2, "y": 20, "x": 24}
    np.testing.assert_array_equal(src.read(1, 3, 1, None, (2, 9), (0, 24), p=2), movie[1:3, 2, 1, :, 2:9])

    ref = process_file(tmp_path / "nd", tmp_path / "ref.zarr", ["passthrough"], workers=0, progress=False)
    assert ref["frames"] == 4 * 3 * 2 * 2
    job = plan_job(tmp_path / "nd", tmp_path / "n.zarr", ["passthrough"], chunk_t=2)
    assert len(job.units) == 3 * 2 * 2
    res = run_job(job, client=client, progress=False)
    expect = {f"{prod}{suffix}" for prod in ("raw", "passthrough") for suffix in ("", "_p1", "_p2")}
    assert set(res["images"]) == set(ref["images"]) == expect
    _assert_same_output(tmp_path / "ref.zarr", tmp_path / "n.zarr", sorted(expect))
    for p, suffix in enumerate(("", "_p1", "_p2")):
        np.testing.assert_array_equal(_array(tmp_path / "n.zarr" / f"raw{suffix}"), movie[:, p])
        rec = read_records(tmp_path / "n.zarr" / f"passthrough{suffix}")
        assert (rec["status"] == STATUS["saved"]).all()
        # seq counts frames in acquisition order (t, position, channel, plane), as live
        np.testing.assert_array_equal(rec["seq"][1, 1, 0], 1 * 12 + p * 4 + 1 * 2 + 0)
    root = json.loads((tmp_path / "n.zarr" / "zarr.json").read_text())["attributes"]["livescope"]
    assert {(i["product"], i["position"]) for i in root["images"]} == {
        (prod, p) for prod in ("raw", "passthrough") for p in range(3)
    }

    # the output of one run is the input of the next, positions and all
    again = open_source(tmp_path / "n.zarr")
    assert again.sizes["p"] == 3 and again.sizes["c"] == 2 and again.sizes["z"] == 2
    run_job(
        plan_job(tmp_path / "n.zarr", tmp_path / "m.zarr", ["passthrough"], chunk_t=3), client=client, progress=False
    )
    for p, suffix in enumerate(("", "_p1", "_p2")):
        np.testing.assert_array_equal(
            _array(tmp_path / "m.zarr" / f"passthrough{suffix}"), movie[:, p].astype(np.float32)
        )


@pytest.mark.parametrize(
    "engines, params",
    [
        (["register"], {"register": {"volume": True}}),  # in order; shifts in z, y, x per stack
        (["deconvolve"], {"deconvolve": {"volume": True, "iterations": 2}}),  # stacks in time chunks
    ],
    ids=["register-3d", "deconvolve-3d"],
)
def test_engines_on_z_stacks_equal_one_single_process_run(tmp_path, client, engines, params):
    """Engines that set ``needs_volume`` get whole (z, y, x) stacks in both runs; every plane of
    their products, and each stack's numbers on each of its planes, equal the single-process run."""
    import tifffile

    rng = np.random.default_rng(7)
    n_t, n_z = 9, 6
    yy, xx = np.mgrid[:32, :32]
    movie = np.empty((n_t, n_z, 32, 32), np.uint16)
    for t in range(n_t):  # a blob drifting in x, y and z
        for z in range(n_z):
            r2 = (yy - 14 - 0.3 * t) ** 2 + (xx - 15 - 0.5 * t) ** 2 + (3 * (z - 2.5 - 0.1 * t)) ** 2
            movie[t, z] = 100 + 800 * np.exp(-r2 / 18) + rng.poisson(20, (32, 32))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, movie, imagej=True, resolution=(1 / 0.2, 1 / 0.2), metadata={"axes": "TZYX", "spacing": 0.5, "unit": "um"}
    )
    ref = process_file(path, tmp_path / "ref.zarr", engines, params, workers=0, progress=False)
    assert ref["frames"] == n_t  # one stack per time point
    job = plan_job(path, tmp_path / "d.zarr", engines, params, chunk_t=4)
    assert job.units == [(0, 0, None)]  # whole stacks
    res = run_job(job, client=client, progress=False)
    assert res["frames"] == n_t and res["chunks"] == 3
    product = "registered" if engines == ["register"] else "deconvolved"
    assert _array(tmp_path / "d.zarr" / product).shape == (n_t, n_z, 32, 32)
    _assert_same_output(tmp_path / "ref.zarr", tmp_path / "d.zarr", ref["images"])
    if engines == ["register"]:
        rec = read_records(tmp_path / "d.zarr" / "raw")
        assert {"shift_z", "shift_y", "shift_x"} <= set(rec)
        assert np.all(rec["shift_x"][1:] == rec["shift_x"][1:, :1])  # one number per stack, on each plane
        assert np.ptp(rec["shift_x"][:, 0]) > 1.0  # it did follow the drift (0.5 px per frame)


@pytest.mark.parametrize("compression", [None, "zlib"])  # contiguous reads and page-by-page reads
def test_ome_tiff_series_are_stage_positions(tmp_path, client, compression):
    import tifffile

    rng = np.random.default_rng(6)
    movie = rng.integers(0, 4000, (3, 5, 2, 16, 20), dtype=np.uint16)  # position, t, c, y, x
    path = tmp_path / "multi.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for pos in movie:
            tw.write(pos, metadata={"axes": "TCYX"}, compression=compression)
    src = open_source(path)
    assert src.sizes == {"t": 5, "p": 3, "c": 2, "z": 1, "y": 16, "x": 20}
    np.testing.assert_array_equal(src.read(1, 4, 1, None, (2, 9), (0, 20), p=2), movie[2, 1:4, 1, 2:9])
    ref = process_file(path, tmp_path / "ref.zarr", ["passthrough"], workers=0, progress=False)
    res = run_job(plan_job(path, tmp_path / "n.zarr", ["passthrough"], chunk_t=2), client=client, progress=False)
    expect = {f"{prod}{suffix}" for prod in ("raw", "passthrough") for suffix in ("", "_p1", "_p2")}
    assert set(res["images"]) == set(ref["images"]) == expect
    _assert_same_output(tmp_path / "ref.zarr", tmp_path / "n.zarr", sorted(expect))
    for p, suffix in enumerate(("", "_p1", "_p2")):
        np.testing.assert_array_equal(_array(tmp_path / "n.zarr" / f"raw{suffix}"), movie[p])
    # series that are not positions of one experiment are refused with the fix
    odd = tmp_path / "odd.ome.tif"
    with tifffile.TiffWriter(odd, ome=True) as tw:
        tw.write(movie[0], metadata={"axes": "TCYX"})
        tw.write(movie[1, :, 0], metadata={"axes": "TYX"})
    with pytest.raises(ValueError, match="split the file"):
        open_source(odd)
