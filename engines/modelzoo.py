"""BioImage Model Zoo packages as livescope models: read one, run it on every backend.

A package is a folder with ``rdf.yaml`` (or ``*.bioimageio.yaml``), that YAML file itself, or the
zip of both; format 0.4 and 0.5 (0.4 is converted by ``bioimageio.spec``, which reads and checks
the description: ``pip install "livescope[bioimageio]"``). :func:`load_model` takes either a
package or a livescope ``.lsmodel`` file, so the engines take both for ``model=``.

What runs, and how it maps onto livescope:

- one input and one output tensor, 2-D, one channel: axes ``batch`` / ``channel`` (size 1),
  ``y`` and ``x`` in any order (``bcyx``, ``byx``, ``yx``, ``byxc``...); a ``z``, ``time`` or
  several channels is refused with the reason;
- weights: ``onnx`` for onnxruntime and TensorRT (the same bytes, the same path as a
  ``.lsmodel``'s graph), ``torchscript`` for torch; ``pytorch_state_dict`` for torch when the
  architecture's library imports (CAREamics' own export, with ``careamics`` installed). A backend
  that has no weights it can run is passed over down the usual order with one log line;
- sizes: ``min`` and ``step`` of parameterised axes (frames are padded up to a valid size and the
  output cropped), a fixed size (tiles of exactly that size), the output's ``halo`` (tiles
  overlap by at least it);
- pre- and postprocessing, computed as bioimageio.core does (numpy, float32): ``binarize``,
  ``clip`` (values or percentiles), ``ensure_dtype``, ``fixed_zero_mean_unit_variance``,
  ``zero_mean_unit_variance`` (per sample), ``scale_linear``, ``scale_range`` (percentiles, of
  the tensor or of the unprocessed input as ``reference_tensor``), ``scale_mean_variance``
  (to the unprocessed input), ``sigmoid``. Per-sample statistics are the whole frame's, taken on
  every frame (a Model Zoo sample is one frame), before tiling.

A :class:`BioImageModel` is a :class:`~.modelfile.ModelFile` (``.onnx``, ``.hash``, ``.k`` = 0,
``.multiple``, ``build_torch()``), so :class:`~.inference.Runner` and its backends run it; the
layout and padding live in :class:`BioImageRunner`, the processing in :meth:`BioImageModel.preprocess`
and :meth:`BioImageModel.postprocess`. Writing packages: :mod:`.modelzoo_export`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import modelfile
from .base import EngineError
from .inference import Runner, run_tiled
from .modelfile import ModelFile, ModelFileError

__all__ = [
    "INSTALL_HINT",
    "BioImageModel",
    "BioImageRunner",
    "is_package",
    "load",
    "load_model",
    "make_runner",
]

log = logging.getLogger(__name__)

INSTALL_HINT = 'install the Model Zoo reader: pip install "livescope[bioimageio]"'
_CANONICAL = "bcyx"  # livescope's layout: (n, c, h, w)
_EPS = 1e-6  # bioimageio.core's epsilon where the description has none (fixed_zero_mean_unit_variance)


# --------------------------------------------------------------------------- finding packages


def _is_rdf_name(name: str) -> bool:
    name = name.lower()
    return name in ("rdf.yaml", "bioimageio.yaml") or name.endswith(".bioimageio.yaml")


def _rdf_in_folder(folder: Path) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.is_file() and _is_rdf_name(p.name))
    return found[0] if found else None


def is_package(path: str | Path | None) -> bool:
    """A Model Zoo package: a ``.yaml``/``.yml`` file, a folder holding ``rdf.yaml`` (or
    ``*.bioimageio.yaml``), or a zip with one at its top level. Reads no more than a zip's index."""
    if path is None:
        return False
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        return True
    if p.is_dir():
        return _rdf_in_folder(p) is not None
    if p.is_file() and zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as zf:
                return any("/" not in n and _is_rdf_name(n) for n in zf.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def load_model(path: str | Path | None = None) -> ModelFile:
    """A Model Zoo package (:func:`load`) or a livescope model file (``None``: the shipped default)."""
    if is_package(path):
        assert path is not None
        return load(path)
    return modelfile.load(path)


# --------------------------------------------------------------------------- processing


def _reduce_axes(axes: Sequence[str] | None, roles: dict[str, str]) -> tuple[int, ...]:
    """Axis ids of the description -> positions in the canonical (b, c, y, x) array."""
    if axes is None:
        return (0, 1, 2, 3)
    out = []
    for a in axes:
        role = roles.get(str(a))
        if role is None:
            raise ModelFileError(f"processing names axis {a!r}, which the tensor does not have")
        out.append(_CANONICAL.index(role))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class _Op:
    """One pre- or postprocessing step on a canonical (1, 1, h, w) float array. ``raw`` is the
    unprocessed input, for steps that take their statistics from a ``reference_tensor``."""

    name: str
    kwargs: dict[str, Any]
    roles: dict[str, str]
    reference: bool = False  # statistics of the unprocessed input rather than of the tensor itself

    def _along(self, value: Any) -> Any:
        """A scalar, or per-entry values along one axis, broadcast on the canonical layout."""
        if not isinstance(value, list | tuple):
            return np.float32(value)
        arr = np.asarray(value, np.float32)
        if arr.size == 1:
            return arr.reshape(())
        shape = [1, 1, 1, 1]
        shape[_CANONICAL.index(self.roles[str(self.kwargs["axis"])])] = arr.size
        return arr.reshape(shape)

    def _quantiles(self, x: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        axes = _reduce_axes(self.kwargs.get("axes"), self.roles)
        q = np.percentile(x.astype(np.float64), [lo, hi], axis=axes, keepdims=True)  # linear, as bioimageio.core
        return q[0].astype(np.float32), q[1].astype(np.float32)

    def _mean_std(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        axes = _reduce_axes(self.kwargs.get("axes"), self.roles)
        x64 = x.astype(np.float64)
        return x64.mean(axis=axes, keepdims=True).astype(np.float32), x64.std(axis=axes, keepdims=True).astype(
            np.float32
        )

    def apply(self, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
        k = self.kwargs
        name = self.name
        if name == "scale_linear":
            return x * self._along(k.get("gain", 1.0)) + self._along(k.get("offset", 0.0))
        if name == "fixed_zero_mean_unit_variance":
            return (x - self._along(k["mean"])) / (self._along(k["std"]) + np.float32(_EPS))
        if name == "zero_mean_unit_variance":
            mean, std = self._mean_std(x)
            return (x - mean) / (std + np.float32(k.get("eps", _EPS)))
        if name == "scale_range":
            lo, hi = self._quantiles(
                raw if self.reference else x, k.get("min_percentile", 0.0), k.get("max_percentile", 100.0)
            )
            return (x - lo) / (hi - lo + np.float32(k.get("eps", _EPS)))
        if name == "scale_mean_variance":
            mean, std = self._mean_std(x)
            ref_mean, ref_std = self._mean_std(raw)
            eps = np.float32(k.get("eps", _EPS))
            return (x - mean) / (std + eps) * (ref_std + eps) + ref_mean
        if name == "clip":
            bounds: list[Any] = [k.get("min"), k.get("max")]
            if k.get("min_percentile") is not None or k.get("max_percentile") is not None:
                qlo, qhi = self._quantiles(x, k.get("min_percentile") or 0.0, k.get("max_percentile") or 100.0)
                bounds[0] = qlo if k.get("min_percentile") is not None else bounds[0]
                bounds[1] = qhi if k.get("max_percentile") is not None else bounds[1]
            return np.clip(x, bounds[0], bounds[1])
        if name == "binarize":
            return (x > self._along(k["threshold"])).astype(np.float32)
        if name == "sigmoid":
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        if name == "ensure_dtype":
            return x.astype(k["dtype"])
        raise AssertionError(name)  # refused at load


_SUPPORTED_OPS = (
    "binarize",
    "clip",
    "ensure_dtype",
    "fixed_zero_mean_unit_variance",
    "zero_mean_unit_variance",
    "scale_linear",
    "scale_range",
    "scale_mean_variance",
    "sigmoid",
)


def _ops(steps: Sequence[Any], roles: dict[str, str], where: str, input_id: str) -> list[_Op]:
    ops = []
    for step in steps:
        name = str(step.id)
        if name not in _SUPPORTED_OPS:
            raise ModelFileError(
                f"the package's {where} step {name!r} is not one livescope runs (it runs {', '.join(_SUPPORTED_OPS)})"
            )
        kwargs = step.kwargs.model_dump(mode="json") if getattr(step, "kwargs", None) is not None else {}
        ref = kwargs.pop("reference_tensor", None)
        if name == "scale_mean_variance" and ref is None:
            raise ModelFileError(f"{where} scale_mean_variance without a reference tensor")
        if ref is not None and str(ref) != input_id:
            raise ModelFileError(f"{where} step {name!r} refers to tensor {ref!r}, not the input {input_id!r}")
        ops.append(_Op(name, kwargs, roles, reference=ref is not None))
    return ops


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass
class BioImageModel(ModelFile):
    """A Model Zoo package, runnable like a livescope model file (see the module docstring).

    ``onnx`` is empty when the package has no ONNX weights; ``weights`` (livescope's state dict)
    is always empty."""

    source: str = ""
    torchscript: bytes | None = None
    state_dict: bytes | None = None
    architecture: dict[str, Any] | None = None
    input_axes: str = "bcyx"
    output_axes: str = "bcyx"
    min_size: tuple[int, int] = (1, 1)
    step: tuple[int, int] = (1, 1)
    fixed_size: tuple[int, int] | None = None
    halo: int = 0
    net_dtype: str = "float32"
    preprocessing: list[_Op] = dataclasses.field(default_factory=list)
    postprocessing: list[_Op] = dataclasses.field(default_factory=list)
    weights_sha256: str = ""

    @property
    def hash(self) -> str:
        return self.weights_sha256[:16]

    @property
    def k(self) -> int:
        return 0

    @property
    def multiple(self) -> int:
        if self.fixed_size is not None:
            return 1  # the runner pads every tile to the fixed size
        return math.lcm(*self.step)

    @property
    def task(self) -> str:
        return "denoise"  # an image-to-image model; the denoise engine runs it

    @property
    def formats(self) -> list[str]:
        have = {"onnx": bool(self.onnx), "torchscript": self.torchscript is not None}
        have["pytorch_state_dict"] = self.state_dict is not None
        return [name for name, ok in have.items() if ok]

    @property
    def provenance(self) -> dict[str, Any]:
        """What ``describe()`` shows: the package's id, name, version, weights and their hash."""
        meta = self.metadata["bioimageio"]
        keys = ("id", "name", "version", "format_version", "authors", "license")
        return {"format": "bioimageio", **{k: meta.get(k) for k in keys}, "weights": self.formats, "hash": self.hash}

    def to_bytes(self) -> bytes:
        raise ModelFileError(
            "a BioImage Model Zoo package is not rewritten as a .lsmodel; use it as it is (model=PATH/rdf.yaml)"
        )

    def build_torch(self) -> Any:
        """TorchScript weights, else the state dict in its architecture (the library must import)."""
        import torch

        if self.torchscript is not None:
            return torch.jit.load(io.BytesIO(self.torchscript), map_location="cpu").eval()
        if self.state_dict is not None and self.architecture is not None:
            return _state_dict_net(self.architecture, self.state_dict)
        raise EngineError(f"the package {self.source} has no weights torch runs (it has {', '.join(self.formats)})")

    # ---------------------------------------------------------------- processing

    def _canonical(self, frame: np.ndarray) -> np.ndarray:
        return np.asarray(frame)[None, None]

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        """A (h, w) frame -> the network's (1, h, w) float32 input, with this frame's statistics."""
        raw = self._canonical(np.asarray(frame, dtype=np.float32))
        x = raw
        for op in self.preprocessing:
            x = op.apply(x, raw)
        return np.ascontiguousarray(x[0], dtype=np.float32)

    def postprocess(self, y: np.ndarray, frame: np.ndarray) -> np.ndarray:
        """The network's (h, w) output -> the model's output for ``frame`` (float32)."""
        raw = self._canonical(np.asarray(frame, dtype=np.float32))
        out = np.asarray(y, dtype=np.float32)[None, None]
        for op in self.postprocessing:
            out = op.apply(out, raw)
        return np.asarray(out[0, 0], dtype=np.float32)

    def predict(
        self, frame: np.ndarray, run: Callable[[np.ndarray], np.ndarray], *, tile: int = 0, overlap: int = 0
    ) -> np.ndarray:
        """The whole model on one frame: preprocessing, the network in tiles, postprocessing."""
        x = self.preprocess(frame)
        if self.fixed_size is not None:
            tile = max(self.fixed_size)
        overlap = max(int(overlap), 2 * self.halo)
        y = run_tiled(run, x, multiple=self.multiple, tile=tile, overlap=overlap)
        return self.postprocess(y, frame)


def _state_dict_net(architecture: dict[str, Any], data: bytes) -> Any:
    import importlib

    import torch

    module, name = architecture["import_from"], architecture["callable"]
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise EngineError(
            f"the package's only torch weights are a state dict for {module}.{name}, which does not import "
            f"here ({exc}); install that library, or add TorchScript/ONNX weights to the package with "
            "bioimageio.core (`bioimageio.core.weight_converters.add_weights`)"
        ) from exc
    net = factory(**architecture.get("kwargs", {}))
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


# --------------------------------------------------------------------------- reading


def _axes(axes: Sequence[Any], what: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Letters of the tensor's axes in its order, axis id -> letter, and the y/x axis objects."""
    letters, roles, space = [], {}, {}
    for axis in axes:
        kind, aid = str(axis.type), str(axis.id)
        if kind == "batch":
            letter = "b"
        elif kind == "channel":
            if len(axis.channel_names) != 1:
                raise ModelFileError(
                    f"the {what} has {len(axis.channel_names)} channels; livescope runs single-channel models"
                )
            letter = "c"
        elif kind == "space" and aid in ("y", "x"):
            letter = aid
            space[aid] = axis
        else:
            raise ModelFileError(
                f"the {what} has a {kind} axis {aid!r}; livescope runs 2-D models (axes batch, channel, y, x)"
            )
        letters.append(letter)
        roles[aid] = letter
    if "y" not in space or "x" not in space:
        raise ModelFileError(f"the {what} lacks a y or x axis (it has {', '.join(roles)})")
    return "".join(letters), roles, space


def _read(descr: Any, entry: Any, name: str) -> bytes:
    try:
        data = bytes(entry.get_reader().read())
    except ValueError as exc:  # bioimageio.spec checks the declared sha256 as it reads
        raise ModelFileError(f"the package's {name} weights cannot be read ({exc}): the package is corrupt") from exc
    except OSError as exc:
        raise ModelFileError(f"the package's {name} weights cannot be read: {exc}") from exc
    declared = getattr(entry, "sha256", None)
    if declared is not None and hashlib.sha256(data).hexdigest() != str(declared):
        raise ModelFileError(f"the package's {name} weights do not match their sha256: the package is corrupt")
    return data


def _restore_04_references(source: str, post: list[_Op]) -> list[_Op]:
    """bioimageio.spec (0.5.14) drops ``reference_tensor`` when it converts a 0.4
    ``scale_range`` to 0.5, so the output would be scaled by its own percentiles instead of the
    input's: put it back from the original YAML, in the order the steps come."""
    from bioimageio.spec.utils import open_bioimageio_yaml

    content: Any = open_bioimageio_yaml(source).content  # the YAML as read: checked by bioimageio.spec already
    if not str(content.get("format_version", "")).startswith("0.4"):
        return post
    steps = (content.get("outputs") or [{}])[0].get("postprocessing") or []
    refs = [(s.get("kwargs") or {}).get("reference_tensor") for s in steps if s.get("name") == "scale_range"]
    ranges = iter(refs)
    return [
        dataclasses.replace(op, reference=bool(next(ranges, None))) if op.name == "scale_range" else op for op in post
    ]


def _inline_external_data(graph: bytes, entry: Any, data: bytes) -> bytes:
    """One self-contained ONNX graph from a graph and its external weights file, for
    onnxruntime and TensorRT, which both take bytes here (needs the onnx package)."""
    import tempfile

    try:
        import onnx
    except ImportError as exc:
        raise ModelFileError(
            "the package's ONNX weights keep their data in a separate file; reading them needs onnx: "
            'pip install "livescope[ml]"'
        ) from exc
    from bioimageio.spec.utils import extract_file_name

    with tempfile.TemporaryDirectory(prefix="livescope-onnx-") as tmp:
        (Path(tmp) / "graph.onnx").write_bytes(graph)
        (Path(tmp) / extract_file_name(entry.external_data.source)).write_bytes(data)
        return bytes(onnx.load(str(Path(tmp) / "graph.onnx")).SerializeToString())


def load(path: str | Path) -> BioImageModel:
    """Read and check a Model Zoo package (folder, its YAML file, or zip) for livescope."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"BioImage Model Zoo package {path} does not exist")
    try:
        from bioimageio.spec import load_model_description
    except ImportError as exc:
        raise ModelFileError(
            f"{path} is a BioImage Model Zoo package; reading it needs bioimageio.spec: {INSTALL_HINT}"
        ) from exc
    source = _rdf_in_folder(path) if path.is_dir() else path
    try:
        descr = load_model_description(str(source), format_version="latest", perform_io_checks=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        first = "; ".join(str(exc).strip().splitlines()[:6])
        raise ModelFileError(f"{path} is not a valid BioImage Model Zoo model: {first}") from exc
    if str(descr.format_version).split(".")[:2] != ["0", "5"]:
        raise ModelFileError(f"{path}: format {descr.format_version} could not be converted to 0.5 by bioimageio.spec")
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise ModelFileError(
            f"{path} takes {len(descr.inputs)} input(s) and gives {len(descr.outputs)} output(s); "
            "livescope runs image-to-image models with one of each"
        )
    inp, out = descr.inputs[0], descr.outputs[0]
    in_axes, in_roles, in_space = _axes(inp.axes, "input")
    out_axes, out_roles, out_space = _axes(out.axes, "output")
    min_size, step, fixed = _sizes(in_space, path)
    halo = 0
    for aid, axis in out_space.items():
        halo = max(halo, int(getattr(axis, "halo", 0) or 0))
        ref: Any = axis.size
        if isinstance(ref, int):  # fixed sizes (CAREamics writes its test input's): the input's own
            same = fixed is not None and ref == fixed["yx".index(aid)]
        else:
            same = not ref.offset and str(ref.axis_id) == aid
        if not same:
            raise ModelFileError(f"{path}: output axis {aid} is not the input's size; livescope runs same-size models")
    pre = _ops(inp.preprocessing, in_roles, "preprocessing", str(inp.id))
    post = _ops(out.postprocessing, out_roles, "postprocessing", str(inp.id))
    post = _restore_04_references(str(source), post)
    net_dtype = str(inp.data.type) if not isinstance(inp.data, Sequence) else "float32"
    for op in pre:
        if op.name == "ensure_dtype":
            net_dtype = str(op.kwargs["dtype"])
    if net_dtype != "float32":
        raise ModelFileError(f"{path}: the network takes {net_dtype}; livescope runs float32 networks")

    weights = descr.weights
    onnx = torchscript = state = None
    arch = None
    if weights.onnx is not None:
        onnx = _read(descr, weights.onnx, "onnx")
        if weights.onnx.external_data is not None:  # torch's dynamo exporter (bioimageio.core's converter)
            onnx = _inline_external_data(onnx, weights.onnx, _read(descr, weights.onnx.external_data, "onnx data"))
    if weights.torchscript is not None:
        torchscript = _read(descr, weights.torchscript, "torchscript")
    if weights.pytorch_state_dict is not None:
        sd = weights.pytorch_state_dict
        state = _read(descr, sd, "pytorch_state_dict")
        a = sd.architecture
        if hasattr(a, "import_from"):
            arch = {"import_from": str(a.import_from), "callable": str(a.callable), "kwargs": dict(a.kwargs)}
    if onnx is None and torchscript is None and arch is None:
        present = [
            k
            for k in ("keras_hdf5", "tensorflow_saved_model_bundle", "tensorflow_js", "pytorch_state_dict")
            if getattr(weights, k, None) is not None
        ]
        raise ModelFileError(
            f"{path} has no weights livescope runs (onnx, torchscript, or a pytorch_state_dict whose architecture "
            f"is a library): it has {', '.join(present)}"
        )
    primary = onnx if onnx is not None else (torchscript if torchscript is not None else state)
    assert primary is not None
    digest = hashlib.sha256(primary).hexdigest()
    meta = {
        "bioimageio": {
            "id": str(descr.id) if descr.id else None,
            "name": descr.name,
            "version": str(descr.version) if descr.version is not None else None,
            "format_version": str(descr.format_version),
            "authors": [a.name for a in descr.authors],
            "license": str(descr.license) if descr.license else None,
            "description": descr.description,
            "source": str(path),
            "input": {"id": str(inp.id), "axes": in_axes},
            "output": {"id": str(out.id), "axes": out_axes},
            "preprocessing": [{"id": op.name, **op.kwargs} for op in pre],
            "postprocessing": [{"id": op.name, **op.kwargs} for op in post],
        },
        "architecture": {"name": "bioimageio"},
        "normalisation": {"vst": False, "rule": "the package's own pre- and postprocessing, per frame"},
        "training": {"bioimageio": descr.name},
    }
    return BioImageModel(
        metadata=meta,
        onnx=onnx or b"",
        weights={},
        source=str(path),
        torchscript=torchscript,
        state_dict=state,
        architecture=arch,
        input_axes=in_axes,
        output_axes=out_axes,
        min_size=min_size,
        step=step,
        fixed_size=fixed,
        halo=halo,
        preprocessing=pre,
        postprocessing=post,
        weights_sha256=digest,
    )


def _sizes(space: dict[str, Any], path: Path) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int] | None]:
    mins, steps, fixed = [], [], []
    for aid in ("y", "x"):
        size = space[aid].size
        if isinstance(size, int):
            mins.append(size)
            steps.append(1)
            fixed.append(size)
        elif hasattr(size, "step"):
            mins.append(int(size.min))
            steps.append(int(size.step))
        else:  # a size referring to another axis (y = x, say): any size the other takes
            mins.append(1)
            steps.append(1)
    if fixed and len(fixed) != 2:
        raise ModelFileError(f"{path}: one of y, x has a fixed size and the other not; not supported")
    return (mins[0], mins[1]), (steps[0], steps[1]), (fixed[0], fixed[1]) if fixed else None


# --------------------------------------------------------------------------- running


def _valid(n: int, lo: int, step: int) -> int:
    """The smallest size the model takes that holds ``n``: ``lo + k * step``."""
    return lo if n <= lo else lo + -(-(n - lo) // step) * step


class BioImageRunner(Runner):
    """A :class:`~.inference.Runner` that feeds the package's layout: livescope's (n, 1, h, w)
    tiles are padded to a size the model takes, reordered to its axes, and the output back."""

    def __init__(self, model: BioImageModel, backend: str = "auto", **options: Any) -> None:
        self.bmz = model
        shape = options.get("shape")
        if shape is not None:
            h, w = (self._padded(int(shape[-2]), 0), self._padded(int(shape[-1]), 1))
            options["shape"] = self._to_model_shape((int(shape[0]), 1, h, w))
        super().__init__(model, backend, **options)

    def _padded(self, n: int, i: int) -> int:
        m = self.bmz
        if m.fixed_size is not None:
            return m.fixed_size[i]
        return _valid(n, m.min_size[i], m.step[i])

    def _to_model_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[_CANONICAL.index(a)] for a in self.bmz.input_axes)

    def run(self, x: np.ndarray) -> np.ndarray:
        n, c, h, w = x.shape
        ph, pw = self._padded(h, 0), self._padded(w, 1)
        if (ph, pw) != (h, w):
            if ph < h or pw < w:
                raise EngineError(f"the model takes tiles of {self.bmz.fixed_size}; this one is {(h, w)}: lower tile")
            pad = [(0, 0), (0, 0), (0, ph - h), (0, pw - w)]
            x = np.pad(x, pad, mode="reflect") if min(h, w) > max(ph - h, pw - w) else np.pad(x, pad, mode="edge")
        axes = self.bmz.input_axes
        # drop the canonical axes the model has not (size 1 here), then reorder to its axes
        xm = x.reshape([s for s, a in zip(x.shape, _CANONICAL, strict=True) if a in axes])
        present = [a for a in _CANONICAL if a in axes]
        xm = np.transpose(xm, [present.index(a) for a in axes])
        y = np.asarray(super().run(np.ascontiguousarray(xm, dtype=np.float32)))
        out_axes = self.bmz.output_axes
        y = np.transpose(y, [out_axes.index(a) for a in _CANONICAL if a in out_axes])
        for i, a in enumerate(_CANONICAL):
            if a not in out_axes:
                y = np.expand_dims(y, i)
        return y[..., :h, :w]


def make_runner(model: ModelFile, backend: str = "auto", **options: Any) -> Runner:
    """The runner for either kind of model (a package's needs its layout and padding)."""
    if isinstance(model, BioImageModel):
        return BioImageRunner(model, backend, **options)
    return Runner(model, backend, **options)
