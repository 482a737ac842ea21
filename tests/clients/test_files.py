"""Saved movies read the way their writers wrote them, through the one reader
(``livescope.bridges.movies``) that the daemon's ``file:`` source and ``livescope process`` share.

Each file is written as that writer's own users write it (tifffile with ``ome=True`` /
``imagej=True`` and its metadata dict, ome-zarr-py's ``write_image``, ndstorage's dataset), then
read back: axes, sizes, channel names, sampling (unknown stays None) and every pixel, bit-exact.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import tifffile
import zarr

from livescope.bridges.movies import open_movie
from livescope.bridges.transport import FrameReceiver
from livescope.daemon.cli import main, run_daemon
from livescope.daemon.config import DaemonConfig
from livescope.daemon.sources import FileSource, read_movie

Y, X = 32, 48


def _movie(shape, seed=0, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


def _assert_frames(movie, expect_tczyx: np.ndarray, p: int = 0) -> None:
    """Every frame the reader yields for position p equals ``expect[t, c, z]``; all are yielded."""
    seen = 0
    for f in movie.frames():
        if f.index["p"] != p:
            continue
        np.testing.assert_array_equal(f.plane, expect_tczyx[f.index["t"], f.index["c"], f.index["z"]])
        seen += 1
    assert seen == int(np.prod(expect_tczyx.shape[:3]))
    np.testing.assert_array_equal(np.asarray(movie.array(p)).reshape(expect_tczyx.shape), expect_tczyx)


# ---------------------------------------------------------------------------------- TIFF


@pytest.fixture
def czt_ome_tiff(tmp_path):
    """2 channels, 3 planes, 6 time points stored C, Z, T: the file that lost a channel."""
    data = _movie((2, 3, 6, Y, X))  # c, z, t, y, x
    path = tmp_path / "czt.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "CZTYX",
            "Channel": {"Name": ["GFP", "mCherry"]},
            "PhysicalSizeX": 108.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 108.0,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.4,
            "TimeIncrement": 1500,
            "TimeIncrementUnit": "ms",
        },
    )
    return path, data.transpose(2, 0, 1, 3, 4)  # t, c, z, y, x


def test_ome_tiff_in_c_z_t_order_keeps_every_channel_and_plane(czt_ome_tiff):
    path, expect = czt_ome_tiff
    m = open_movie(path)
    assert m.file_axes == "CZTYX" and m.axes == ["c", "z", "t", "y", "x"]
    assert m.sizes == {"t": 6, "p": 1, "c": 2, "z": 3, "y": Y, "x": X}
    assert m.channels == ["GFP", "mCherry"]
    assert m.sampling == pytest.approx({"pixel_size_um": 0.108, "z_step_um": 0.4, "interval_s": 1.5})
    _assert_frames(m, expect)
    f = next(f for f in m.frames() if f.index == {"p": 0, "c": 1, "z": 2, "t": 4})
    assert f.channel == "mCherry" and f.sizes == {"p": 1, "c": 2, "z": 3, "t": 6}
    data, axes, info = read_movie(path)  # what `livescope fit` reads
    assert axes == ["t", "c", "z", "y", "x"] and info == m.info
    np.testing.assert_array_equal(data[2:4], expect[2:4])


def test_imagej_hyperstack_with_calibration(tmp_path):
    data = _movie((4, 3, 2, Y, X), 1)  # t, z, c
    path = tmp_path / "hyper.tif"
    labels = ["DAPI", "GFP"] * (4 * 3)  # Fiji's slice labels: here the same on each channel's planes
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.065, 1 / 0.065),
        metadata={"axes": "TZCYX", "spacing": 0.25, "unit": "um", "finterval": 30, "tunit": "s", "Labels": labels},
    )
    m = open_movie(path)
    assert m.axes == ["t", "z", "c", "y", "x"] and (m.sizes["t"], m.sizes["z"], m.sizes["c"]) == (4, 3, 2)
    assert m.channels == ["DAPI", "GFP"]
    assert m.sampling == pytest.approx({"pixel_size_um": 0.065, "z_step_um": 0.25, "interval_s": 30.0})
    _assert_frames(m, data.transpose(0, 2, 1, 3, 4))


def test_imagej_z_c_stack_is_one_time_point_of_planes_with_its_z_step(tmp_path):
    """A Fiji Z, C stack is a volume, not a movie: one time point, the z spacing kept."""
    data = _movie((5, 2, Y, X), 2)  # z, c
    path = tmp_path / "zc.tif"
    tifffile.imwrite(
        path, data, imagej=True, resolution=(10.0, 10.0), metadata={"axes": "ZCYX", "spacing": 0.3, "unit": "um"}
    )
    m = open_movie(path)
    assert m.sizes == {"t": 1, "p": 1, "c": 2, "z": 5, "y": Y, "x": X}
    assert m.channels == [None, None]  # ImageJ names no channels here
    assert m.sampling == pytest.approx({"pixel_size_um": 0.1, "z_step_um": 0.3, "interval_s": None})
    assert m.sampling["interval_s"] is None
    _assert_frames(m, data.transpose(1, 0, 2, 3)[None])


def test_plain_stack_is_time_and_says_so(tmp_path, caplog):
    data = _movie((7, Y, X), 3)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data)  # tifffile's default: a shaped stack with no axes (QYX)
    with caplog.at_level(logging.WARNING, logger="livescope.bridges.movies"):
        m = open_movie(path)
    assert m.sizes["t"] == 7 and not m.has_c and not m.has_z
    assert m.sampling == {"pixel_size_um": None, "z_step_um": None, "interval_s": None}  # never 1.0
    assert "read as 7 time points; give --axes ZYX if they are z planes" in caplog.text
    _assert_frames(m, data[:, None, None])
    planes = open_movie(path, axes="ZYX")
    assert planes.sizes["t"] == 1 and planes.sizes["z"] == 7
    _assert_frames(planes, data[None, None])


def test_unknown_axes_are_refused_naming_the_option(tmp_path):
    data = _movie((3, 2, Y, X), 4)
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, data)  # QQYX: tifffile cannot know
    with pytest.raises(ValueError, match="give them with --axes, e.g. --axes TZYX"):
        open_movie(path)
    m = open_movie(path, axes="ZCYX")
    assert (m.sizes["t"], m.sizes["z"], m.sizes["c"]) == (1, 3, 2)
    _assert_frames(m, data.transpose(1, 0, 2, 3)[None])
    with pytest.raises(ValueError, match="keep Y and X where they are"):
        open_movie(path, axes="ZYCX")
    with pytest.raises(ValueError, match="give one letter per axis"):
        open_movie(path, axes="TYX")
    odd = tmp_path / "lambda.tif"
    tifffile.imwrite(odd, data[:, 0], metadata={"axes": "EYX"})  # a spectral axis
    with pytest.raises(ValueError, match=r"axis E \(lambda\).*--axes"):
        open_movie(odd)
    assert open_movie(odd, axes="CYX").sizes["c"] == 3


@pytest.mark.parametrize("layout", ["YXS", "SYX"])
def test_rgb_samples_are_read_as_three_channels(tmp_path, caplog, layout):
    """Three planes tagged RGB become channels R, G, B (logged, with the --axes that reads them as
    z planes instead); nothing is dropped or mixed."""
    planes = _movie((3, Y, X), 5, np.uint8)  # what a user meant as three planes
    path = tmp_path / f"rgb_{layout}.tif"
    if layout == "YXS":
        tifffile.imwrite(path, planes.transpose(1, 2, 0))  # tifffile tags (y, x, 3) uint8 as RGB
    else:
        tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate")
    assert tifffile.TiffFile(path).series[0].axes == layout
    with caplog.at_level(logging.WARNING, logger="livescope.bridges.movies"):
        m = open_movie(path)
    assert m.sizes == {"t": 1, "p": 1, "c": 3, "z": 1, "y": Y, "x": X} and m.channels == ["R", "G", "B"]
    hint = "YXZ" if layout == "YXS" else "ZYX"
    assert f"3 RGB samples per pixel ({layout}) read as 3 channels (R, G, B); give --axes {hint}" in caplog.text
    _assert_frames(m, planes[None, :, None])
    as_z = open_movie(path, axes=hint)
    assert as_z.sizes["z"] == 3 and as_z.sizes["c"] == 1
    _assert_frames(as_z, planes[None, None])


def test_ome_tiff_series_are_positions(tmp_path):
    data = _movie((3, 4, 2, Y, X), 6)  # position, t, c
    path = tmp_path / "positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for pos in data:
            tw.write(pos, metadata={"axes": "TCYX", "Channel": {"Name": ["BF", "GFP"]}}, compression="zlib")
    m = open_movie(path)
    assert m.sizes == {"t": 4, "p": 3, "c": 2, "z": 1, "y": Y, "x": X} and m.channels == ["BF", "GFP"]
    for p in range(3):
        _assert_frames(m, data[p][:, :, None], p=p)


# ---------------------------------------------------------------------------------- OME-Zarr


_WINDOW = {"start": 0, "end": 4000, "min": 0, "max": 65535}


@pytest.mark.parametrize("zarr_format, ngff", [(2, "0.4"), (3, "0.5")])
def test_ome_zarr_written_by_ome_zarr_py_with_its_defaults(tmp_path, zarr_format, ngff):
    """Defaults: a pyramid, scale 1.0 with no units (a placeholder, read as unknown), no names."""
    writer = pytest.importorskip("ome_zarr.writer")
    data = _movie((5, 2, 3, Y, X), 7)
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="w", zarr_format=zarr_format)
    writer.write_image(data, root, axes="tczyx")
    attrs = json.loads((tmp_path / "d.zarr" / (".zattrs" if zarr_format == 2 else "zarr.json")).read_text())
    version = attrs["multiscales"][0]["version"] if zarr_format == 2 else attrs["attributes"]["ome"]["version"]
    assert version == ngff
    m = open_movie(tmp_path / "d.zarr")
    assert m.axes == ["t", "c", "z", "y", "x"] and m.array_path.endswith("s0")  # full resolution
    assert m.sizes == {"t": 5, "p": 1, "c": 2, "z": 3, "y": Y, "x": X}
    assert m.sampling == {"pixel_size_um": None, "z_step_um": None, "interval_s": None}
    assert m.channels == [None, None]
    _assert_frames(m, data)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_with_units_names_and_no_pyramid(tmp_path, zarr_format):
    writer = pytest.importorskip("ome_zarr.writer")
    data = _movie((4, 2, Y, X), 8)
    root = zarr.open_group(str(tmp_path / "u.zarr"), mode="w", zarr_format=zarr_format)
    writer.write_image(
        data,
        root,
        axes="tcyx",
        scale_factors=[],
        scale={"t": 250.0, "y": 0.2, "x": 0.2},
        axes_units={"t": "millisecond", "y": "micrometer", "x": "micrometer"},
        omero={
            "channels": [
                {"label": "GFP", "color": "00FF00", "window": _WINDOW},
                {"label": "mCherry", "color": "FF00FF", "window": _WINDOW},
            ]
        },
    )
    m = open_movie(tmp_path / "u.zarr")
    assert m.sizes == {"t": 4, "p": 1, "c": 2, "z": 1, "y": Y, "x": X}
    assert m.channels == ["GFP", "mCherry"]
    assert m.sampling == pytest.approx({"pixel_size_um": 0.2, "z_step_um": None, "interval_s": 0.25})
    _assert_frames(m, data[:, :, None])


def test_ome_zarr_scale_with_a_value_missing_names_the_fix(tmp_path):
    """A scale with fewer values than axes is refused, not read shifted onto the wrong axes."""
    writer = pytest.importorskip("ome_zarr.writer")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    writer.write_image(
        _movie((2, Y, X), 3),
        root,
        axes="tyx",
        scale_factors=[],
        scale={"t": 2.0, "y": 0.3, "x": 0.3},
        axes_units={"t": "second", "y": "micrometer", "x": "micrometer"},
    )
    meta_path = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    scale = meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["type"] == "scale" and len(scale["scale"]) == 3
    scale["scale"] = scale["scale"][1:]  # y and x only: read plainly, y's 0.3 would become t's
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"2 values for 3 axes \(t, y, x\); give one value per axis"):
        open_movie(tmp_path / "s.zarr")


# ---------------------------------------------------------------------------------- NDTiff


def test_ndtiff_with_channel_names_and_micro_manager_sampling(tmp_path):
    ndstorage = pytest.importorskip("ndstorage", reason="NDTiff needs ndstorage: pip install ndstorage")
    data = _movie((3, 2, 2, Y, X), 9)  # t, c, z
    ds = ndstorage.NDTiffDataset(str(tmp_path / "nd"), name="acq", writable=True)
    ds.initialize({"PixelSize_um": 0.11, "z-step_um": 0.5, "Interval_ms": 2000, "ChNames": ["DAPI", "FITC"]})
    for t, c, z in np.ndindex(*data.shape[:3]):
        ds.put_image(
            {"time": t, "channel": ["DAPI", "FITC"][c], "z": z},
            data[t, c, z],
            {"PixelType": "GRAY16", "Width": X, "Height": Y, "BitDepth": 16},
        )
    ds.finish()
    m = open_movie(tmp_path / "nd")
    assert m.kind == "ndtiff" and m.sizes == {"t": 3, "p": 1, "c": 2, "z": 2, "y": Y, "x": X}
    assert m.channels == ["DAPI", "FITC"]
    assert m.sampling == pytest.approx({"pixel_size_um": 0.11, "z_step_um": 0.5, "interval_s": 2.0})
    _assert_frames(m, data)


def test_ndtiff_without_ndstorage_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "nd").mkdir()
    (tmp_path / "nd" / "NDTiff.index").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ndstorage", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install ndstorage"):
        open_movie(tmp_path / "nd")


# ---------------------------------------------------------------------------------- end to end


def _store(path, image="raw") -> np.ndarray:
    return zarr.open_array(str(path / image / "0"), mode="r")[...]


def test_process_keeps_both_channels_and_every_plane(tmp_path, czt_ome_tiff):
    path, expect = czt_ome_tiff
    assert (
        main(["process", str(path), "--out", str(tmp_path / "p.zarr"), "--workers", "0", "--engines", "passthrough"])
        == 0
    )
    raw = _store(tmp_path / "p.zarr")
    assert raw.shape == (6, 2, 3, Y, X)  # t, c, z, y, x
    np.testing.assert_array_equal(raw, expect)
    np.testing.assert_array_equal(_store(tmp_path / "p.zarr", "passthrough"), expect.astype(np.float32))
    attrs = json.loads((tmp_path / "p.zarr" / "raw" / "zarr.json").read_text())["attributes"]["ome"]
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["GFP", "mCherry"]


def test_process_axes_option_reads_what_the_file_does_not_say(tmp_path, capsys):
    data = _movie((3, 2, Y, X), 10)
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, data)
    assert main(["process", str(path), "--out", str(tmp_path / "a.zarr"), "--workers", "0"]) != 0
    assert "--axes" in capsys.readouterr().err
    assert main(["process", str(path), "--out", str(tmp_path / "b.zarr"), "--workers", "0", "--axes", "TCYX"]) == 0
    np.testing.assert_array_equal(_store(tmp_path / "b.zarr"), data)


def test_daemon_replay_keeps_both_channels_and_every_plane(tmp_path, free_address, czt_ome_tiff):
    path, expect = czt_ome_tiff
    cfg = DaemonConfig(
        source=f"file:{path}", out=tmp_path / "d.zarr", ingest=free_address(), publish=None, control=None
    )
    summary = run_daemon(cfg)
    assert summary["frames"]["received"] == summary["frames"]["saved"] == 36
    raw = _store(tmp_path / "d.zarr")
    assert raw.shape == (6, 2, 3, Y, X)
    np.testing.assert_array_equal(raw, expect)


def test_file_source_sends_index_sizes_channel_and_sampling(tmp_path, free_address, czt_ome_tiff):
    """What the replay puts on the wire, received on a real socket: every plane once, with its
    {p, c, z, t}, the sizes, its channel's name and the file's sampling."""
    path, expect = czt_ome_tiff
    address = free_address()
    receiver = FrameReceiver(address)
    source = FileSource(DaemonConfig(source=f"file:{path}", ingest=address), path)
    try:
        source.start()
        got = []
        for _ in range(400):
            frame = receiver.recv(100)
            if frame is not None and frame.is_end:
                break
            if frame is not None:
                got.append(frame)
    finally:
        source.stop()
        receiver.close()
    assert len(got) == 36
    seen = set()
    for frame in got:
        h, i = frame.header, frame.header["index"]
        assert h["sizes"] == {"p": 1, "c": 2, "z": 3, "t": 6}
        assert h["channel"] == ["GFP", "mCherry"][i["c"]]
        assert h["pixel_size_um"] == pytest.approx(0.108) and h["z_step_um"] == pytest.approx(0.4)
        assert h["interval_s"] == pytest.approx(1.5) and h["time"] == pytest.approx(1.5 * i["t"])
        np.testing.assert_array_equal(frame.array, expect[i["t"], i["c"], i["z"]])
        seen.add((i["p"], i["c"], i["z"], i["t"]))
    assert len(seen) == 36


def test_file_source_axes_for_a_file_that_does_not_say_them(tmp_path, free_address):
    data = _movie((3, 2, Y, X), 11)
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, data)
    address = free_address()
    with pytest.raises(ValueError, match="--axes"):
        FileSource(DaemonConfig(source=f"file:{path}", ingest=address), path)
    receiver = FrameReceiver(address)
    source = FileSource(DaemonConfig(source=f"file:{path}", ingest=address), path, axes="ZCYX")
    try:
        source.start()
        got = []
        for _ in range(400):
            frame = receiver.recv(100)
            if frame is not None and frame.is_end:
                break
            if frame is not None:
                got.append(frame)
    finally:
        source.stop()
        receiver.close()
    assert len(got) == 6
    for frame in got:
        i = frame.header["index"]
        assert frame.header["sizes"] == {"p": 1, "c": 2, "z": 3, "t": 1} and "pixel_size_um" not in frame.header
        np.testing.assert_array_equal(frame.array, data[i["z"], i["c"]])
