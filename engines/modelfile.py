"""The livescope model file: one zip holding the network twice over and what it needs to run.

Members:

- ``metadata.json``: format version, architecture, input rules (channels, k past frames, size
  multiple), normalisation, what it was trained on and how (``training_features``: statistics
  of the training frames for the trust engine, optional), and the sha256 of the two members
  below;
- ``model.onnx``: the graph for onnxruntime and TensorRT (dynamic batch, height and width);
- ``weights.npz``: the torch state dict as plain arrays (no pickle), for the torch backend and
  for fitting on from this model.

Reading it needs neither torch nor onnx. A file that is not a zip, misses a member, fails its
hash or was written by a newer format is refused with a :class:`ModelFileError` that says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .base import EngineError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LEGACY_SUFFIXES",
    "MODEL_SUFFIX",
    "ModelFile",
    "ModelFileError",
    "default_model_path",
    "load",
]

FORMAT = "livescope-denoise-model"
FORMAT_VERSION = 1  # bump on a change that older readers cannot run
MODEL_SUFFIX = ".lsmodel"  # no image format uses it (the earlier ".lsm" is Zeiss's confocal format)
LEGACY_SUFFIXES = (".lsm",)  # files written before the rename still load
_REQUIRED = ("format", "format_version", "architecture", "inputs", "normalisation", "sha256")


class ModelFileError(EngineError):
    """A model file is corrupt or was written for another livescope."""


def default_model_path() -> Path:
    return Path(__file__).resolve().parent / "models" / f"denoise_default{MODEL_SUFFIX}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class ModelFile:
    metadata: dict[str, Any]
    onnx: bytes
    weights: dict[str, np.ndarray]

    @property
    def hash(self) -> str:
        """Identifies the weights (not the metadata): keys engine caches and provenance."""
        return str(self.metadata["sha256"]["model.onnx"])[:16]

    @property
    def k(self) -> int:
        """Past frames the model takes besides the current one."""
        return int(self.metadata["inputs"]["past_frames"])

    @property
    def multiple(self) -> int:
        """Height and width of what the network sees must be multiples of this."""
        return int(self.metadata["inputs"]["size_multiple"])

    @property
    def task(self) -> str:
        """What the network does: "denoise" (files without the field), "deconvolve", "restore"."""
        return str(self.metadata.get("task", "denoise"))

    @property
    def training_features(self) -> dict[str, Any] | None:
        """Statistics of the training frames' features (``trust.feature_statistics``); None in
        files written before livescope stored them. Metadata only: not covered by the hash."""
        return self.metadata.get("training_features")

    @property
    def arch(self) -> dict[str, Any]:
        return dict(self.metadata["architecture"])

    @classmethod
    def from_net(cls, net: Any, metadata: dict[str, Any]) -> ModelFile:
        """Package a trained :class:`~livescope.engines.unet.UNet` (needs torch)."""
        from .unet import export_onnx

        arch = {
            "name": "unet2d",
            "in_channels": net.in_channels,
            "depth": net.depth,
            "base": net.base,
            "max_channels": net.max_channels,
        }
        if getattr(net, "unshuffle", 1) > 1:  # depth then counts the unshuffle too (size multiple)
            arch["unshuffle"] = int(net.unshuffle)
        if getattr(net, "skip", "cat") != "cat":  # older readers know only concatenated skips
            arch["skip"] = str(net.skip)
        weights = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
        meta = dict(metadata)
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            architecture=arch,
            inputs={
                "channels": net.in_channels,
                "past_frames": net.in_channels - 1,
                "size_multiple": 2**net.depth,
                "layout": "NCHW float32, channel 0 = current",
            },
        )
        meta.setdefault("normalisation", {"vst": True, "percentiles": [1.0, 99.8]})
        return cls(meta, export_onnx(net), weights)

    def to_bytes(self) -> bytes:
        npz = io.BytesIO()
        arrays: dict[str, Any] = self.weights  # as keywords: state-dict names, never savez's allow_pickle
        np.savez(npz, **arrays)
        members = {"model.onnx": self.onnx, "weights.npz": npz.getvalue()}
        meta = dict(self.metadata)
        meta["sha256"] = {name: _sha256(data) for name, data in members.items()}
        self.metadata = meta
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("metadata.json", json.dumps(meta, indent=1, sort_keys=True))
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.to_bytes()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # a reader never sees half a file
        return path

    def build_torch(self) -> Any:
        """The torch network with these weights (eval mode, CPU)."""
        import torch

        from .unet import build

        net = build(self.arch)
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.weights.items()})
        return net.eval()


def load(path: str | Path | None = None) -> ModelFile:
    """Read and check a model file; ``None`` is the shipped default model."""
    path = Path(path) if path is not None else default_model_path()
    if not path.is_file():
        raise ModelFileError(
            f"model file {path} does not exist; pass model=None for the shipped "
            "default or train one with `livescope fit INPUT --out MODEL`"
        )
    _refuse_images(path)
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("metadata.json"))
            members = {name: zf.read(name) for name in ("model.onnx", "weights.npz")}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise ModelFileError(
            f"{path} is not a livescope model file or is corrupt ({exc}); "
            "re-download it or train it again with `livescope fit`"
        ) from exc
    _check(path, meta, members)
    with np.load(io.BytesIO(members["weights.npz"]), allow_pickle=False) as npz:
        weights = {k: npz[k] for k in npz.files}
    return ModelFile(meta, members["model.onnx"], weights)


_IMAGE_MAGIC = {
    b"II*\x00": "a TIFF image (Zeiss .lsm, OME-TIFF, ImageJ)",
    b"MM\x00*": "a TIFF image (Zeiss .lsm, OME-TIFF, ImageJ)",
    b"II+\x00": "a BigTIFF image",
    b"MM\x00+": "a BigTIFF image",
    b"\x89HDF": "an HDF5 file",
    b"\x93NUM": "a numpy .npy array",
}


def _refuse_images(path: Path) -> None:
    """An image given where a model belongs (a Zeiss .lsm, say) is named as such, not 'corrupt'."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return
    what = _IMAGE_MAGIC.get(head)
    if what:
        raise ModelFileError(
            f"{path} is {what}, not a livescope model; livescope models end in {MODEL_SUFFIX} "
            "(train one with `livescope fit INPUT --out MODEL.lsmodel`, or pass a BioImage Model Zoo "
            "package with `denoise.model=PATH/rdf.yaml`)"
        )


def _check(path: Path, meta: dict[str, Any], members: dict[str, bytes]) -> None:
    missing = [k for k in _REQUIRED if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise ModelFileError(
            f"{path} is not a livescope denoising model (format {meta.get('format')!r}, missing {missing})"
        )
    version = int(meta["format_version"])
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format {version}; this livescope reads up to {FORMAT_VERSION}: upgrade livescope"
        )
    if meta["architecture"].get("name") not in ("unet2d", "multilag2d"):
        raise ModelFileError(f"{path}: unknown architecture {meta['architecture'].get('name')!r}")
    for name, data in members.items():
        if _sha256(data) != meta["sha256"].get(name):
            raise ModelFileError(
                f"{path}: {name} does not match its sha256 in the metadata (the "
                "file is corrupt or was edited); re-download or re-train it"
            )
