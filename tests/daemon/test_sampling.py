"""A saved movie's sampling (pixel size, z step, interval) is read from its TIFF metadata (ImageJ,
OME), can be overridden on the command line, and reaches the engines and the output's scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from livescope.bridges.files import to_um
from livescope.daemon.cli import main
from livescope.daemon.distributed import open_source
from livescope.daemon.process import process_file
from livescope.daemon.sources import read_movie


def _scale(store: Path, image: str = "raw") -> dict[str, float]:
    meta = json.loads((store / image / "zarr.json").read_text())
    ms = meta["attributes"]["ome"]["multiscales"][0]
    names = [a["name"] for a in ms["axes"]]
    scale = next(t for t in ms["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")["scale"]
    return dict(zip(names, scale, strict=True))


def _movie(shape=(3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(0).integers(100, 1000, shape, dtype=np.uint16)


def test_units() -> None:
    assert to_um(1.0, "\\u00B5m") == 1.0  # ImageJ's escaped micro sign
    assert to_um(1.0, "\u00b5m") == to_um(1.0, "micron") == to_um(1.0, "um") == 1.0
    assert to_um(250.0, "nm") == pytest.approx(0.25)
    assert to_um(1.0, "pixel") is None and to_um(1.0, "inch") is None


def test_the_real_bead_stack_says_its_voxel_size(real_data) -> None:
    """Bead_Image1_crop.tif (ImageJ): XResolution 44.46 px per um, spacing 0.125 um."""
    src = open_source(real_data / "Bead_Image1_crop.tif")
    assert src.info["pixel_size_um"] == pytest.approx(0.02249, abs=1e-5)
    assert src.info["z_step_um"] == pytest.approx(0.125)
    _, _, info = read_movie(real_data / "Bead_Image1_crop.tif")  # the daemon's file source
    assert info == src.info


def test_imagej_ome_and_plain_tiffs(tmp_path) -> None:
    movie = _movie()
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij,
        movie,
        imagej=True,
        resolution=(1 / 0.108, 1 / 0.108),
        metadata={"axes": "TYX", "unit": "um", "finterval": 2.5},
    )
    assert open_source(ij).info == pytest.approx({"pixel_size_um": 0.108, "interval_s": 2.5})
    ome = tmp_path / "m.ome.tif"
    tifffile.imwrite(
        ome,
        movie[:, None],
        ome=True,
        metadata={
            "axes": "TZYX",
            "PhysicalSizeX": 65.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 65.0,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.3,
            "TimeIncrement": 500,
            "TimeIncrementUnit": "ms",
        },
    )
    assert open_source(ome).info == pytest.approx({"pixel_size_um": 0.065, "z_step_um": 0.3, "interval_s": 0.5})
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, movie, photometric="minisblack", resolution=(72, 72))  # a print setting, not a pixel size
    assert open_source(plain).info == {}


def test_sampling_override_reaches_the_engines_and_the_output(tmp_path, capsys) -> None:
    movie = _movie((2, 48, 48))
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, movie, photometric="minisblack")
    # the widefield PSF model needs a pixel size the file does not give: refused, saying how
    assert (
        main(
            [
                "process",
                str(path),
                "--out",
                str(tmp_path / "a.zarr"),
                "--workers",
                "0",
                "--engines",
                "deconvolve",
                "--na",
                "0.8",
            ]
        )
        != 0
    )
    assert "pixel size" in capsys.readouterr().err
    assert (
        main(
            [
                "process",
                str(path),
                "--out",
                str(tmp_path / "b.zarr"),
                "--workers",
                "0",
                "--engines",
                "deconvolve",
                "--na",
                "0.8",
                "--pixel-size",
                "0.1",
                "--interval",
                "2",
            ]
        )
        == 0
    )
    scale = _scale(tmp_path / "b.zarr", "deconvolved")
    assert scale["x"] == scale["y"] == pytest.approx(0.1) and scale["t"] == pytest.approx(2.0)
    # an override replaces what the file says; a nonsense value is refused before any work
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, movie, imagej=True, resolution=(10, 10), metadata={"axes": "TYX", "unit": "um"})
    assert open_source(ij, {"pixel_size_um": 0.2, "z_step_um": None}).info == {"pixel_size_um": 0.2}
    with pytest.raises(ValueError, match="pixel_size_um must be a positive number"):
        process_file(
            ij, tmp_path / "c.zarr", ["passthrough"], workers=0, progress=False, sampling={"pixel_size_um": -1}
        )
    assert not (tmp_path / "c.zarr").exists()


def test_daemon_fills_in_the_pixel_size_a_replayed_plain_tiff_lacks(tmp_path, free_address) -> None:
    from livescope.daemon.cli import run_daemon
    from livescope.daemon.config import DaemonConfig

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _movie((3, 48, 48)), photometric="minisblack")

    def cfg(**kw):
        return DaemonConfig(
            source=f"file:{path}",
            out=tmp_path / f"{len(kw)}.zarr",
            ingest=free_address(),
            publish=None,
            control=None,
            engines=["deconvolve"],
            engine_params={"deconvolve": {"na": 0.8}},
            **kw,
        )

    # without it the widefield model cannot be built: the engine is reported off, frames still saved
    summary = run_daemon(cfg())
    assert summary["frames"]["saved"] == 3
    assert "pixel size" in summary["engines"]["deconvolve"]["reason"]
    summary = run_daemon(cfg(pixel_size_um=0.1))
    assert summary["frames"]["saved"] == 3 and summary["engines"]["deconvolve"]["enabled"]
    assert _scale(tmp_path / "1.zarr", "deconvolved")["x"] == pytest.approx(0.1)


def test_daemon_refuses_a_nonsense_pixel_size() -> None:
    from livescope.daemon.config import load_config

    with pytest.raises(ValueError, match="pixel_size_um must be a positive number"):
        load_config(None, pixel_size_um=-0.1)
    assert load_config(None, z_step_um=0.3).z_step_um == 0.3
