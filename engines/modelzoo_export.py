"""A livescope model written as a BioImage Model Zoo package (format 0.5).

livescope's denoisers see camera values through a variance-stabilising transform (the
generalised Anscombe transform of the camera's noise model) and a percentile scaling, both fixed
on a stream's first frame (engines/inference.py, ``Normalisation``). The Model Zoo has no
processing step for that transform, so the package carries it inside the network: its graph
takes camera values (ADU) and gives denoised camera values, with the normalisation's constants
(offset, gain, read variance, low, high) built in, and declares no pre- or postprocessing. What
that means:

- exact (to float rounding) for frames of the camera and scene the normalisation was fixed on:
  the package gives what livescope's ``denoise`` engine gives on a stream whose first frame set
  that normalisation (the round-trip test checks it);
- a different camera (gain, offset) or a very different brightness range needs a new export with
  its own normalisation; livescope itself re-fixes the normalisation per stream. The constants
  are in the package's ``config.livescope.normalisation``.

Weights: ONNX (onnxruntime, TensorRT, any Model Zoo consumer) and TorchScript (torch), both
traced from the same wrapped network; test input and output as .npy. Needs torch and
bioimageio.spec (``pip install "livescope[ml,bioimageio]"``).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .base import EngineError
from .inference import Normalisation
from .modelfile import ModelFile, load
from .modelzoo import INSTALL_HINT

__all__ = ["export_bioimageio"]

log = logging.getLogger(__name__)

# the closed-form inverse of the variance-stabilising transform built into every exported package
_GAT_INVERSE = {
    "text": "Makitalo and Foi (2011), A closed-form approximation of the exact unbiased inverse of the Anscombe "
    "variance-stabilizing transformation, IEEE Trans. Image Process. 20(9)",
    "doi": "10.1109/TIP.2011.2121085",
}


def _wrapped(net: Any, norm: Normalisation) -> Any:
    """The network between livescope's normalisation and its inverse, as one torch module
    (the same arithmetic as ``Normalisation.forward`` / ``inverse``, float32)."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x - norm.offset
            a = norm.gain
            if a > 0:
                y = torch.sqrt(torch.clamp(y * a + (0.375 * a * a + norm.read_var), min=0.0)) * (2.0 / a)
            y = (y - norm.low) / (norm.high - norm.low)
            y = self.net(y)
            y = y * (norm.high - norm.low) + norm.low
            if a > 0:  # the closed-form unbiased inverse of inference.gat_inverse
                d = torch.clamp(y, min=0.8)
                inv = 1.0 / d
                s = math.sqrt(1.5)
                y = 0.25 * d * d + ((0.625 * s * inv - 1.375) * inv + 0.25 * s) * inv - 0.125
                y = (y - norm.read_var / a**2) * a
            return y + norm.offset

    return Wrapped().eval()


def export_bioimageio(
    model: ModelFile | str | Path | None,
    out: str | Path,
    *,
    sample: np.ndarray,
    normalisation: Normalisation | dict[str, float] | None = None,
    name: str | None = None,
    authors: list[str] | None = None,
    cite: list[dict[str, str]] | None = None,
    zip_package: bool = False,
) -> Path:
    """Write ``model`` (a livescope model file, its path, or None: the shipped default) as a
    Model Zoo package in the folder ``out`` (or, with ``zip_package``, the zip ``out``).

    ``sample`` is a frame of the camera and scene the package is for: it fixes the normalisation
    unless ``normalisation`` is given (the dict of ``Normalisation.as_dict()``, e.g. the denoise
    engine's ``export_state()["normalisation"]``), and a crop of it (up to 256x256) is the test
    input. ``cite``: the Model Zoo's citation entries (``text`` and ``doi`` or ``url``); by
    default the inverse transform the package uses. Returns the path of ``rdf.yaml`` (or of the zip)."""
    try:
        import torch
    except ImportError as exc:
        raise EngineError('exporting to the Model Zoo needs torch: pip install "livescope[ml]"') from exc
    try:
        from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
        from bioimageio.spec.model import v0_5
    except ImportError as exc:
        raise EngineError(f"exporting to the Model Zoo needs bioimageio.spec: {INSTALL_HINT}") from exc

    model = model if isinstance(model, ModelFile) else load(model)
    if model.k or model.task != "denoise":
        raise EngineError(
            f"only single-frame denoisers export to the Model Zoo (this model: task {model.task!r}, "
            f"{model.k} past frames)"
        )
    frame = np.asarray(sample, dtype=np.float32)
    if frame.ndim != 2:
        raise EngineError(f"sample must be one 2-D frame, got shape {frame.shape}")
    cfg = model.metadata["normalisation"]
    if normalisation is None:  # as the denoise engine fixes it on a first frame without camera information
        norm = Normalisation.estimate(
            frame, vst=bool(cfg.get("vst", True)), percentiles=tuple(cfg.get("percentiles", (1.0, 99.8)))
        )
    else:
        norm = normalisation if isinstance(normalisation, Normalisation) else Normalisation(**normalisation)
    m = model.multiple
    wrapped = _wrapped(model.build_torch(), norm)
    h, w = (min(256, s - s % m) for s in frame.shape)
    if h < m or w < m:
        raise EngineError(f"sample {frame.shape} is smaller than the model's size multiple {m}")
    y0, x0 = (frame.shape[0] - h) // 2, (frame.shape[1] - w) // 2
    test_in = np.ascontiguousarray(frame[None, None, y0 : y0 + h, x0 : x0 + w])
    with torch.inference_mode():
        test_out = wrapped(torch.from_numpy(test_in)).numpy().astype(np.float32)

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="livescope-bmz-") as tmp:
        work = Path(tmp)
        np.save(work / "test_input.npy", test_in)
        np.save(work / "test_output.npy", test_out)
        _write_onnx(wrapped, work / "weights.onnx", m)
        traced = torch.jit.trace(wrapped, torch.from_numpy(test_in), check_trace=False)
        traced.save(str(work / "weights.torchscript.pt"))
        (work / "README.md").write_text(_readme(model, norm), encoding="utf-8")
        descr = _description(v0_5, model, norm, work, m, name, authors, torch.__version__.split("+")[0], cite)
        if zip_package:
            save_bioimageio_package(descr, output_path=out)
        else:
            save_bioimageio_package_as_folder(descr, output_path=out)
    log.info("model %s written as a BioImage Model Zoo package to %s", model.hash, out)
    return out if zip_package else out / "rdf.yaml"


