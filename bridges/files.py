"""What a saved movie's TIFF says about its sampling: pixel size, z step and frame interval.

ImageJ / Fiji TIFFs keep the pixel size as the XResolution tag (pixels per ``unit``) and the z
step and interval in their description (``spacing``, ``finterval``); OME-TIFFs keep
``PhysicalSizeX``/``PhysicalSizeZ`` (with their units) and ``TimeIncrement`` in the OME-XML.
A plain TIFF's resolution tag is a print setting (72 dpi), not a pixel size, and is ignored.
OME-Zarr keeps them as the first dataset's scale, counted only where the axis names its unit.
Channel names come from OME-XML ``Channel Name``, NGFF ``omero.channels[].label`` and, for ImageJ,
slice labels that are the same on every plane of a channel. What no metadata says stays unknown
(None), never 1.0. Reading the movies themselves: :mod:`.movies`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = [
    "SAMPLING_KEYS",
    "check_sampling",
    "ome_zarr_channel_names",
    "ome_zarr_image",
    "tiff_channel_names",
    "tiff_info",
    "to_um",
    "zarr_attrs",
]

log = logging.getLogger(__name__)

_UM_PER = {
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "pm": 1e-6,
    "picometer": 1e-6,
    "angstrom": 1e-4,
    "\u00e5": 1e-4,
}
# ImageJ's tunit and OME's TimeIncrementUnit ("s", "ms") and NGFF's names ("second", "millisecond")
_S_PER = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "millisecond": 1e-3,
    "us": 1e-6,
    "microsecond": 1e-6,
    "ns": 1e-9,
    "nanosecond": 1e-9,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or positive_or_none(float(value)) is None:
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


def positive_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) and x > 0 else None


def _seconds(value: str | float, unit: str | None) -> float | None:
    factor = _S_PER.get(_unit_key(unit or "s"))
    if factor is None:
        log.warning("time unit %r is not one livescope knows: the interval is left unknown", unit)
        return None
    return positive_or_none(float(value) * factor)


def _imagej(tif: Any) -> dict[str, float]:
    ij = tif.imagej_metadata or {}
    info: dict[str, float] = {}
    unit = ij.get("unit")
    tags = tif.pages[0].tags
    if unit is not None and "XResolution" in tags:
        num, den = tags["XResolution"].value
        if num > 0:
            px = positive_or_none(to_um(den / num, unit))
            if px is not None:
                info["pixel_size_um"] = px
    if ij.get("spacing") and unit is not None:  # without a unit ImageJ's spacing is in pixels
        dz = positive_or_none(to_um(float(ij["spacing"]), unit))
        if dz is not None:
            info["z_step_um"] = dz
    if ij.get("finterval"):
        dt = _seconds(ij["finterval"], ij.get("tunit"))
        if dt is not None:
            info["interval_s"] = dt
    return info


def _ome_pixels(tif: Any, series: int = 0) -> Any:
    """The ``Pixels`` element of the OME-XML ``Image`` that is tifffile's series ``series``."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tif.ome_metadata)
    except (ET.ParseError, TypeError, ValueError) as exc:
        log.warning("unreadable OME-XML in %s (%s): no pixel size or channel names from it", tif.filename, exc)
        return None
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    pick = images[series] if series < len(images) else (images[0] if images else root)
    return next((el for el in pick.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)


def _ome(tif: Any, series: int = 0) -> dict[str, float]:
    pixels = _ome_pixels(tif, series)
    if pixels is None:
        return {}
    info: dict[str, float] = {}
    for key, name in (("pixel_size_um", "PhysicalSizeX"), ("z_step_um", "PhysicalSizeZ")):
        if pixels.get(name):  # the OME schema's default unit is the micrometre
            v = positive_or_none(to_um(float(pixels.get(name)), pixels.get(name + "Unit", "um")))
            if v is not None:
                info[key] = v
    if pixels.get("TimeIncrement"):
        dt = _seconds(pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit"))
        if dt is not None:
            info["interval_s"] = dt
    return info


def tiff_channel_names(tif: Any, series: int = 0, n_c: int = 1) -> list[str | None]:
    """The ``n_c`` channel names an open ``tifffile.TiffFile`` gives (None where it gives none): the
    OME-XML's ``Channel Name``; an ImageJ hyperstack's slice ``Labels`` where every plane of a
    channel carries the same label (ImageJ has no channel names of its own)."""
    names: list[str | None] = [None] * n_c
    if tif.is_ome and tif.ome_metadata:
        pixels = _ome_pixels(tif, series)
        if pixels is not None:
            channels = [el for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
            if len(channels) == n_c:
                names = [el.get("Name") or None for el in channels]
    elif tif.is_imagej:
        labels = (tif.imagej_metadata or {}).get("Labels")
        if isinstance(labels, list) and labels and len(labels) % n_c == 0:
            # hyperstack planes are stored with the channel fastest (TZCYX)
            per_c = [set(labels[c::n_c]) for c in range(n_c)]
            if all(len(v) == 1 for v in per_c):
                names = [str(next(iter(v))) or None for v in per_c]
    return names


def tiff_info(tif: Any, series: int = 0) -> dict[str, float]:
    """``pixel_size_um``, ``z_step_um``, ``interval_s`` (those the file says) of an open
    ``tifffile.TiffFile``: OME-XML first (of the series' Image), then ImageJ's metadata."""
    info: dict[str, float] = {}
    if tif.is_imagej:
        info.update(_imagej(tif))
    if tif.is_ome and tif.ome_metadata:
        info.update(_ome(tif, series))
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


def _ngff_axis(axis: Any) -> tuple[str, str | None]:
    """An NGFF axis (a dict in 0.4/0.5, a bare name in 0.3) as livescope's name and its unit."""
    if not isinstance(axis, dict):
        return {"time": "t", "channel": "c", "position": "p"}.get(str(axis).lower(), str(axis).lower()), None
    name, kind = str(axis.get("name", "")).lower(), str(axis.get("type", "")).lower()
    name = {"time": "t", "channel": "c", "position": "p"}.get(name, name)
    if name not in ("t", "c", "z", "y", "x", "p") and kind in ("time", "channel"):
        name = kind[0]  # a time or channel axis with a name of its own
    return name, axis.get("unit")


def ome_zarr_image(folder: Any) -> tuple[Any, list[str], str, dict[str, float]]:
    """An OME-Zarr image's full-resolution array (opened lazily, read-only), its axes as t, c, z,
    y, x (and p), the array's path inside the image, and its sampling from the first dataset's
    scale: ``pixel_size_um``, ``z_step_um``, ``interval_s``, those whose axis has a unit (a scale
    without a unit is ome-zarr-py's placeholder 1.0, not a measurement)."""
    from pathlib import Path

    import zarr

    d = Path(folder)
    attrs = zarr_attrs(d)
    ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        raise ValueError(f"{d} is not an OME-Zarr image (no multiscales metadata); give the image's folder")
    ms = ome["multiscales"][0]
    named = [_ngff_axis(a) for a in ms["axes"]]
    axes = [n for n, _ in named]
    units = dict(named)
    ds = ms["datasets"][0]
    arr = zarr.open_array(str(d / ds["path"]), mode="r")
    info: dict[str, float] = {}
    for tr in [*ms.get("coordinateTransformations", []), *ds.get("coordinateTransformations", [])]:
        if tr.get("type") != "scale" or "scale" not in tr:
            continue
        if len(tr["scale"]) != len(axes):
            raise ValueError(
                f"{d}: a scale transformation has {len(tr['scale'])} values for {len(axes)} axes "
                f"({', '.join(axes)}); give one value per axis in its multiscales metadata"
            )
        sc = dict(zip(axes, tr["scale"], strict=True))  # a multiscale-wide scale multiplies the dataset's
        for key, ax, convert in (
            ("pixel_size_um", "x", to_um),
            ("z_step_um", "z", to_um),
            ("interval_s", "t", _seconds),
        ):
            if ax in sc and units.get(ax):
                v = positive_or_none(convert(float(sc[ax]), units[ax]))
                if v is not None:
                    info[key] = info[key] * v if key in info else v
    return arr, axes, str(ds["path"]), info


def ome_zarr_channel_names(folder: Any, n_c: int) -> list[str | None]:
    """The ``n_c`` channel labels of an OME-Zarr image's ``omero`` block (None where absent)."""
    attrs = zarr_attrs(folder)
    omero = attrs.get("ome", attrs).get("omero") or attrs.get("omero") or {}
    channels = omero.get("channels") or []
    if len(channels) != n_c:
        return [None] * n_c
    return [str(c.get("label")) if isinstance(c, dict) and c.get("label") else None for c in channels]
