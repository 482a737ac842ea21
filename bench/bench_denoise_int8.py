"""INT8 post-training quantization of the shipped denoiser (onnxruntime QDQ), measured against FP32.

    python bench/bench_denoise_int8.py [--repeats 6]

Calibration inputs are what the engine feeds the network on the ``sim`` microscope's frames (never
the W2S pairs it is judged on); quality on both W2S pairs (affine-fitted PSNR, as
bench_denoise.py) and per-frame time at 512x512 through the whole engine, FP32 and the two INT8
variants (every convolution; first and last two in float with percentile calibration), one run.
An experiment: the engine does not ship an INT8 path (docs/denoising.md#int8).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_denoise import DATA, KEYS, livescope_engine, psnr_affine  # the same scoring


def calibration_inputs(frames: int = 8) -> list[np.ndarray]:
    from livescope.bridges.sim import SimConfig, SimSample
    from livescope.engines import FrameInfo, StreamSpec, create_engine, inference

    seen: list[np.ndarray] = []
    run = inference.OnnxRuntimeBackend.run

    def recording(self, x):
        seen.append(np.array(x, np.float32))
        return run(self, x)

    inference.OnnxRuntimeBackend.run = recording
    try:
        sample = SimSample(SimConfig(shape=(256, 256)))
        eng = create_engine("denoise", backend="onnxruntime")
        eng.setup(StreamSpec(shape=(256, 256), dtype="uint16", bits=16))
        for t in range(frames):
            eng.process(sample.render(5 * t), FrameInfo(seq=t))
    finally:
        inference.OnnxRuntimeBackend.run = run
    return seen


def prepare(onnx_bytes: bytes, tmp: Path) -> Path:
    """The graph with shapes inferred and folded, as quantize_static wants it (once per run)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    (tmp / "fp32.onnx").write_bytes(onnx_bytes)
    quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
    return tmp / "pre.onnx"


def quantize(pre: Path, inputs: list[np.ndarray], keep_float: bool) -> bytes:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(inputs)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"frames": x}

    kw: dict = {}
    if keep_float:
        convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
        kw = {
            "nodes_to_exclude": convs[:1] + convs[-2:],
            "calibrate_method": CalibrationMethod.Percentile,
            "extra_options": {"CalibPercentile": 99.999},
        }
    out = pre.with_name(f"int8_{int(keep_float)}.onnx")
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        **kw,
    )
    return out.read_bytes()


def measure(graph: bytes | None, repeats: int) -> list[tuple[str, float, float]]:
    import onnxruntime as ort
    import tifffile

    from livescope.engines import FrameInfo, inference

    init = inference.OnnxRuntimeBackend.__init__

    def swapped(self, model, **kw):
        init(self, model, **kw)
        if graph is not None:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = self.session.get_session_options().intra_op_num_threads
            self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    inference.OnnxRuntimeBackend.__init__ = swapped
    rows = []
    try:
        for key in KEYS:
            noisy = tifffile.imread(DATA / "w2s_pairs" / f"input_avg1_{key}.tif")
            target = tifffile.imread(DATA / "w2s_pairs" / f"target_avg400_{key}.tif")
            eng = livescope_engine()
            eng.process(noisy, FrameInfo(seq=0))
            ts = []
            for i in range(repeats):
                t = time.perf_counter()
                out = eng.process(noisy, FrameInfo(seq=1 + i))["denoised"]
                ts.append(time.perf_counter() - t)
            rows.append((key, psnr_affine(out, target), float(np.median(ts))))
    finally:
        inference.OnnxRuntimeBackend.__init__ = init
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    from livescope.engines import modelfile

    model = modelfile.load(None)
    inputs = calibration_inputs()
    with tempfile.TemporaryDirectory() as d:
        pre = prepare(model.onnx, Path(d))
        variants = {
            "fp32 (shipped)": None,
            "int8, every conv": quantize(pre, inputs, False),
            "int8, first + last two convs float, percentile": quantize(pre, inputs, True),
        }
    print(f"model {model.hash}, 512x512 frames through the whole engine, onnxruntime CPU")
    print("| variant | " + " | ".join(f"{k} PSNR dB | {k} ms" for k in KEYS) + " |")
    for name, graph in variants.items():
        rows = measure(graph, args.repeats)
        print(f"| {name} | " + " | ".join(f"{p:.3f} | {1e3 * s:.1f}" for _, p, s in rows) + " |")


if __name__ == "__main__":
    main()
