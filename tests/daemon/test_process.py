"""``livescope process`` on dask.distributed: chunked in time and space, the result equals one
single-process run over the whole movie; a killed worker and an interrupted run lose and
duplicate nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from livescope.bridges.store import STATUS, read_records
from livescope.daemon.distributed import open_source, plan_job, run_job
from livescope.daemon.process import process_file

from ..conftest import wait_for

pytest.importorskip("distributed", reason="dask.distributed is not installed: pip install 'dask[distributed]'")


def _movie(tmp_path: Path, shape=(20, 2, 40, 48), seed=0, flash: tuple | None = None) -> Path:
    import tifffile

    rng = np.random.default_rng(seed)
    movie = (rng.poisson(200.0, shape) + 100).astype(np.uint16)
    movie[..., 10:20, 12:30] += 400  # something to register and decompose
    if flash is not None:  # a sudden event: a bright patch in one frame of one channel
        movie[flash] += 1500
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, movie, imagej=True, metadata={"axes": "TCYX"[-len(shape) :] if len(shape) == 4 else "TYX"})
    return path


def _assert_same(ref: Path, out: Path, images: list[str], exact: bool = True) -> None:
    for p in images:
        a = zarr.open_array(str(ref / p / "0"), mode="r")[...]
        b = zarr.open_array(str(out / p / "0"), mode="r")[...]
        assert a.shape == b.shape and a.dtype == b.dtype, p
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=p)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.nanmax(np.abs(a))), err_msg=p)
        ra, rb = read_records(ref / p), read_records(out / p)
        assert sorted(ra) == sorted(rb), p
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{p} record {k}")


@pytest.mark.parametrize(
    "engines, params, chunk_t, tile",
    [
        (["passthrough"], {}, 6, 16),  # 4 time chunks x 2 channels x 3 x 3 tiles
        (["deconvolve"], {"deconvolve": {"iterations": 3}}, 6, None),  # offset fixed on frame 0
        (["deconvolve", "decompose"], {"decompose": {"background_window": 8, "background_samples": 4}}, 6, None),
        (["register"], {}, 7, None),  # in order: scalars (shifts) in the records
    ],
    ids=["tiles", "deconvolve", "decompose-in-order", "register"],
)
def test_chunked_equals_one_single_process_run(tmp_path, client, engines, params, chunk_t, tile):
    movie = _movie(tmp_path)
    ref = process_file(movie, tmp_path / "ref.zarr", engines, params, workers=0, progress=False)
    job = plan_job(movie, tmp_path / "d.zarr", engines, params, chunk_t=chunk_t, tile=tile)
    res = run_job(job, client=client, progress=False)
    assert res["chunks"] > 2 and res["frames"] == ref["frames"] == 40
    if tile:
        assert job.grid == (3, 3)
    _assert_same(tmp_path / "ref.zarr", tmp_path / "d.zarr", ref["images"])
    root = json.loads((tmp_path / "d.zarr" / "zarr.json").read_text())["attributes"]["livescope"]
    assert root["provenance"]["mode"] == "process" and root["provenance"]["runs"][0]["chunks"] == res["chunks"]
    assert set(root["provenance"]["engine_describe"]) == set(engines)


def test_denoise_tiles_with_a_receptive_field_halo_are_bit_exact(tmp_path, client, real_data):
    """Tiles of 32 px on a real movie, the U-Net's receptive field as halo, its normalisation fixed
    on frame 0 and handed to every chunk: equal to the whole-frame single-process run."""
    import tifffile

    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, tifffile.imread(real_data / "cancer_cell_migration_crop.tif")[:8])
    ref = process_file(path, tmp_path / "ref.zarr", ["denoise"], workers=0, progress=False)
    job = plan_job(path, tmp_path / "d.zarr", ["denoise"], chunk_t=4, tile=32)
    assert job.halo >= 51 and job.grid == (5, 5)  # 130 px frames in 32 px tiles
    run_job(job, client=client, progress=False)
    _assert_same(tmp_path / "ref.zarr", tmp_path / "d.zarr", ref["images"])


def test_inputs_ome_zarr_ndtiff_and_hyperstack_axes(tmp_path, client):
    import tifffile

    rng = np.random.default_rng(3)
    movie = rng.integers(0, 4000, (5, 3, 2, 20, 24), dtype=np.uint16)  # t, z, c (ImageJ order)
    tifffile.imwrite(tmp_path / "h.tif", movie, imagej=True, metadata={"axes": "TZCYX"})
    src = open_source(tmp_path / "h.tif")
    assert src.sizes == {"t": 5, "p": 1, "c": 2, "z": 3, "y": 20, "x": 24}
    np.testing.assert_array_equal(src.read(1, 4, 1, 2, (3, 9), (0, 24)), movie[1:4, 2, 1, 3:9])
    np.testing.assert_array_equal(src.read(0, 2, 0, None, (0, 20), (5, 7)), movie[0:2, :, 0, :, 5:7])
    # the output of one run is the input of the next: livescope's own OME-Zarr (t, c, z, y, x)
    res = process_file(
        tmp_path / "h.tif", tmp_path / "a.zarr", ["passthrough"], chunk_t=2, workers=1, processes=False, progress=False
    )
    assert res["frames"] == 5 * 3 * 2
    own = zarr.open_array(str(tmp_path / "a.zarr" / "raw" / "0"), mode="r")[...]
    np.testing.assert_array_equal(own, movie.transpose(0, 2, 1, 3, 4))
    job = plan_job(tmp_path / "a.zarr", tmp_path / "b.zarr", ["passthrough"], chunk_t=3)
    run_job(job, client=client, progress=False)
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "b.zarr" / "passthrough" / "0"))[...], own.astype(np.float32)
    )
    # NDTiff (Pycro-Manager), read with its own reader
    ndstorage = pytest.importorskip("ndstorage", reason="ndstorage is not installed")
    ds = ndstorage.NDTiffDataset(str(tmp_path / "nd"), name="acq", writable=True)
    ds.initialize({})
    for t, c, z in np.ndindex(5, 2, 3):
        ds.put_image(
            {"time": t, "channel": c, "z": z},
            movie[t, z, c],
            {"PixelType": "GRAY16", "Width": 24, "Height": 20, "BitDepth": 16},
        )
    ds.finish()
    job = plan_job(tmp_path / "nd", tmp_path / "n.zarr", ["passthrough"], chunk_t=2)
    run_job(job, client=client, progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "n.zarr" / "raw" / "0"))[...], own)


def test_a_killed_worker_loses_and_duplicates_nothing(tmp_path):
    """Two worker processes; one is killed (SIGKILL) mid-run. Its chunks are rerun elsewhere;
    the output equals the reference, every chunk has one marker and every frame one record."""
    from distributed import Client, LocalCluster

    movie = _movie(tmp_path, shape=(24, 32, 32))
    params = {"passthrough": {"delay_s": 0.03}}  # chunks that last long enough to be killed in
    process_file(movie, tmp_path / "ref.zarr", ["passthrough"], workers=0, progress=False)
    job = plan_job(movie, tmp_path / "d.zarr", ["passthrough"], params, chunk_t=2, tile=16)
    total = sum(1 for _ in job.chunks())
    killed = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)

        def kill_one_busy_worker():
            wait_for(
                lambda: len(list((job.state_dir / "done").glob("*.json"))) >= 4, timeout=60, message="first chunks done"
            )
            busy = wait_for(lambda: [w for w, tasks in client.processing().items() if tasks], timeout=30)
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(busy[0])

        killer = threading.Thread(target=kill_one_busy_worker, daemon=True)
        killer.start()
        res = run_job(job, client=client, progress=False)
        killer.join(30)
    assert killed, "no worker was killed"
    assert res["chunks"] == total
    markers = sorted((job.state_dir / "done").glob("*.json"))
    assert len(markers) == total  # one per chunk: nothing lost, nothing extra
    _assert_same(tmp_path / "ref.zarr", tmp_path / "d.zarr", ["raw", "passthrough"])
    rec = read_records(tmp_path / "d.zarr" / "passthrough")
    assert (rec["status"] == STATUS["saved"]).sum() == 24
    assert sorted(rec["seq"].tolist()) == list(range(24))


_INTERRUPTED = textwrap.dedent("""
    import sys
    from livescope.daemon.process import process_file
    process_file(sys.argv[1], sys.argv[2], sys.argv[3].split(","), {"passthrough": {"delay_s": 0.05},
                 "decompose": {"background_window": 8, "background_samples": 4}},
                 workers=2, processes=False, chunk_t=3, progress=False)
