"""One reader for saved movies, as their writers wrote them: TIFF (OME, ImageJ, plain), OME-Zarr
(NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) and NDTiff (Pycro-Manager, read with ``ndstorage``).

The daemon's ``file:`` source and ``livescope process`` both read through :func:`open_movie`.
Axes are named as livescope names them: ``t`` time, ``p`` stage position, ``c`` channel, ``z``
plane, ``y``, ``x``; an axis the file does not have has size 1 (a z-stack alone is one time point).

Where the axes come from:

- TIFF: tifffile's own ``series.axes`` (OME-XML, the ImageJ hyperstack description, tifffile's
  shaped description). An OME-TIFF's several series are stage positions (they must agree).
- OME-Zarr: the multiscales ``axes`` (by name, else by type), the full-resolution dataset; a
  livescope output root reads its ``raw`` images as positions, a bioformats2raw root its series.
- NDTiff: the dataset's axes (time, position, channel, z).

Where the file does not say, livescope decides and says so (a warning), or refuses naming the fix:

- a plain stack (one unknown axis, tifffile's Q/I): time points; ``--axes ZYX`` for planes;
- samples per pixel (tifffile's S: RGB, or grey with extra samples): channels, named R, G, B for
  RGB; ``--axes`` with Z in their place reads them as planes (``--axes YXZ`` for a YXS file);
- several unknown axes, or axes livescope has no place for (angle, phase, lambda, tile ...), or
  samples beside a channel axis: refused with the ``--axes`` that fixes it.

``--axes`` (``axes=`` here) gives the file's axes, one letter per axis in the file's order, from
T, P (stage position), C, Z, Y, X, with Y and X where the file has them.

Sampling (``pixel_size_um``, ``z_step_um``, ``interval_s``) and channel names come from the file's
metadata (:mod:`.files`); what it does not say stays unknown: ``None``, never 1.0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .files import SAMPLING_KEYS

__all__ = ["INDEX_KEYS", "Movie", "MovieArray", "MovieFrame", "open_movie"]

log = logging.getLogger(__name__)

INDEX_KEYS = ("p", "c", "z", "t")  # a frame's index and sizes, as the wire protocol has them
_LETTERS = {"T": "t", "P": "p", "C": "c", "Z": "z", "Y": "y", "X": "x"}  # --axes letters
_RGB = ("R", "G", "B", "A")
_NDTIFF_HINT = "pip install ndstorage"


@dataclasses.dataclass(frozen=True)
class MovieFrame:
    """One plane of a movie with everything known about where it belongs."""

    plane: np.ndarray  # (y, x)
    index: dict[str, int]  # p, c, z, t
    sizes: dict[str, int]  # p, c, z, t
    channel: str | None  # the channel's name, where the file gives one
    sampling: dict[str, float | None]  # pixel_size_um, z_step_um, interval_s (None: unknown)


@dataclasses.dataclass
class Movie:
    """A movie on disk, opened lazily and once per process: picklable (only paths and facts), so a
    Dask task can carry it. ``read`` returns (t, [z,] y, x) blocks of one position and channel in
    livescope's axis order whatever the file's own order is; ``frames`` yields every plane."""

    path: str
    kind: str  # "tiff", "zarr", "ndtiff"
    axes: list[str]  # the file's array axes in livescope's names, in the file's order
    shape: tuple[int, ...]
    dtype: str
    sizes: dict[str, int]  # t, p, c, z, y, x (1 where the file has no such axis)
    has_c: bool
    has_z: bool
    info: dict[str, Any]  # the sampling the file states (keys of files.SAMPLING_KEYS)
    array_path: str = ""  # zarr: the full-resolution array; ndtiff: the dataset folder
    keys: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # ndtiff axis values
    # zarr: one array per position (livescope's own output keeps position p in ``raw_p<p>``)
    position_paths: list[str] = dataclasses.field(default_factory=list)
    # tiff: one OME series per stage position (the OME-TIFF way of storing positions)
    tiff_series: list[int] = dataclasses.field(default_factory=list)
    channels: list[str | None] = dataclasses.field(default_factory=list)  # one name (or None) per channel
    file_axes: str = ""  # the axes as the file (or its reader) spells them: "CZTYX", "tczyx" ...
    # a livescope store's raw image: what the daemon's engines were told of the stream (camera
    # offset and gain, bit depth, binning; ``{}`` for other files), and the image folder per
    # position whose records give each frame's seq and time
    stream: dict[str, Any] = dataclasses.field(default_factory=dict)
    record_paths: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what livescope decided, not the file

    def series(self, p: int = 0) -> int:
        return self.tiff_series[p] if self.tiff_series else 0

    @property
    def sampling(self) -> dict[str, float | None]:
        return {k: self.info.get(k) for k in SAMPLING_KEYS}

    def channel_name(self, c: int) -> str | None:
        return self.channels[c] if c < len(self.channels) else None

    def recorded(self, t: int, p: int, c: int, z: int | None) -> tuple[int, float] | None:
        """A livescope store's (seq, time in s) of this frame as the daemon received it (z None: the
        stack's first plane), or None where the movie has no records or the frame none."""
        if not self.record_paths:
            return None
        rec = _records(self.record_paths[min(p, len(self.record_paths) - 1)])
        lead = (t,) + ((c,) if self.has_c else ()) + ((z or 0,) if self.has_z else ())
        try:
            seq, time_s = int(rec["seq"][lead]), float(rec["time"][lead])
        except (KeyError, IndexError):
            return None
        return (seq, time_s) if seq >= 0 and time_s == time_s else None

    def read(
        self, t0: int, t1: int, c: int, z: int | None, ys: tuple[int, int], xs: tuple[int, int], p: int = 0
    ) -> np.ndarray:
        """Frames t0..t1-1 of position p, channel c, plane z (None: all planes), cropped to ys, xs."""
        if not 0 <= t0 <= t1 <= self.sizes["t"]:
            raise IndexError(f"time points {t0}..{t1} outside 0..{self.sizes['t']} of {self.path}")
        if self.kind == "ndtiff":
            return self._read_ndtiff(t0, t1, c, z, ys, xs, p)
        opened = _opened(self, p)
        idx: list[Any] = []
        keep: list[str] = []
        for a in self.axes:
            if a == "t":
                idx.append(slice(t0, t1))
                keep.append("t")
            elif a == "c":
                idx.append(c)
            elif a == "z":
                if z is None:
                    idx.append(slice(None))
                    keep.append("z")
                else:
                    idx.append(z)
            elif a == "y":
                idx.append(slice(*ys))
                keep.append("y")
            elif a == "x":
                idx.append(slice(*xs))
                keep.append("x")
            else:  # "p": a position axis inside the array
                idx.append(p)
        if isinstance(opened, _TiffPages):
            block = opened.read(self, idx)
        else:
            block = np.asarray(opened[tuple(idx)])
        want = [a for a in ("t", "z", "y", "x") if a in keep]
        block = np.transpose(block, [keep.index(a) for a in want])
        if "t" not in keep:  # one time point: the file has no time axis
            block = np.broadcast_to(block, (t1 - t0, *block.shape))
        return np.ascontiguousarray(block)

    def _read_ndtiff(self, t0, t1, c, z, ys, xs, p) -> np.ndarray:
        ds = _opened(self)
        zs = range(self.sizes["z"]) if z is None else [z]
        out = np.empty((t1 - t0, len(zs), ys[1] - ys[0], xs[1] - xs[0]), dtype=self.dtype)
        for i, t in enumerate(range(t0, t1)):
            for j, zz in enumerate(zs):
                coords = {}
                for name, lead in (("time", "t"), ("channel", "c"), ("z", "z")):
                    if name in self.keys:
                        coords[name] = self.keys[name][{"t": t, "c": c, "z": zz}[lead]]
                if "position" in self.keys:
                    coords["position"] = self.keys["position"][p]
                img = np.asarray(ds.read_image(**coords))
                out[i, j] = img[ys[0] : ys[1], xs[0] : xs[1]]
        return out if z is None else out[:, 0]

    def frames(self, frames: int | None = None) -> Iterator[MovieFrame]:
        """Every plane in acquisition order (time, position, channel, plane), one z-stack read at
        a time; ``frames``: the first time points only."""
        n_t = self.sizes["t"] if frames is None else min(int(frames), self.sizes["t"])
        sizes = {k: self.sizes[k] for k in INDEX_KEYS}
        Y, X = self.sizes["y"], self.sizes["x"]
        sampling = self.sampling
        for t in range(n_t):
            for p in range(self.sizes["p"]):
                for c in range(self.sizes["c"]):
                    stack = self.read(t, t + 1, c, None, (0, Y), (0, X), p)[0]
                    planes = stack if stack.ndim == 3 else stack[None]
                    for z, plane in enumerate(planes):
                        yield MovieFrame(
                            plane=plane,
                            index={"p": p, "c": c, "z": z, "t": t},
                            sizes=sizes,
                            channel=self.channel_name(c),
                            sampling=sampling,
                        )

    def array(self, p: int = 0) -> MovieArray:
        """Position p as a lazily read (t, [c,] [z,] y, x) array (:class:`MovieArray`)."""
        return MovieArray(self, p)

    @property
    def array_axes(self) -> list[str]:
        return ["t"] + (["c"] if self.has_c else []) + (["z"] if self.has_z else []) + ["y", "x"]