def _write_onnx(wrapped: Any, path: Path, m: int) -> None:
    import warnings

    import torch

    dummy = torch.zeros(1, 1, 4 * m, 4 * m)
    with warnings.catch_warnings():  # the legacy exporter on purpose, as unet.export_onnx
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(path),
            input_names=["raw"],
            output_names=["denoised"],
            dynamic_axes={"raw": {0: "batch", 2: "y", 3: "x"}, "denoised": {0: "batch", 2: "y", 3: "x"}},
            opset_version=17,
            dynamo=False,
        )


def _readme(model: ModelFile, norm: Normalisation) -> str:
    return (
        "# livescope denoiser\n\n"
        "Exported from a livescope model file (`.lsmodel`, livescope's `engines/modelzoo_export.py`).\n\n"
        "Input: camera values (ADU) of one 2-D frame; output: denoised camera values. The network\n"
        "runs between livescope's normalisation and its inverse, built into the weights with the\n"
        "constants below (a generalised Anscombe transform for the camera's noise model, then a\n"
        "percentile scaling), fixed on a frame of the camera and scene this package is for:\n\n"
        f"```\n{json.dumps(norm.as_dict(), indent=1)}\n```\n\n"
        "Another camera (gain, offset) or a very different brightness range needs a new export.\n\n"
        f"livescope model hash: {model.hash}\n"
    )


def _description(
    v0_5: Any,
    model: ModelFile,
    norm: Normalisation,
    work: Path,
    m: int,
    name: str | None,
    authors: list[str] | None,
    torch_version: str,
    cite: list[dict[str, str]] | None,
) -> Any:
    size = v0_5.ParameterizedSize(min=m, step=m)
    training = {k: v for k, v in (model.metadata.get("training") or {}).items() if k != "continued_from"}
    inputs = [
        v0_5.InputTensorDescr(
            id=v0_5.TensorId("raw"),
            description="camera values (ADU) of one frame",
            axes=[
                v0_5.BatchAxis(),
                v0_5.ChannelAxis(channel_names=[v0_5.Identifier("raw")]),
                v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=size),
                v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=size),
            ],
            test_tensor=v0_5.FileDescr(source=work / "test_input.npy"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        )
    ]
    ref = {"tensor_id": v0_5.TensorId("raw")}
    outputs = [
        v0_5.OutputTensorDescr(
            id=v0_5.TensorId("denoised"),
            description="denoised camera values (ADU)",
            axes=[
                v0_5.BatchAxis(),
                v0_5.ChannelAxis(channel_names=[v0_5.Identifier("denoised")]),
                v0_5.SpaceOutputAxis(id=v0_5.AxisId("y"), size=v0_5.SizeReference(axis_id=v0_5.AxisId("y"), **ref)),
                v0_5.SpaceOutputAxis(id=v0_5.AxisId("x"), size=v0_5.SizeReference(axis_id=v0_5.AxisId("x"), **ref)),
            ],
            test_tensor=v0_5.FileDescr(source=work / "test_output.npy"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        )
    ]
    weights = v0_5.WeightsDescr(
        onnx=v0_5.OnnxWeightsDescr(source=work / "weights.onnx", opset_version=17),
        torchscript=v0_5.TorchscriptWeightsDescr(
            source=work / "weights.torchscript.pt", pytorch_version=v0_5.Version(torch_version), parent="onnx"
        ),
    )
    return v0_5.ModelDescr(
        name=name or f"livescope denoiser {model.hash}",
        description="A livescope denoiser for one camera: camera values in, denoised camera values out.",
        authors=[v0_5.Author(name=a) for a in (authors or ["livescope"])],
        cite=[v0_5.CiteEntry(**c) for c in (cite or [_GAT_INVERSE])],
        license=v0_5.LicenseId("BSD-3-Clause"),
        documentation=v0_5.FileDescr(source=work / "README.md"),
        tags=["denoising", "livescope", "2d", "fluorescence-light-microscopy"],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config={
            "livescope": {
                "model_hash": model.hash,
                "architecture": model.arch,
                "normalisation": norm.as_dict(),
                "normalisation_rule": model.metadata["normalisation"],
                "training": training,
            }
        },
    )
