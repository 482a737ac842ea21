"""napari reader for livescope stores: every image of the store as a layer, with what it went through.

The store's root (a daemon's ``--out`` or ``livescope process``'s output) lists its images in
``zarr.json`` (``livescope.images``); each is an NGFF image (``IMAGE/0``) with per-frame records in
``IMAGE/livescope/`` (``status``, ``seq``, ``time``, ``saturated`` and the engines' per-frame
scalars such as ``novelty``). What napari gets:

- one Image layer per image (product, position, stream, segment), lazily read from the zarr array,
  with its physical scale and units, its channels' names, colours and display windows, and its
  per-frame records in ``layer.metadata["livescope"]["frames"]`` (status by name, seq, time and
  every scalar);
- per group of images that share a stream, position and segment, a Points layer "… frames not
  saved": one marker per time point (and channel, plane) that some image did not save, its text
  saying which and why (skipped, lost, failed, missing), the same in its features;
- the root's events (``provenance.events``) as a Points layer at their centroids and a Shapes
  layer of their boxes, on the raw image of their stream and position, the events' fields as
  features.

A folder is claimed only when its root's attributes hold ``livescope.images``: any other OME-Zarr
(and one image inside a store) is left to napari-ome-zarr.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...bridges.store import STATUS, read_records

__all__ = ["napari_get_reader", "read_store", "is_livescope_store", "STATUS_COLORS"]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
STATUS_NAMES = {v: k for k, v in STATUS.items()}
# the live viewer's colours: skipped amber (by design, raw is kept), lost and failed red, missing grey
STATUS_COLORS = {
    "skipped": (1.0, 0.72, 0.0, 1.0),
    "lost": (1.0, 0.15, 0.15, 1.0),
    "failed": (1.0, 0.0, 0.6, 1.0),
    "missing": (0.6, 0.6, 0.6, 1.0),
}
EVENT_COLOR = "#ff3333"
RECORD_COLUMNS = ("seq", "time", "status", "saturated")


def _root_attrs(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def is_livescope_store(path: str | Path) -> bool:
    """Whether ``path`` is the root of a livescope store (its attributes list livescope images)."""
    p = Path(path)
    if not p.is_dir():
        return False
    attrs = _root_attrs(p)
    ls = (attrs or {}).get("livescope")
    return isinstance(ls, dict) and isinstance(ls.get("images"), list)


def napari_get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader contribution: :func:`read_store` for a livescope store's root, else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, str | Path) or not is_livescope_store(str(path).rstrip("/\\")):
        return None
    return read_store


# -- one image -------------------------------------------------------------------------------
@dataclass
class _Image:
    name: str
    product: str
    position: int
    segment: int
    stream: str  # "" for the first stream (plain names)
    axes: list[str]
    scale: list[float]
    units: list[str | None]
    channels: list[dict[str, Any]]
    array: Any
    records: dict[str, np.ndarray] = field(default_factory=dict)
    stream_facts: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> tuple[str, int, int]:
        return (self.stream, self.position, self.segment)

    @property
    def lead_axes(self) -> list[str]:
        return self.axes[:-2]


def _stream_of(name: str, product: str, position: int, segment: int) -> str:
    """The stream part of an image's name (``denoised_camB_p1_seg2`` -> ``camB``; "" for the first)."""
    rest = name[len(product) :] if name.startswith(product) else ""
    if segment:
        rest = re.sub(rf"_seg{segment}$", "", rest)
    if position:
        rest = re.sub(rf"_p{position}$", "", rest)
    return rest[1:] if rest.startswith("_") else rest


