"""Bare ZeroMQ publishers written from docs/protocol.md alone, into a real daemon and store.

Every optional header field, 1-3 channels, z in one message and z per message, the end marker and
a publisher restart: each case is either stored bit-exact with its axes, channel names and units,
or refused with a reason (tests/daemon/test_ingest_guarantees.py has the refusals).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zarr

from livescope.daemon.cli import run_daemon
from livescope.daemon.config import DaemonConfig
from tests.clients.bare import BareClient


def _run(tmp_path, free_address, publish, with_pipeline=False, **kw):
    cfg = DaemonConfig(
        **{
            "out": tmp_path / "out.zarr",
            "ingest": free_address(),
            "publish": None,
            "control": None,
            "source": "zmq",
            "exit_on_end": True,
            **kw,
        }
    )

    def started(pipeline):
        args = (cfg, pipeline) if with_pipeline else (cfg,)
        threading.Thread(target=publish, args=args, daemon=True).start()

    summary = run_daemon(cfg, on_started=started)
    return cfg, summary


def _image(cfg, name="raw"):
    root = cfg.out / name
    return zarr.open_array(str(root / "0"), mode="r")[...], json.loads((root / "zarr.json").read_text())["attributes"]


@pytest.mark.parametrize("n_c", [1, 2, 3])
@pytest.mark.parametrize("z_in_one_message", [False, True])
def test_channels_and_z_planes_land_bit_exact_with_names_and_units(tmp_path, free_address, n_c, z_in_one_message):
    names = ["DAPI", "GFP", "mCherry"][:n_c]
    n_t, n_z = 3, 4
    rng = np.random.default_rng(n_c)
    movie = rng.integers(0, 4096, (n_t, n_c, n_z, 10, 12), dtype=np.uint16)

    def publish(cfg):
        cam = BareClient(cfg.ingest)
        sizes = {"t": n_t, "c": n_c, "z": n_z}
        common = dict(
            pixel_size_um=0.108,
            z_step_um=0.5,
            interval_s=2.0,
            bits=12,
            binning=1,
            camera={"offset": 100.0, "gain": 0.46, "read_noise": 1.6},
            pixel_size_affine=[0.108, 0, 0, 0, 0.108, 0],
            meta={"user": {"note": "from the docs"}},
        )
        for t in range(n_t):
            for c in range(n_c):
                if z_in_one_message:
                    cam.send(movie[t, c], index={"t": t, "c": c}, sizes=sizes, channel=names[c], time=t * 2.0, **common)
                else:
                    for z in range(n_z):
                        cam.send(
                            movie[t, c, z],
                            index={"t": t, "c": c, "z": z},
                            sizes=sizes,
                            channel=names[c],
                            time=t * 2.0,
                            **common,
                        )
        cam.end()
        cam.close()

    cfg, summary = _run(tmp_path, free_address, publish)
    f = summary["frames"]
    assert f["rejected"] == 0 and f["lost"] == 0
    assert f["saved"] == n_t * n_c * n_z
    data, attrs = _image(cfg)
    expected = movie if n_c > 1 else movie[:, 0]
    np.testing.assert_array_equal(data, expected)
    ms = attrs["ome"]["multiscales"][0]
    axes = [a["name"] for a in ms["axes"]]
    assert axes == (["t", "c", "z", "y", "x"] if n_c > 1 else ["t", "z", "y", "x"])
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[0] == 2.0 and scale[-3:] == [0.5, 0.108, 0.108]
    assert [ch["label"] for ch in attrs["ome"]["omero"]["channels"]] == names


def test_a_plain_camera_loop_with_only_the_required_fields(tmp_path, free_address):
    frames = np.random.default_rng(5).integers(0, 255, (5, 7, 9), dtype=np.uint8)

    def publish(cfg):
        cam = BareClient(cfg.ingest)
        for f in frames:
            cam.send(f)
        cam.end()
        cam.close()

    cfg, summary = _run(tmp_path, free_address, publish)
    assert summary["frames"]["saved"] == 5
    data, attrs = _image(cfg)
    np.testing.assert_array_equal(data, frames)
    # nothing said the sampling: no invented units
    ms = attrs["ome"]["multiscales"][0]
    assert all("unit" not in a for a in ms["axes"] if a["name"] in ("t", "y", "x")), ms["axes"]


def test_a_publisher_restart_continues_as_a_new_image(tmp_path, free_address):
    a = np.random.default_rng(6).integers(0, 4000, (4, 8, 8), dtype=np.uint16)
    b = np.random.default_rng(7).integers(0, 4000, (3, 8, 8), dtype=np.uint16)

    def publish(cfg, pipeline):
        cam = BareClient(cfg.ingest)
        for t, f in enumerate(a):
            cam.send(f, index={"t": t})
        cam.close()
        # A restart takes the camera program seconds; without this wait ZeroMQ may fair-queue the old
        # connection's last frames with the new one's, and two publishers of one stream interleaved
        # frame by frame cannot be told apart (docs/protocol.md).
        deadline = time.monotonic() + 10
        while pipeline.received < len(a) and time.monotonic() < deadline:
            time.sleep(0.005)
        cam = BareClient(cfg.ingest)  # the camera program restarted: seq from 0, t from 0
        for t, f in enumerate(b):
            cam.send(f, index={"t": t})
        cam.end()
        cam.close()

    cfg, summary = _run(tmp_path, free_address, publish, with_pipeline=True)
    assert summary["frames"]["saved"] == 7 and summary["frames"]["lost"] == 0
    np.testing.assert_array_equal(_image(cfg)[0], a)
    np.testing.assert_array_equal(_image(cfg, "raw_seg1")[0], b)


def test_positions_by_index_are_images_of_their_own(tmp_path, free_address):
    movie = np.random.default_rng(8).integers(0, 4000, (2, 3, 6, 6), dtype=np.uint16)  # p, t

    def publish(cfg):
        cam = BareClient(cfg.ingest)
        for t in range(3):
            for p in range(2):
                cam.send(movie[p, t], index={"p": p, "t": t}, sizes={"p": 2, "t": 3})
        cam.end()
        cam.close()

    cfg, summary = _run(tmp_path, free_address, publish)
    assert summary["frames"]["saved"] == 6
    np.testing.assert_array_equal(_image(cfg, "raw")[0], movie[0])
    np.testing.assert_array_equal(_image(cfg, "raw_p1")[0], movie[1])
