"""What a saved movie's TIFF says about its sampling: pixel size, z step and frame interval.

ImageJ / Fiji TIFFs keep the pixel size as the XResolution tag (pixels per ``unit``) and the z
step and interval in their description (``spacing``, ``finterval``); OME-TIFFs keep
``PhysicalSizeX``/``PhysicalSizeZ`` (with their units) and ``TimeIncrement`` in the OME-XML.
A plain TIFF's resolution tag is a print setting (72 dpi), not a pixel size, and is ignored.
"""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = ["SAMPLING_KEYS", "check_sampling", "ome_zarr_image", "tiff_info", "to_um", "zarr_attrs"]

log = logging.getLogger(__name__)

_UM_PER = {"um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
           "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}
_S_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0, "h": 3600.0}
SAMPLING_KEYS = ("pixel_size_um", "z_step_um", "interval_s")


def check_sampling(values: dict[str, Any]) -> dict[str, float]:
    """The given (not None) sampling values as floats; unknown keys and values that are not
    positive finite numbers are refused, naming the key."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key not in SAMPLING_KEYS:
            raise ValueError(f"unknown sampling key {key!r}: {', '.join(SAMPLING_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or _positive(float(value)) is None:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


def _unit_key(unit: str) -> str:
    u = str(unit).strip()
    if "\\u" in u:  # ImageJ writes the micro sign escaped: '\\u00B5m'
        try:
            u = u.encode("ascii").decode("unicode_escape")
        except UnicodeError:
            pass
    return u.replace("\u00b5", "u").replace("\u03bc", "u").lower()


def to_um(value: float, unit: str | None) -> float | None:
    """``value`` in ``unit`` as micrometres, or None where the unit is not a length livescope knows
    (ImageJ's default 'pixel', 'inch' ...)."""
    if unit is None:
        return float(value)
    factor = _UM_PER.get(_unit_key(unit))
    return None if factor is None else float(value) * factor


def _positive(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) and x > 0 else None


def _seconds(value: str | float, unit: str | None) -> float | None:
    return _positive(float(value) * _S_PER.get(str(unit or "s").strip().lower(), 1.0))


def _imagej(tif: Any) -> dict[str, float]:
    ij = tif.imagej_metadata or {}
    info: dict[str, float] = {}
    unit = ij.get("unit")
    tags = tif.pages[0].tags
    if unit is not None and "XResolution" in tags:
        num, den = tags["XResolution"].value
        if num > 0:
            px = _positive(to_um(den / num, unit))
            if px is not None:
                info["pixel_size_um"] = px
    if ij.get("spacing"):
        dz = _positive(to_um(float(ij["spacing"]), unit))
        if dz is not None:
            info["z_step_um"] = dz
    if ij.get("finterval"):
        dt = _seconds(ij["finterval"], ij.get("tunit"))
        if dt is not None:
            info["interval_s"] = dt
    return info


def _ome(tif: Any) -> dict[str, float]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tif.ome_metadata)
    except (ET.ParseError, TypeError, ValueError) as exc:
        log.warning("unreadable OME-XML in %s (%s): no pixel size from it", tif.filename, exc)
        return {}
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    info: dict[str, float] = {}
    for key, name in (("pixel_size_um", "PhysicalSizeX"), ("z_step_um", "PhysicalSizeZ")):
        if pixels.get(name):
            v = _positive(to_um(float(pixels.get(name)), pixels.get(name + "Unit", "um")))
            if v is not None:
                info[key] = v
    if pixels.get("TimeIncrement"):
        dt = _seconds(pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit"))
        if dt is not None:
            info["interval_s"] = dt
    return info


def tiff_info(tif: Any) -> dict[str, float]:
    """``pixel_size_um``, ``z_step_um``, ``interval_s`` (those the file says) of an open
    ``tifffile.TiffFile``: OME-XML first, then ImageJ's metadata."""
    info: dict[str, float] = {}
    if tif.is_imagej:
        info.update(_imagej(tif))
    if tif.is_ome and tif.ome_metadata:
        info.update(_ome(tif))
    return info


def zarr_attrs(folder: Any) -> dict[str, Any]:
    """The attributes of a zarr group or array folder: v3 ``zarr.json`` or v2 ``.zattrs``."""
    import json
    from pathlib import Path

    d = Path(folder)
    if (d / "zarr.json").exists():
        return json.loads((d / "zarr.json").read_text()).get("attributes", {})
    if (d / ".zattrs").exists():
        return json.loads((d / ".zattrs").read_text())
    return {}


def ome_zarr_image(folder: Any) -> tuple[Any, list[str], str, dict[str, float | None]]:
    """An OME-Zarr image's full-resolution array (opened lazily, read-only), its axes as t, c, z,
    y, x (and p), the array's path inside the image, and its sampling from the first dataset's
    scale: ``pixel_size_um``, ``z_step_um``, ``interval_s`` (None where the axis is absent)."""
    from pathlib import Path

    import zarr

    d = Path(folder)
    attrs = zarr_attrs(d)
    ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        raise ValueError(f"{d} is not an OME-Zarr image (no multiscales metadata); give the image's folder")
    ms = ome["multiscales"][0]
    axes = [(a["name"] if isinstance(a, dict) else a).lower() for a in ms["axes"]]
    axes = [{"time": "t", "channel": "c", "position": "p"}.get(a, a) for a in axes]
    ds = ms["datasets"][0]
    arr = zarr.open_array(str(d / ds["path"]), mode="r")
    info: dict[str, float | None] = {}
    for tr in ds.get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            sc = dict(zip(axes, tr["scale"]))
            info = {"pixel_size_um": sc.get("x"), "z_step_um": sc.get("z"), "interval_s": sc.get("t")}
    return arr, axes, str(ds["path"]), info
