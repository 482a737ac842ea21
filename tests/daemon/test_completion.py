"""Saved products are complete: every frame the live path skipped is restored in order from the
saved raw, and the store equals ``livescope process`` on that raw (daemon/completion.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

from livescope.bridges.store import STATUS, read_records, to_stored
from livescope.daemon.cli import main, run_daemon
from livescope.daemon.completion import complete_store
from livescope.daemon.config import DaemonConfig
from livescope.daemon.process import process_file

# stateful engines (register keeps a reference, decompose a rolling history) and a slow one that
# makes the live path skip frames whatever the machine
ENGINES = ["register", "deconvolve", "decompose", "passthrough"]
PARAMS = {"passthrough": {"delay_s": 0.03}}
PRODUCTS = ["registered", "deconvolved", "background", "slow", "fast", "residual", "passthrough"]


def _cfg(tmp_path, free_address, **kw):
    base = dict(
        out=tmp_path / "live.zarr",
        ingest=free_address(),
        publish=None,
        control=None,
        source="sim",
        frames=40,
        sim_shape=(64, 64),
        sim_interval_s=0.0,
        sim_drift=(0.3, -0.2),
        engines=ENGINES,
        engine_params=PARAMS,
        save_products=True,  # every product, to check each is complete (the default keeps fewer)
        tune="off",  # compared with offline runs of fixed settings (tests/daemon/test_tuning.py: tuned)
    )
    base.update(kw)
    return DaemonConfig(**base)


def _reprocessed(tmp_path, store):
    out = tmp_path / "offline.zarr"
    process_file(store, out, ENGINES, PARAMS, progress=False, workers=0)
    return out


def _assert_equal_products(store, offline):
    """Every product frame saved and equal to offline reprocessing (which keeps float32), in the
    dtype the daemon stores (float16 by default, rounded the same way)."""
    for name in PRODUCTS:
        live = zarr.open_array(str(store / name / "0"), mode="r")[...]
        off = zarr.open_array(str(offline / name / "0"), mode="r")[...].reshape(live.shape)
        off = to_stored(off, live.dtype)[0]
        nan_frames = int(np.isnan(live).reshape(len(live), -1).all(axis=1).sum())
        assert nan_frames == 0, f"{name}: {nan_frames} frames left empty"
        np.testing.assert_array_equal(live, off, err_msg=name)
        assert (read_records(store / name)["status"] == STATUS["saved"]).all(), name


def test_every_skipped_frame_is_completed_and_the_store_equals_offline_reprocessing(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address)
    summary = run_daemon(cfg)
    f = summary["frames"]
    assert f["received"] == 40 and f["saved"] == 40 and f["lost"] == 0
    assert f["skipped_frames"] > 5, "the slow engine should have made the live path skip frames"
    comp = summary["completion"]
    assert comp["mode"] == "during" and comp["frames_to_go"] == 0 and comp["unrecoverable"] == 0
    assert comp["frames_completed"] >= f["skipped_frames"]
    _assert_equal_products(cfg.out, _reprocessed(tmp_path, cfg.out))
    prov = json.loads((cfg.out / "zarr.json").read_text())["attributes"]["livescope"]["provenance"]
    assert prov["completion"]["frames_completed"] == comp["frames_completed"]


def test_after_mode_leaves_the_acquisition_alone_then_completes(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address, complete="after")
    seen_while_running: list[int] = []

    def watch(pipeline):
        def loop():
            while pipeline.state == "running":
                seen_while_running.append(pipeline.status()["completion"]["frames_completed"])
                time.sleep(0.02)

        threading.Thread(target=loop, daemon=True).start()

    summary = run_daemon(cfg, on_started=watch)
    assert seen_while_running and max(seen_while_running) == 0
    assert summary["completion"]["frames_completed"] > 5
    _assert_equal_products(cfg.out, _reprocessed(tmp_path, cfg.out))


def test_complete_off_leaves_frames_skipped_and_livescope_complete_finishes_them(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address, complete="off")
    summary = run_daemon(cfg)
    assert summary["completion"]["frames_completed"] == 0
    status = read_records(cfg.out / "passthrough")["status"]
    assert (status == STATUS["skipped"]).sum() == summary["frames"]["skipped_frames"] > 5
    done = complete_store(cfg.out)
    assert done["raw"] > 5
    _assert_equal_products(cfg.out, _reprocessed(tmp_path, cfg.out))
    assert complete_store(cfg.out) == {"raw": 0}  # idempotent


def test_a_daemon_killed_mid_completion_is_finished_by_livescope_complete(tmp_path, free_address):
    out = tmp_path / "killed.zarr"
    control = free_address()
    cmd = [
        sys.executable, "-m", "livescope.daemon.cli", "daemon", "--source", "sim", "--frames", "60",
        "--sim-size", "64", "--sim-interval", "0", "--sim-drift", "0.3", "-0.2",
        "--engines", ",".join(ENGINES), "--param", "passthrough.delay_s=0.05",
        "--complete", "after", "--save", "all", "--tune", "off", "--out", str(out),
        "--ingest", free_address(), "--publish", free_address(),
        "--control", control,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from livescope.daemon.control import ControlClient

    client = ControlClient(control, timeout_s=0.5)
    deadline = time.monotonic() + 60
    killed_at = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                st = client.request("status")
            except Exception:
                time.sleep(0.05)
                continue
            completing = st.get("state") == "completing" and st["completion"]["frames_completed"] >= 3
            if completing and st["frames"]["saved"] == 60:  # every raw frame reported saved, products not
                killed_at = st["completion"]
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    if killed_at is None:
        pytest.fail(f"never saw the daemon completing: {proc.stdout.read() if proc.stdout else ''}")
    assert killed_at["frames_to_go"] > 0
    subprocess.run([sys.executable, "-m", "livescope.daemon.cli", "recover", str(out)], check=True, capture_output=True)
    raw_saved = int((read_records(out / "raw")["status"] == STATUS["saved"]).sum())
    product_saved = int((read_records(out / "passthrough")["status"] == STATUS["saved"]).sum())
    assert raw_saved == 60  # reported saved before the kill: on disk after it
    assert product_saved < raw_saved  # the kill left frames to complete
    r = subprocess.run(
        [sys.executable, "-m", "livescope.daemon.cli", "complete", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout[r.stdout.index("{") :])["completed"]["raw"] > 0
    _assert_equal_products(out, _reprocessed(tmp_path, out))  # the delay does not change the pixels


@pytest.mark.parametrize("mode", ["during", "off-then-livescope-complete"])
def test_a_parameter_changed_mid_run_applies_to_the_saved_product_from_the_same_frame(tmp_path, free_address, mode):
    engines = ["deconvolve", "passthrough"]  # deconvolve is per frame: each frame shows its own setting
    params = {"passthrough": {"delay_s": 0.03}}
    complete = "off" if mode != "during" else "during"
    # frames 20 ms apart (the chain takes 30+ ms, so it still skips): the change, made once 15 were
    # received, lands while the live path is mid-run, however late a loaded machine runs its thread
    cfg = _cfg(tmp_path, free_address, engines=engines, engine_params=params, complete=complete, sim_interval_s=0.02)

    def change(pipeline):
        def go():
            while pipeline.received < 15:
                time.sleep(0.005)
            reply = pipeline.handle({"cmd": "set", "engine": "deconvolve", "param": "iterations", "value": 5})
            assert reply["ok"], reply

        threading.Thread(target=go, daemon=True).start()

    summary = run_daemon(cfg, on_started=change)
    assert summary["frames"]["skipped_frames"] > 5
    if mode != "during":
        complete_store(cfg.out)  # replays the change from the provenance
    prov = json.loads((cfg.out / "zarr.json").read_text())["attributes"]["livescope"]["provenance"]
    (ch,) = prov["changes"]
    assert ch["cmd"] == "set" and ch["param"] == "iterations" and ch["value"] == 5
    assert "iterations" not in ch["params_before"]
    (after,) = ch["after"].values()  # one slot: the sim's one channel and plane
    assert 0 <= after < 39
    saved = zarr.open_array(str(cfg.out / "deconvolved" / "0"), mode="r")[...]
    before_out, after_out = tmp_path / "before.zarr", tmp_path / "after.zarr"
    process_file(cfg.out, before_out, engines, params, progress=False, workers=0)
    process_file(cfg.out, after_out, engines, {**params, "deconvolve": {"iterations": 5}}, progress=False, workers=0)
    with_before = to_stored(zarr.open_array(str(before_out / "deconvolved" / "0"), mode="r")[...], saved.dtype)[0]
    with_after = to_stored(zarr.open_array(str(after_out / "deconvolved" / "0"), mode="r")[...], saved.dtype)[0]
    assert not np.array_equal(with_before[after + 1], with_after[after + 1])  # the setting shows
    np.testing.assert_array_equal(saved[: after + 1], with_before[: after + 1])
    np.testing.assert_array_equal(saved[after + 1 :], with_after[after + 1 :])


def test_livescope_complete_on_dask_equals_the_in_order_completion(tmp_path, free_address):
    """`livescope complete STORE --workers 2`: the chain in time chunks with the stateful engines'
    warm-up, the missing frames copied in; the store equals offline reprocessing, as in order."""
    cfg = _cfg(tmp_path, free_address, complete="off")
    summary = run_daemon(cfg)
    skipped = summary["frames"]["skipped_frames"]
    assert skipped > 5
    assert main(["complete", str(cfg.out), "--workers", "2", "--threads"]) == 0
    _assert_equal_products(cfg.out, _reprocessed(tmp_path, cfg.out))
    assert not list(cfg.out.glob(".complete-*"))  # the scratch folder is gone
    assert complete_store(cfg.out, workers=2, processes=False) == {"raw": 0}  # idempotent
