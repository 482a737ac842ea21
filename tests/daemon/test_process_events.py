"""``livescope process`` keeps the engines' events (decompose's novelty events here) where the live
daemon keeps them, ``provenance.events`` in the output's root, each exactly once: after a run on
two workers, after a task Dask ran twice and after a resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from livescope.daemon.distributed import plan_job, run_chain, run_job
from livescope.daemon.process import process_file

pytest.importorskip("distributed", reason="dask.distributed is not installed: pip install 'dask[distributed]'")

PARAMS = {"decompose": {"background_window": 8, "background_samples": 4}}
FLASH_T, FLASH_C = 25, 1  # a sudden bright patch in one frame of channel 1


def _movie(tmp_path: Path) -> Path:
    import tifffile

    rng = np.random.default_rng(0)
    movie = (rng.poisson(200.0, (40, 2, 48, 48)) + 100).astype(np.uint16)
    movie[FLASH_T, FLASH_C, 16:32, 20:36] += 1500
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, movie, imagej=True, metadata={"axes": "TCYX"})
    return path


def _events(out: Path) -> list[dict]:
    root = json.loads((out / "zarr.json").read_text())["attributes"]["livescope"]
    return root["provenance"]["events"]


def _comparable(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "emitted"} for e in events]  # emitted: wall clock


def test_events_are_saved_once_after_two_workers_a_rerun_task_and_a_resume(tmp_path, client):
    movie = _movie(tmp_path)
    ref = process_file(movie, tmp_path / "ref.zarr", ["decompose"], PARAMS, workers=0, progress=False)
    ref_events = _events(tmp_path / "ref.zarr")
    assert ref["events"] == len(ref_events) >= 1
    flash = [e for e in ref_events if e["t"] == FLASH_T and e["c"] == FLASH_C]
    assert len(flash) == 1 and flash[0]["kind"] == "novelty"
    cy, cx = flash[0]["centroid"]
    assert 16 <= cy < 32 and 20 <= cx < 36  # on the patch
    assert flash[0]["seq"] == FLASH_T * 2 + FLASH_C and flash[0]["frame_shape"] == [48, 48]
    assert [e["id"] for e in ref_events] == list(range(1, len(ref_events) + 1))

    out = tmp_path / "d.zarr"
    job = plan_job(movie, out, ["decompose"], PARAMS, chunk_t=8)  # in order: one task per channel
    assert job.sequential and len(job.units) == 2
    res = run_job(job, client=client, progress=False)
    assert res["events"] == len(ref_events)
    assert _comparable(_events(out)) == _comparable(ref_events)

    # Dask runs the channel's task again (a worker thought lost): its chunks are all marked done,
    # so it writes nothing; then the event's chunk loses its marker (a half-written chunk) and the
    # task runs twice more: the marker is replaced, its events with it
    ti = FLASH_T // job.chunk_t
    ui = job.units.index((0, FLASH_C, 0))
    assert run_chain(job, ui, 0, 0)["frames"] == 0
    for _ in range(2):
        job.marker(ui, ti, 0, 0).unlink()
        assert run_chain(job, ui, 0, 0)["frames"] == job.chunk_t
    # and a resume after losing the last chunks of both channels
    for u in range(2):
        job.marker(u, job.n_tchunks - 1, 0, 0).unlink()
    res = run_job(plan_job(movie, out, ["decompose"], PARAMS, chunk_t=8), client=client, resume=True, progress=False)
    assert res["chunks_done_before"] == 2 * job.n_tchunks - 2
    events = _events(out)
    assert _comparable(events) == _comparable(ref_events)
    assert sum(1 for e in events if e["t"] == FLASH_T and e["c"] == FLASH_C) == 1
    root = json.loads((out / "zarr.json").read_text())["attributes"]["livescope"]["provenance"]
    assert [r["events"] for r in root["runs"]] == [len(ref_events)] * 2