""")


@pytest.mark.parametrize(
    "engines", [["passthrough"], ["passthrough", "decompose"]], ids=["chunks", "in-order-with-checkpoints"]
)
def test_resume_after_a_crash_completes_the_output_exactly(tmp_path, engines):
    """The driver is killed (SIGKILL) mid-run; a chunk's data is then damaged without its marker
    being written (a half-written chunk); ``resume`` keeps the complete chunks and redoes the rest."""
    movie = _movie(tmp_path, shape=(30, 2, 24, 24), flash=(25, 1, slice(4, 20), slice(4, 20)))
    params = {"passthrough": {"delay_s": 0.05}, "decompose": {"background_window": 8, "background_samples": 4}}
    ref = process_file(movie, tmp_path / "ref.zarr", engines, params, workers=0, progress=False)
    assert ref["events"] == (1 if "decompose" in engines else 0)
    out = tmp_path / "d.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, str(movie), str(out), ",".join(engines)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: len(list((out / ".livescope-process" / "done").glob("*.json"))) >= 4 or proc.poll() is not None,
            timeout=60,
            message="some chunks done",
        )
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    done = sorted((out / ".livescope-process" / "done").glob("*.json"))
    assert 4 <= len(done) < 20
    # a chunk whose data went in but whose marker did not: it must be redone, not trusted
    import tensorstore as ts

    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "raw" / "0")}}).result()
    arr[27:30, 1].write(np.full((3, 24, 24), 7, np.uint16)).result()
    job = plan_job(movie, out, engines, params, chunk_t=3)
    with pytest.raises(ValueError, match="another input, engines, parameters or chunking"):
        run_job(
            plan_job(movie, out, engines, params, chunk_t=5), resume=True, workers=1, processes=False, progress=False
        )
    res = run_job(job, resume=True, workers=2, processes=False, progress=False)
    assert res["chunks_done_before"] == len(done) and res["chunks"] == 20
    assert res["frames"] == 60 - 3 * len(done)  # only the missing chunks were written
    _assert_same(tmp_path / "ref.zarr", out, ref["images"])
    assert not list((out / ".livescope-process" / "state").glob("*.pkl"))  # chains finished
    # the engines' events: once each, as in the single-process run (``emitted`` is a wall clock)
    ev_ref, ev = (
        [
            {k: v for k, v in e.items() if k != "emitted"}
            for e in json.loads((d / "zarr.json").read_text())["attributes"]["livescope"]["provenance"]["events"]
        ]
        for d in (tmp_path / "ref.zarr", out)
    )
    assert ev == ev_ref and len(ev) == ref["events"]
    if ev:
        assert (ev[0]["t"], ev[0]["c"], ev[0]["kind"]) == (25, 1, "novelty")


def test_an_existing_output_is_not_overwritten_without_asking(tmp_path, client):
    from livescope.bridges.store import StoreError

    movie = _movie(tmp_path, shape=(4, 16, 16))
    run_job(plan_job(movie, tmp_path / "o.zarr", ["passthrough"]), client=client, progress=False)
    with pytest.raises(StoreError, match="--overwrite"):
        run_job(plan_job(movie, tmp_path / "o.zarr", ["passthrough"]), client=client, progress=False)
    res = run_job(plan_job(movie, tmp_path / "o.zarr", ["passthrough"]), client=client, progress=False, overwrite=True)
    assert res["saved"]["raw"] == 4


def test_the_dashboard_of_a_local_cluster_is_served_on_loopback():
    import re
    import urllib.request

    pytest.importorskip("bokeh")
    from livescope.daemon import distributed as D

    with D._client(None, 1, False, None) as client:  # the real cluster factory
        link = D._dashboard(client)
        assert link.startswith("http://127.0.0.1:")
        port = re.search(r":(\d+)/", link).group(1)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=20).status == 200