class MovieArray:
    """One position of a movie as a (t, [c,] [z,] y, x) array read on demand: ``a[t]``,
    ``a[t0:t1]``, ``a[t0:t1, ...]`` and ``np.asarray(a)`` read only the time points they cover."""

    def __init__(self, movie: Movie, p: int = 0) -> None:
        self.movie, self.p = movie, p
        s = movie.sizes
        self.shape = tuple(
            [s["t"]] + ([s["c"]] if movie.has_c else []) + ([s["z"]] if movie.has_z else []) + [s["y"], s["x"]]
        )
        self.dtype = np.dtype(movie.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        for t in range(len(self)):
            yield self[t]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, slice):
            t0, t1, step = first.indices(len(self))
        elif first is Ellipsis:
            t0, t1, step, rest = 0, len(self), 1, key
        else:
            t = int(first) + (len(self) if int(first) < 0 else 0)
            if not 0 <= t < len(self):
                raise IndexError(f"time point {first} outside 0..{len(self)}")
            return self._read(t, t + 1)[0][rest]
        if step != 1 or t1 < t0:
            return self._read(0, len(self))[t0:t1:step][(slice(None), *rest)]
        return self._read(t0, t1)[(slice(None), *rest)]

    def _read(self, t0: int, t1: int) -> np.ndarray:
        m, Y, X = self.movie, self.movie.sizes["y"], self.movie.sizes["x"]
        parts = [m.read(t0, t1, c, None, (0, Y), (0, X), self.p) for c in range(m.sizes["c"])]
        return np.stack(parts, axis=1) if m.has_c else parts[0]