def _load_image(root: Path, entry: Mapping[str, Any]) -> _Image | None:
    import zarr

    name = str(entry["path"])
    ipath = root / name
    try:
        attrs = json.loads((ipath / "zarr.json").read_text(encoding="utf-8"))["attributes"]
        ms = attrs["ome"]["multiscales"][0]
        dataset = ms["datasets"][0]
        array = zarr.open_array(str(ipath / dataset["path"]), mode="r")
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        log.warning("%s: unreadable image (%s); not opened", ipath, exc)
        return None
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"]]
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms["axes"]]
    scales = [t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"]
    scale = [float(s) for s in scales[0]] if scales else [1.0] * len(axes)
    product = str(entry.get("product", name))
    position, segment = int(entry.get("position") or 0), int(entry.get("segment") or 0)
    ls = attrs.get("livescope") or {}
    try:
        records = read_records(ipath)
    except Exception as exc:  # a store being written, or damaged: the pixels still open
        log.warning("%s: unreadable frame records (%s)", ipath, exc)
        records = {}
    return _Image(
        name=name,
        product=product,
        position=position,
        segment=segment,
        stream=_stream_of(name, product, position, segment),
        axes=axes,
        scale=scale,
        units=units,
        channels=list((attrs["ome"].get("omero") or {}).get("channels") or []),
        array=array,
        records=records,
        stream_facts=dict(ls.get("stream") or {}),
    )


def _colormap(color: str | None, name: str) -> Any:
    """An omero channel colour as a napari colormap: white is grey; others black -> colour."""
    from napari.utils.colormaps import Colormap

    hexa = (color or "FFFFFF").lstrip("#").upper()
    if hexa == "FFFFFF" or len(hexa) != 6:
        return "gray"
    rgb = [int(hexa[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    return Colormap([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=f"livescope #{hexa}", display_name=name)


def _frames_table(im: _Image) -> dict[str, np.ndarray]:
    """Per-frame records along the image's lead axes (t[, c][, z]): status by name, every scalar."""
    n_t = int(im.array.shape[0])
    out: dict[str, np.ndarray] = {}
    for key, values in im.records.items():
        arr = np.asarray(values)[:n_t]
        if key == "status":
            names = [STATUS_NAMES.get(int(v), "missing") for v in arr.ravel()]
            arr = np.array(names, dtype=object).reshape(arr.shape)
        out[key] = arr
    return out


def _image_layer(im: _Image, visible: bool) -> LayerData:
    axes, scale, units = list(im.axes), list(im.scale), list(im.units)
    frames = _frames_table(im)
    status = frames.get("status")
    counts = {} if status is None else {k: int((status == k).sum()) for k in STATUS}
    metadata = {
        "livescope": {
            "image": im.name,
            "product": im.product,
            "position": im.position,
            "segment": im.segment,
            "stream": im.stream_facts.get("stream", im.stream),
            "axes": axes,
            "frames": frames,  # per frame along the lead axes: status (by name), seq, time, scalars
            "status_counts": counts,
            "stream_facts": im.stream_facts,
        }
    }
    kwargs: dict[str, Any] = {"metadata": metadata, "visible": visible, "blending": "additive"}
    channels = im.channels or [{"label": im.name, "color": "FFFFFF"}]
    if "c" in axes:
        ci = axes.index("c")
        del axes[ci], scale[ci], units[ci]
        kwargs["channel_axis"] = ci
        kwargs["name"] = [f"{im.name} {ch.get('label', i)}" for i, ch in enumerate(channels)]
        kwargs["colormap"] = [_colormap(ch.get("color"), str(ch.get("label", i))) for i, ch in enumerate(channels)]
        limits = [_limits(im, i, ch) for i, ch in enumerate(channels)]
        if all(lim is not None for lim in limits):
            kwargs["contrast_limits"] = limits
    else:
        kwargs["name"] = im.name
        kwargs["colormap"] = _colormap(channels[0].get("color"), str(channels[0].get("label", im.name)))
        lim = _limits(im, 0, channels[0])
        if lim is not None:
            kwargs["contrast_limits"] = lim
    kwargs["scale"] = scale
    kwargs["axis_labels"] = axes
    kwargs["units"] = [u or "pixel" for u in units]
    return (im.array, kwargs, "image")


def _limits(im: _Image, c: int, channel: Mapping[str, Any]) -> list[float] | None:
    """Display levels: percentiles (0.5, 99.8) of the channel's first saved plane, as the live
    viewer's auto levels; the store's display window (the whole range written) where none is."""
    status = im.records.get("status")
    if status is not None:
        status = np.asarray(status)[: int(im.array.shape[0])]
        if "c" in im.lead_axes:
            status = np.take(status, [c], axis=im.lead_axes.index("c"))
        saved = np.argwhere(status == STATUS["saved"])
        if saved.size:
            lead = [int(i) for i in saved[0]]
            if "c" in im.lead_axes:
                lead[im.lead_axes.index("c")] = c
            try:
                plane = np.asarray(im.array[tuple(lead)], dtype=np.float32)
            except Exception as exc:  # a store being written: the window below will do
                log.debug("%s: first saved plane unreadable (%s)", im.name, exc)
            else:
                finite = plane[::2, ::2][np.isfinite(plane[::2, ::2])]
                if finite.size:
                    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.8)))
                    if hi > lo:
                        return [lo, hi]
    w = channel.get("window") or {}
    try:
        lo, hi = float(w["start"]), float(w["end"])
    except (KeyError, TypeError, ValueError):
        return None
    return [lo, hi] if hi > lo else None


def _spatial(im: _Image) -> tuple[list[str], list[float], list[str]]:
    """Axes, scale and units of the image's layers without the channel axis."""
    keep = [i for i, a in enumerate(im.axes) if a != "c"]
    return (
        [im.axes[i] for i in keep],
        [im.scale[i] for i in keep],
        [im.units[i] or "pixel" for i in keep],
    )


# -- frames not saved ------------------------------------------------------------------------
def _status_layer(group: list[_Image], visible: bool) -> LayerData | None:
    """One marker per (t[, c][, z]) that an image of the group did not save, in the frame's
    centre, its text naming the images and why."""
    ref = next((im for im in group if im.product == "raw"), group[0])
    axes, scale, units = _spatial(ref)
    lead = ref.lead_axes
    h, w = (int(s) for s in ref.array.shape[-2:])
    rows: dict[tuple[int, ...], dict[str, str]] = {}
    for im in group:
        status = im.records.get("status")
        if status is None or list(im.lead_axes) != list(lead):
            continue
        status = np.asarray(status)[: int(im.array.shape[0])]
        for idx in zip(*np.nonzero(status != STATUS["saved"]), strict=True):
            key = tuple(int(i) for i in idx)
            rows.setdefault(key, {})[im.name] = STATUS_NAMES.get(int(status[key]), "missing")
    if not rows:
        return None
    keys = sorted(rows)
    has_c = "c" in lead
    ci = lead.index("c") if has_c else -1
    size = max(2.0, min(h, w) / 12)
    coords, colors, texts = [], [], []
    features: dict[str, list[Any]] = {a: [] for a in lead}
    features.update({"status": [], "images": []})
    names = [im.name for im in group]
    for im_name in names:
        features[im_name] = []
    order = ["failed", "lost", "missing", "skipped"]  # the worst one colours the marker
    for key in keys:
        which = rows[key]
        worst = min(which.values(), key=lambda s: order.index(s) if s in order else len(order))
        by_status: dict[str, list[str]] = {}
        for im_name, st in which.items():
            by_status.setdefault(st, []).append(im_name)
        c = key[ci] if has_c else 0
        lead_coords = [float(v) for i, v in enumerate(key) if i != ci]
        # in the top left corner, clear of the image (raw is often saved where products are not);
        # channels of one plane one below the other, so their markers do not hide each other
        coords.append([*lead_coords, size * (0.75 + 1.5 * c), size * 0.75])
        colors.append(STATUS_COLORS.get(worst, STATUS_COLORS["missing"]))
        label = "; ".join(f"{st}: {', '.join(ims)}" for st, ims in by_status.items())
        texts.append(f"c{c} {label}" if has_c else label)
        for a, v in zip(lead, key, strict=True):
            features[a].append(v)
        features["status"].append(worst)
        features["images"].append(label)
        for im_name in names:
            features[im_name].append(which.get(im_name, "saved"))
    stream, position, segment = ref.group
    where = " ".join(x for x in (stream, f"p{position}" if position else "", f"seg{segment}" if segment else "") if x)
    name = f"frames not saved{' ' + where if where else ''}"
    kwargs = {
        "name": name,
        "features": features,
        "face_color": np.array(colors),
        "border_color": np.array(colors),
        "symbol": "x",
        "size": size,
        "text": {"string": "{images}", "color": "white", "size": 10, "anchor": "upper_left"},
        "scale": scale,
        "axis_labels": axes,
        "units": units,
        "out_of_slice_display": False,
        "visible": visible,
        "metadata": {"livescope": {"kind": "frame_status", "images": names, "status": dict(STATUS)}},
    }
    return (np.array(coords, dtype=float).reshape(len(coords), len(axes)), kwargs, "points")


# -- events --------------------------------------------------------------------------------
def _event_target(event: Mapping[str, Any], raws: list[_Image]) -> _Image | None:
    stream, p = str(event.get("stream") or ""), int(event.get("p") or 0)
    cands = [im for im in raws if im.position == p and im.stream_facts.get("stream", stream) == stream]
    if not cands:
        cands = [im for im in raws if im.position == p] or raws
    seq = event.get("seq")
    if seq is not None and len(cands) > 1:
        for im in cands:
            seqs = im.records.get("seq")
            if seqs is not None and (np.asarray(seqs) == int(seq)).any():
                return im
    return min(cands, key=lambda im: im.segment) if cands else None


def _event_layers(events: list[dict[str, Any]], raws: list[_Image]) -> list[LayerData]:
    by_image: dict[str, tuple[_Image, list[dict[str, Any]]]] = {}
    for ev in events:
        if not isinstance(ev, dict) or "t" not in ev:
            continue
        im = _event_target(ev, raws)
        if im is not None:
            by_image.setdefault(im.name, (im, []))[1].append(ev)
    out: list[LayerData] = []
    for im, evs in by_image.values():
        axes, scale, units = _spatial(im)
        lead = [a for a in im.lead_axes if a != "c"]
        h, w = (int(s) for s in im.array.shape[-2:])
        suffix = "" if im.name == "raw" else f" {im.name}"
        points, boxes = [], []
        for ev in evs:
            lead_coords = [float(ev.get(a) or 0) for a in lead]
            box = ev.get("bbox")
            if ev.get("centroid") is not None:
                cy, cx = (float(v) for v in ev["centroid"])
            elif box is not None:
                cy, cx = (box[0] + box[2] - 1) / 2, (box[1] + box[3] - 1) / 2
            else:
                cy, cx = (h - 1) / 2, (w - 1) / 2
            points.append([*lead_coords, cy, cx])
            if box is not None:
                y0, x0, y1, x1 = (float(v) - 0.5 for v in box)  # end exclusive, pixel centres at integers
                boxes.append(np.array([[*lead_coords, y, x] for y, x in ((y0, x0), (y0, x1), (y1, x1), (y1, x0))]))
        features = _event_features(evs)
        common = {"scale": scale, "axis_labels": axes, "units": units}
        out.append(
            (
                np.array(points, dtype=float).reshape(len(points), len(axes)),
                {
                    **common,
                    "name": f"events{suffix}",
                    "features": features,
                    "symbol": "ring",
                    "size": max(3.0, min(h, w) / 12),
                    "face_color": "transparent",
                    "border_color": EVENT_COLOR,
                    "border_width": 0.15,
                    "text": {"string": "{label}", "color": EVENT_COLOR, "size": 10, "anchor": "upper_left"},
                    "out_of_slice_display": False,
                    "metadata": {"livescope": {"kind": "events", "image": im.name, "events": evs}},
                },
                "points",
            )
        )
        if boxes:
            with_box = [ev for ev in evs if ev.get("bbox") is not None]
            out.append(
                (
                    boxes,
                    {
                        **common,
                        "name": f"event boxes{suffix}",
                        "shape_type": "rectangle",
                        "edge_color": EVENT_COLOR,
                        "face_color": "transparent",
                        "edge_width": max(0.5, min(h, w) / 256),
                        "features": _event_features(with_box),
                        "metadata": {"livescope": {"kind": "event_boxes", "image": im.name}},
                    },
                    "shapes",
                )
            )
    return out


def _event_features(evs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The events' scalar fields as columns (a field an event lacks is None), and a short label."""
    keys: list[str] = []
    for ev in evs:
        keys += [k for k, v in ev.items() if k not in keys and (v is None or isinstance(v, str | int | float | bool))]
    features: dict[str, list[Any]] = {k: [ev.get(k) for ev in evs] for k in keys}
    labels = []
    for ev in evs:
        score = ev.get("score")
        labels.append(f"{ev.get('kind', 'event')}" + (f" {float(score):.3g}" if isinstance(score, int | float) else ""))
    features["label"] = labels
    return features


# -- the store -------------------------------------------------------------------------------
def read_store(path: str | Sequence[str]) -> list[LayerData]:
    """Every image of a livescope store, its frames not saved and its events, as napari layers."""
    if isinstance(path, list | tuple):
        path = path[0]
    root = Path(str(path).rstrip("/\\"))
    attrs = _root_attrs(root) or {}
    ls = attrs.get("livescope") or {}
    images = [im for im in (_load_image(root, e) for e in ls.get("images") or []) if im is not None]
    if not images:
        return []
    # the first stream, position 0, segment 0 shows; the others are there, hidden
    first = min(images, key=lambda im: (im.stream != "", im.position, im.segment)).group
    raws_first = sorted(images, key=lambda im: (im.product != "raw", im.group))
    layers: list[LayerData] = [_image_layer(im, im.group == first) for im in raws_first]
    groups: dict[tuple[str, int, int], list[_Image]] = {}
    for im in images:
        groups.setdefault(im.group, []).append(im)
    for key, group in groups.items():
        layer = _status_layer(group, visible=key == first)
        if layer is not None:
            layers.append(layer)
    events = (ls.get("provenance") or {}).get("events") or []
    raws = [im for im in images if im.product == "raw"] or images
    layers += _event_layers(list(events), raws)
    return layers