# ============================================================================ opening


def open_movie(path: str | os.PathLike, axes: str | None = None) -> Movie:
    """The movie at ``path``: a TIFF file, an OME-Zarr folder, or an NDTiff dataset folder (or the
    folder Pycro-Manager made it in). ``axes``: the file's axes when it does not say them or says
    them wrong (``"TZCYX"``, one letter per axis in the file's order; not for NDTiff)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file() and (p.parent / "NDTiff.index").exists():
        p = p.parent  # a file of an NDTiff dataset: the dataset
    if p.is_dir():
        found = [q.parent for q in p.glob("*NDTiff.index")] or [q.parent for q in p.glob("*/NDTiff.index")]
        if len(found) == 1:
            if axes:
                raise ValueError(f"{p}: an NDTiff dataset names its own axes; leave out --axes")
            movie = _open_ndtiff(found[0])
        else:
            movie = _open_zarr(p, axes)
    elif p.suffix.lower() == ".zarr":
        raise ValueError(f"{p} is a file, not an OME-Zarr folder")
    else:
        movie = _open_tiff(p, axes)
    for note in movie.notes:
        log.warning("%s: %s", p, note)
    return movie


def _finish(
    path: str,
    kind: str,
    axes: list[str],
    shape: tuple[int, ...],
    dtype: str,
    info: dict,
    file_axes: str,
    channels: list[str | None] | None = None,
    notes: list[str] | None = None,
    **kw: Any,
) -> Movie:
    unknown = [a for a in axes if a not in ("t", "c", "z", "y", "x", "p")]
    if unknown or "y" not in axes or "x" not in axes or len(set(axes)) != len(axes):
        raise ValueError(
            f"{path}: axes {file_axes!r} ({', '.join(axes)}) are not livescope's t, p, c, z, y, x "
            "(each once): "
            f"give them with --axes, e.g. --axes {_suggest(file_axes)}"
        )
    sizes = {a: int(shape[axes.index(a)]) if a in axes else 1 for a in ("t", "p", "c", "z", "y", "x")}
    if kw.get("position_paths"):
        sizes["p"] = len(kw["position_paths"])
    if kw.get("tiff_series"):
        if "p" in axes:
            raise ValueError(
                f"{path}: a position axis inside OME series that are positions themselves; give --axes without P"
            )
        sizes["p"] = len(kw["tiff_series"])
    names = list(channels or [])
    names = names if len(names) == sizes["c"] else [None] * sizes["c"]
    return Movie(
        path=path,
        kind=kind,
        axes=axes,
        shape=tuple(int(s) for s in shape),
        dtype=str(np.dtype(dtype)),
        sizes=sizes,
        has_c="c" in axes,
        has_z="z" in axes,
        info=info,
        channels=names,
        file_axes=file_axes,
        notes=list(notes or []),
        **kw,
    )


def _suggest(file_axes: str) -> str:
    """``file_axes`` with each letter livescope has no place for replaced by an unused one of T, Z,
    C: what ``--axes`` would most likely say (QQYX -> TZYX, YXS -> YXC, CYXS -> CYXZ)."""
    out, free = [], [a for a in "TZC" if a not in file_axes.upper()]
    for a in file_axes.upper():
        if a in "TZCYXP":
            out.append(a)
        else:
            out.append(free.pop(0) if free else "?")
    return "".join(out)


def _given_axes(given: str, file_axes: str, path: Path) -> list[str]:
    letters = given.strip().upper()
    if (
        len(letters) != len(file_axes)
        or set(letters) - set(_LETTERS)
        or len(set(letters)) != len(letters)
        or not {"Y", "X"} <= set(letters)
    ):
        raise ValueError(
            f"--axes {given}: {path} has {len(file_axes)} axes (it says {file_axes}); give one "
            f"letter per axis, each once, from T, P, C, Z, Y, X, e.g. --axes {_suggest(file_axes)}"
        )
    for a in "YX":
        if a in file_axes.upper() and file_axes.upper().index(a) != letters.index(a):
            raise ValueError(
                f"--axes {given}: the file's {a} axis is axis {file_axes.upper().index(a)} "
                f"({file_axes}); keep Y and X where they are"
            )
    return [_LETTERS[a] for a in letters]


# -- TIFF ----------------------------------------------------------------------------------------


def _tiff_axes(
    series: Any, tif: Any, path: Path, given: str | None
) -> tuple[list[str], list[str | None] | None, list[str]]:
    """The series' axes in livescope's names, channel names it implies (RGB), and what was decided."""
    file_axes = series.axes
    if given:
        return _given_axes(given, file_axes, path), None, [f"axes {file_axes} read as {given.upper()} (--axes)"]
    out: list[str] = []
    unknown: list[int] = []
    for i, a in enumerate(file_axes):
        if a in "TCZYX":
            out.append(a.lower())
        elif a == "S":
            out.append("s")
        elif a in "QI":
            out.append("?")
            unknown.append(i)
        else:
            from tifffile import TIFF

            raise ValueError(
                f"{path}: its axis {a} ({TIFF.AXES_NAMES.get(a, 'unknown')}) in {file_axes} has no "
                f"place in livescope's t, c, z: say what it is with --axes, e.g. --axes "
                f"{_suggest(file_axes)}"
            )
    notes: list[str] = []
    names: list[str | None] | None = None
    stack_at = None
    if unknown:
        if len(unknown) == 1 and "t" not in out and not (tif.is_ome or tif.is_imagej):
            stack_at = unknown[0]
            out[stack_at] = "t"
        else:
            raise ValueError(
                f"{path}: the file does not say what its axes {file_axes} are (Q/I: unknown to "
                f"tifffile): give them with --axes, e.g. --axes {_suggest(file_axes)}"
            )
    samples_at = out.index("s") if "s" in out else None
    if samples_at is not None:
        if "c" in out:
            raise ValueError(
                f"{path}: {series.shape[samples_at]} samples per pixel (S in {file_axes}) beside a "
                f"channel axis: say what the samples are with --axes, e.g. --axes {_suggest(file_axes)}"
            )
        out[samples_at] = "c"

    def instead(i: int) -> str:  # --axes reading axis i as planes (as time points if planes exist)
        letters = [a.upper() for a in out]
        letters[i] = "Z" if "z" not in out else "T"
        return "".join(letters) + (" if they are z planes" if "z" not in out else " if they are time points")

    if stack_at is not None:
        n = series.shape[stack_at]
        notes.append(
            f"a plain stack of {n} planes ({file_axes}: the file names no axes) read as {n} time "
            f"points; give --axes {instead(stack_at)}"
        )
    if samples_at is not None:
        n = series.shape[samples_at]
        rgb = int(getattr(series.keyframe, "photometric", 0)) == 2  # PHOTOMETRIC.RGB
        if rgb and n <= len(_RGB):
            names = list(_RGB[:n])
        notes.append(
            f"{n} {'RGB ' if rgb else ''}samples per pixel ({file_axes}) read as {n} channels"
            + (f" ({', '.join(_RGB[:n])})" if names else "")
            + f"; give --axes {instead(samples_at)}"
        )
    return out, names, notes


def _open_tiff(p: Path, given: str | None = None) -> Movie:
    import tifffile

    from .files import tiff_channel_names, tiff_info

    with tifffile.TiffFile(p) as tif:
        if not tif.series:
            raise ValueError(f"{p}: no images in this TIFF")
        series = tif.series[0]
        axes, names, notes = _tiff_axes(series, tif, p, given)
        info = tiff_info(tif)
        shape, dtype = tuple(series.shape), str(series.dtype)
        several: list[int] = []
        if tif.is_ome and len(tif.series) > 1:  # OME-TIFF keeps each stage position as a series
            for i, other in enumerate(tif.series):
                if tuple(other.shape) != shape or str(other.dtype) != dtype or other.axes != series.axes:
                    raise ValueError(
                        f"{p}: OME series {i} ({other.axes} {other.shape} {other.dtype}) differs "
                        f"from series 0 ({series.axes} {shape} {dtype}); livescope reads the "
                        "series as stage positions of one experiment: split the file first"
                    )
            several = list(range(len(tif.series)))
        n_c = shape[axes.index("c")] if "c" in axes else 1
        if names is None:
            names = tiff_channel_names(tif, 0, n_c)
        if n_c > 8 and not any(names) and not given:
            notes.append(
                f"{n_c} channels with no names ({series.axes}): if they are time points or planes, "
                f"give --axes {series.axes.replace('C', 'T' if 'T' not in series.axes else 'Z')}"
            )
    return _finish(str(p), "tiff", axes, shape, dtype, info, series.axes, names, notes, tiff_series=several)


# -- OME-Zarr ------------------------------------------------------------------------------------


def _open_zarr(p: Path, given: str | None = None) -> Movie:
    import zarr

    from .files import ome_zarr_channel_names, ome_zarr_image, zarr_attrs

    attrs = zarr_attrs(p)
    ome = attrs.get("ome", attrs)
    images = attrs.get("livescope", {}).get("images")
    positions: list[Path] = []
    if images:  # livescope's own root: its raw images (whatever the root's own multiscales say)
        raws = sorted(
            (i for i in images if i.get("product") == "raw" and not i.get("segment")),
            key=lambda i: int(i.get("position") or 0),
        )
        if [int(i.get("position") or 0) for i in raws] != list(range(len(raws))):
            raws = raws[:1]  # positions with gaps: not a set to map one to one
        positions = [p / i["path"] for i in raws] or [p / images[0]["path"]]
    elif "bioformats2raw.layout" in ome and "multiscales" not in ome:  # one image per series
        positions = sorted((q for q in p.iterdir() if q.name.isdigit() and q.is_dir()), key=lambda q: int(q.name))
    if not positions and "multiscales" not in ome and "plate" in ome:
        raise ValueError(f"{p} is an OME-Zarr plate: give one field's image folder (e.g. {p}/A/1/0)")
    image = positions[0] if positions else p
    arr, axes, array_path, info = ome_zarr_image(image)
    file_axes = "".join(a.upper() if len(a) == 1 else "?" for a in axes)  # names livescope lacks: ?
    notes: list[str] = []
    if given:
        axes = _given_axes(given, file_axes, image)
        notes.append(f"axes {file_axes} read as {given.upper()} (--axes)")
    paths: list[str] = []
    if len(positions) > 1:
        if "p" in axes:
            raise ValueError(f"{image}: a position axis inside images that are positions themselves")
        for q in positions:
            other = zarr.open_array(str(q / array_path), mode="r")
            if other.shape != arr.shape or other.dtype != arr.dtype:
                raise ValueError(
                    f"{q}: shape {other.shape} {other.dtype} differs from position 0 "
                    f"({arr.shape} {arr.dtype}); process the positions one by one"
                )
            paths.append(str(q / array_path))
    n_c = arr.shape[axes.index("c")] if "c" in axes else 1
    own = zarr_attrs(image).get("livescope") or {}
    is_raw = own.get("product") == "raw" and (image / "livescope" / "seq").exists()
    return _finish(
        str(image),
        "zarr",
        axes,
        arr.shape,
        str(arr.dtype),
        info,
        file_axes,
        ome_zarr_channel_names(image, n_c),
        notes,
        array_path=str(image / array_path),
        position_paths=paths,
        stream=dict(own.get("stream") or {}) if is_raw else {},
        record_paths=([str(q) for q in positions] or [str(image)]) if is_raw and not given else [],
    )


# -- NDTiff --------------------------------------------------------------------------------------


def _ndtiff_dataset(path: str) -> Any:
    try:
        from ndstorage import Dataset
    except ImportError as exc:
        raise ImportError(
            f"{path} is an NDTiff dataset (Pycro-Manager); reading it needs ndstorage: {_NDTIFF_HINT}"
        ) from exc
    with contextlib.redirect_stdout(io.StringIO()):  # ndstorage prints its index progress
        return Dataset(path)


def _ndtiff_sampling(summary: dict[str, Any], first: dict[str, Any]) -> dict[str, float]:
    """Micro-Manager's summary (and image) metadata keys for the sampling."""
    from .files import positive_or_none

    info: dict[str, float] = {}
    for key, names, factor in (
        ("pixel_size_um", ("PixelSize_um", "PixelSizeUm"), 1.0),
        ("z_step_um", ("z-step_um", "ZStep_um", "z-step-um"), 1.0),
        ("interval_s", ("Interval_ms",), 1e-3),
    ):
        for md in (summary, first):
            value = next((md[n] for n in names if isinstance(md, dict) and n in md), None)
            try:
                v = positive_or_none(float(value) * factor) if value is not None else None
            except (TypeError, ValueError):
                v = None
            if v is not None:
                info[key] = v
                break
    return info


def _open_ndtiff(p: Path) -> Movie:
    ds = _ndtiff_dataset(str(p))
    keys: dict[str, list[Any]] = {}
    for name, values in ds.axes.items():
        names = list(ds.get_channel_names() or []) if name == "channel" else []
        # acquisition order for named channels, numeric order for the rest
        keys[name] = names if len(names) == len(values) else sorted(values)
    unknown = set(keys) - {"time", "channel", "z", "position"}
    if unknown:
        raise ValueError(f"{p}: NDTiff axes {sorted(unknown)} are not supported (time, channel, z, position)")
    first = {k: v[0] for k, v in keys.items()}
    img = np.asarray(ds.read_image(**first))
    first_md: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        first_md = dict(ds.read_metadata(**first) or {})
    info = _ndtiff_sampling(dict(getattr(ds, "summary_metadata", None) or {}), first_md)
    # the axes as livescope names them; NDTiff has no array order (images are looked up by their
    # coordinates), so this order only names the sizes
    named = [("time", "t"), ("position", "p"), ("channel", "c"), ("z", "z")]
    axes = ["t"] + [short for name, short in named[1:] if name in keys] + ["y", "x"]
    shape = tuple(
        [len(keys.get("time", [0]))] + [len(keys[name]) for name, _ in named[1:] if name in keys] + list(img.shape)
    )
    channels = [str(v) if isinstance(v, str) else None for v in keys.get("channel", [])]
    movie = _finish(
        str(p), "ndtiff", axes, shape, str(img.dtype), info, ",".join(keys), channels, array_path=str(p), keys=keys
    )
    with contextlib.suppress(Exception):
        ds.close()
    return movie


# ============================================================================ reading


_OPENED: dict[tuple[str, str], Any] = {}
_RECORDS: dict[str, dict[str, np.ndarray]] = {}


def _records(image_path: str) -> dict[str, np.ndarray]:
    rec = _RECORDS.get(image_path)
    if rec is None:
        from .store import read_records

        rec = _RECORDS[image_path] = read_records(image_path)
    return rec


def _opened(src: Movie, p: int = 0) -> Any:
    """The open file behind ``src`` (position p), once per process."""
    array_path = src.position_paths[p] if src.position_paths else src.array_path
    key = (src.kind, array_path if src.kind == "zarr" else f"{src.path}#{src.series(p)}")
    obj = _OPENED.get(key)
    if obj is None:
        if src.kind == "zarr":
            import zarr

            obj = zarr.open_array(array_path, mode="r")
        elif src.kind == "tiff":
            obj = _open_tiff_series(src, src.series(p))
        else:
            obj = _ndtiff_dataset(src.array_path)
        _OPENED[key] = obj
    return obj


def _open_tiff_series(src: Movie, index: int) -> Any:
    import tifffile

    tif = tifffile.TiffFile(src.path)
    series = tif.series[index]
    if "S" in series.axes or src.axes[-2:] != ["y", "x"]:
        import zarr

        return zarr.open_array(series.aszarr(), mode="r")  # samples inside pages: tifffile's own store
    if series.dataoffset is not None and tuple(series.shape) == tuple(src.shape):
        # uncompressed and contiguous: plain reads at known offsets. Not a memory map: the pages a
        # map touches count as a Dask worker's memory, and Dask would restart it.
        obj = _ContiguousTiff(
            src.path, int(series.dataoffset), tuple(series.shape), np.dtype(series.dtype).newbyteorder(tif.byteorder)
        )
        tif.close()
        return obj
    return _TiffPages(tif, index)  # page by page


class _ContiguousTiff:
    """``a[index]`` on an uncompressed, contiguous TIFF series by reading rows from the file."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    def __getitem__(self, idx: tuple[Any, ...]) -> np.ndarray:
        lead = self.shape[:-2]
        Y, X = self.shape[-2:]
        ys = range(Y)[idx[-2]]
        xs = idx[-1]
        ranges = [range(n)[i] if isinstance(i, slice) else [i] for i, n in zip(idx[:-2], lead, strict=True)]
        out = np.empty([len(r) for r in ranges] + [len(ys), X], dtype=self.dtype.newbyteorder("="))
        row = X * self.dtype.itemsize
        with open(self.path, "rb") as f:
            for pos in np.ndindex(*out.shape[:-2]):
                at = tuple(r[i] for r, i in zip(ranges, pos, strict=True))
                plane = int(np.ravel_multi_index(at, lead)) if lead else 0
                f.seek(self.offset + (plane * Y + ys.start) * row)
                buf = np.frombuffer(f.read(len(ys) * row), dtype=self.dtype).reshape(len(ys), X)
                out[pos] = buf
        out = out[..., xs]
        squeeze = tuple(ax for ax, i in enumerate(idx[:-2]) if not isinstance(i, slice))
        return out.reshape([n for ax, n in enumerate(out.shape) if ax not in squeeze])


class _TiffPages:
    """A TIFF series that cannot be read at known offsets (compressed): read only the pages a
    block covers, one (y, x) plane per page."""

    def __init__(self, tif: Any, series: int) -> None:
        self.tif, self.series = tif, series

    def read(self, src: Movie, idx: list[Any]) -> np.ndarray:
        lead_axes = [a for a in src.axes if a not in ("y", "x")]
        lead_shape = [src.shape[src.axes.index(a)] for a in lead_axes]
        ranges = []
        for a in lead_axes:
            sel = idx[src.axes.index(a)]
            n = src.shape[src.axes.index(a)]
            ranges.append(range(n)[sel] if isinstance(sel, slice) else [sel])
        at = (tuple(r[i] for r, i in zip(ranges, q, strict=True)) for q in np.ndindex(*[len(r) for r in ranges]))
        pages = [int(np.ravel_multi_index(pos, lead_shape)) if lead_shape else 0 for pos in at]
        block = self.tif.asarray(key=pages, series=self.series).reshape(len(pages), *src.shape[-2:])
        ys, xs = idx[src.axes.index("y")], idx[src.axes.index("x")]
        block = block[:, ys, xs]
        kept = [len(r) for r, a in zip(ranges, lead_axes, strict=True) if isinstance(idx[src.axes.index(a)], slice)]
        return block.reshape(*kept, *block.shape[-2:])
