"""A CAREamics Noise2Void model, exported to the BioImage Model Zoo format by CAREamics itself,
run by livescope next to CAREamics' own prediction, on the held-out W2S pair.

    python bench/bench_bioimageio.py                            # CAREamics venv: /tmp/careamics-venv
    python bench/bench_bioimageio.py --minutes 4 --repeats 7
    python bench/bench_bioimageio.py --make-test-package tests/data/bmz_careamics_n2v

Run it with livescope's venv; CAREamics lives in a venv of its own (docs/denoising.md,
"CAREamics", says how it was installed next to torch 2.13). The script re-runs itself there as a
worker (``--worker JOB.json``), which

1. fits CAREamics N2V (its 2-D defaults, see bench_careamics.py) on ``input_avg1_035_1`` for
   ``--steps`` or ``--minutes``, whichever ends first;
2. predicts the held-out ``input_avg1_085_1`` (512x512) with ``CAREamist.predict`` (its
   user-facing path) and times it ``--repeats`` times;
3. exports the model with ``CAREamist.export_to_bmz`` (a zip with pytorch_state_dict weights,
   CAREamics' format) and adds TorchScript and ONNX weights with bioimageio.core's own weight
   converters (``add_weights``), as the Model Zoo does for packages it publishes.

livescope then loads that zip (engines/bioimageio.py) and runs the same frame through its
``denoise`` engine with onnxruntime and with torch; both sides are scored as
bench/bench_denoise.py scores (PSNR and SSIM after an affine fit to the 400-frame average), and
the largest difference to CAREamics' prediction is printed.

``--make-test-package DIR`` instead fits a small N2V (16 initial channels) on the CC BY 4.0
migration movie of tests/data/real and writes the package the tests load, with a 128x128 test
crop and CAREamics' prediction of it (``careamics_prediction.npy``).

Both sides use 2 torch threads and no data-loader worker processes (the machine has 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHIPPED_STEPS = 3291  # as bench_careamics.py: the shipped livescope model's number of steps


# ---------------------------------------------------------------------------------------------
# worker: runs in the CAREamics venv, imports nothing of livescope
# ---------------------------------------------------------------------------------------------


def _fit(train: np.ndarray, axes: str, job: dict, work: Path):
    from careamics import CAREamist
    from careamics.config import create_advanced_n2v_config

    mean, std = float(train.mean()), float(train.std())
    config = create_advanced_n2v_config(
        experiment_name=job["name"],
        data_type="array",
        axes=axes,
        patch_size=[64, 64],
        batch_size=16,
        num_epochs=100000,
        num_workers=0,
        seed=job["seed"] + 1,  # CAREamics wants a seed > 0
        normalization="mean_std",
        normalization_params={"input_means": [mean], "input_stds": [std]},
        model_params={"num_channels_init": job["channels"]},
        trainer_params={
            "max_steps": job["steps"],
            "max_time": {"seconds": job["seconds"]},
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        },
    )
    cam = CAREamist(config, work_dir=work / job["name"], enable_progress_bar=False)
    t = time.perf_counter()
    cam.train(train_data=train)
    return cam, time.perf_counter() - t


def worker(job_path: str) -> int:
    import logging

    logging.disable(logging.WARNING)  # Lightning's per-run chatter; errors still raise
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(2)
    import lightning.pytorch  # noqa: F401  before the stand-in: torchmetrics then sees no torchvision

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_careamics import torchvision_stand_in

    torchvision_stand_in()
    import careamics

    job = json.loads(Path(job_path).read_text())
    work = Path(job_path).parent
    train = np.load(job["train"]).astype(np.float32)
    if job.get("reuse"):  # the model CAREamics exported in an earlier run: predict and time only
        from careamics import CAREamist

        cam, fit_s = CAREamist(bmz_path=job["reuse"], work_dir=work / "reuse", enable_progress_bar=False), None
    else:
        cam, fit_s = _fit(train, "SYX" if train.ndim == 3 else "YX", job, work)
    net = cam.model.model
    res = {
        "versions": {"careamics": careamics.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "steps": int(cam.trainer.global_step) if fit_s is not None else None,
        "fit_s": fit_s,
        "params": int(sum(p.numel() for p in net.parameters())),
        "model": cam.config.algorithm_config.model.model_dump(mode="json"),
    }
    x = np.load(job["evaluate"]).astype(np.float32)
    pred, _ = cam.predict(x, axes="YX", data_type="array", num_workers=0)
    np.save(work / "careamics_prediction.npy", np.squeeze(np.asarray(pred[0])).astype(np.float32))
    times = []
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        cam.predict(x, axes="YX", data_type="array", num_workers=0)
        times.append(time.perf_counter() - t)
    res["predict_s"] = times
    if job.get("reuse"):
        (work / "careamics.json").write_text(json.dumps(res))
        return 0

    exported = work / "careamics_export.zip"
    test_input = np.load(job["test_input"]).astype(np.float32)
    cam.export_to_bmz(
        path_to_archive=exported,
        friendly_model_name=job["model_name"],
        input_array=test_input[None] if train.ndim == 3 else test_input,  # in the fit's axes (SYX or YX)
        authors=[{"name": "livescope benchmark", "affiliation": "livescope"}],
        general_description=job["description"],
        data_description=job["data_description"],
    )
    shutil.copy(exported, Path(job["package"]).with_suffix(".careamics.zip"))  # as CAREamics wrote it
    res["bioimageio_core_test"] = add_converted_weights(exported, work / "with_weights", Path(job["package"]))
    (work / "careamics.json").write_text(json.dumps(res))
    return 0


def add_converted_weights(exported: Path, folder: Path, package: Path) -> dict:
    """ONNX weights next to CAREamics' state dict by bioimageio.core's converter, and TorchScript
    traced here in eval mode: bioimageio.core 0.11's converter traces the network in training
    mode (its BatchNorm layers then use each batch's statistics), and its own ``test_model`` fails
    those weights. Returns bioimageio.core's test result per weights format."""
    import torch
    from bioimageio.core import test_model
    from bioimageio.core.backends.pytorch_backend import load_torch_model
    from bioimageio.core.weight_converters import add_weights
    from bioimageio.spec import load_model_description, save_bioimageio_package
    from bioimageio.spec.model.v0_5 import TorchscriptWeightsDescr, Version
    from bioimageio.spec.utils import load_array

    descr = load_model_description(exported, perform_io_checks=False)
    converted = add_weights(descr, output_path=folder, target_format="onnx")
    if getattr(getattr(converted, "weights", None), "onnx", None) is None:
        summary = getattr(converted, "validation_summary", None)
        raise RuntimeError(f"bioimageio.core could not add onnx weights: {summary.format() if summary else converted}")
    descr = converted
    net = load_torch_model(descr.weights.pytorch_state_dict, load_state=True).eval()
    example = torch.zeros(load_array(descr.inputs[0].test_tensor).shape, dtype=torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(net, example)
    traced.save(str(folder / "weights_torchscript.pt"))
    ts = TorchscriptWeightsDescr(
        source=folder / "weights_torchscript.pt",
        pytorch_version=Version(torch.__version__.split("+")[0]),
        parent="pytorch_state_dict",
        comment="torch.jit.trace of the state-dict network in eval mode",
    )
    descr = descr.model_copy(update={"weights": descr.weights.model_copy(update={"torchscript": ts})})
    save_bioimageio_package(descr, output_path=package)
    final = load_model_description(package)
    return {fmt: test_model(final, weight_format=fmt).status for fmt in ("pytorch_state_dict", "torchscript", "onnx")}


def run_worker(python: str, job: dict, work: Path) -> dict:
    path = work / "job.json"
    path.write_text(json.dumps(job))
    cmd = [python, str(Path(__file__).resolve()), "--worker", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"CAREamics worker failed (rc {proc.returncode}); command: {' '.join(cmd)}")
    return dict(json.loads((work / "careamics.json").read_text()))


# ---------------------------------------------------------------------------------------------
# main: livescope's venv
# ---------------------------------------------------------------------------------------------


def make_test_package(args, out: Path) -> int:
    """The package the tests load: N2V on the CC BY 4.0 migration movie, small network."""
    import tifffile

    movie = tifffile.imread(REPO / "tests" / "data" / "real" / "cancer_cell_migration_crop.tif")
    crop = movie[40, 1:129, 1:129].astype(np.float32)  # a frame the fit saw as one of 48: a test crop
    with tempfile.TemporaryDirectory(prefix="bench_bioimageio_") as tmp:
        work = Path(tmp)
        np.save(work / "train.npy", movie)
        np.save(work / "crop.npy", crop)
        job = {
            "name": "migration",
            "train": str(work / "train.npy"),
            "evaluate": str(work / "crop.npy"),
            "test_input": str(work / "crop.npy"),
            "package": str(work / "package.zip"),
            "steps": args.steps,
            "seconds": 60 * args.minutes,
            "channels": 16,
            "seed": args.seed,
            "repeats": 1,
            "model_name": "livescope-test-n2v-migration",
            "description": "Noise2Void (CAREamics) fitted on 48 frames of a fluorescent-nuclei migration "
            "movie, small network; a test fixture of livescope.",
            "data_description": "cancer_cell_migration_crop (Tinevez & Jacquemet, zenodo 5206107, CC BY 4.0, "
            "cropped copy from BioImageAnalysisNotebooks), 48x130x130 uint16",
        }
        res = run_worker(args.careamics_python, job, work)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "package.zip", out / "careamics_n2v.bioimageio.zip")
        np.save(out / "input_crop.npy", crop)
        np.save(out / "careamics_prediction.npy", np.load(work / "careamics_prediction.npy"))
        res["predict_s"] = [round(s, 4) for s in res["predict_s"]]
        (out / "careamics_fit.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}; {res['steps']} steps in {res['fit_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--careamics-python", default="/tmp/careamics-venv/bin/python")
    p.add_argument("--steps", type=int, default=SHIPPED_STEPS, help="CAREamics N2V steps")
    p.add_argument("--minutes", type=float, default=4.0, help="wall-clock cap of the fit")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--package", help="keep the exported package here (default: a temporary folder)")
    p.add_argument(
        "--reuse", action="store_true", help="no fit: time the --package an earlier run exported (and its fit record)"
    )
    p.add_argument("--make-test-package", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.make_test_package:
        return make_test_package(args, Path(args.make_test_package))

    import tifffile
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_denoise import psnr_affine, ssim_affine  # the same scoring

    from livescope.engines import FrameInfo, StreamSpec, create_engine

    torch.set_num_threads(2)
    if not (DATA / "w2s_pairs").is_dir():
        print(f"real data not found at {DATA}", file=sys.stderr)
        return 2
    train = tifffile.imread(DATA / "w2s_pairs" / "input_avg1_035_1.tif")
    noisy = tifffile.imread(DATA / "w2s_pairs" / "input_avg1_085_1.tif")
    target = tifffile.imread(DATA / "w2s_pairs" / "target_avg400_085_1.tif")

    with tempfile.TemporaryDirectory(prefix="bench_bioimageio_") as tmp:
        work = Path(tmp)
        np.save(work / "train.npy", train)
        np.save(work / "eval.npy", noisy)
        np.save(work / "test_input.npy", noisy)  # CAREamics fixes the package size to it: 512x512, whole frames
        package = Path(args.package) if args.package else work / "w2s_n2v.bioimageio.zip"
        job = {
            "name": "w2s",
            "train": str(work / "train.npy"),
            "evaluate": str(work / "eval.npy"),
            "test_input": str(work / "test_input.npy"),
            "package": str(package.resolve()),
            "steps": args.steps,
            "seconds": 60 * args.minutes,
            "channels": 32,  # CAREamics' default
            "seed": args.seed,
            "repeats": args.repeats,
            "model_name": "livescope-bench-n2v-w2s",
            "description": "Noise2Void (CAREamics) on one W2S widefield frame (livescope benchmark).",
            "data_description": "W2S input_avg1_035_1 (Zhou et al. 2020), research use",
        }
        record = package.with_suffix(".fit.json")
        if args.reuse:
            job["reuse"] = str(package.with_suffix(".careamics.zip"))
        t = time.perf_counter()
        cr = run_worker(args.careamics_python, job, work)
        worker_s = time.perf_counter() - t
        if args.reuse:
            cr = {**json.loads(record.read_text()), "predict_s": cr["predict_s"]}
        elif args.package:
            record.write_text(json.dumps(cr))
        cam_out = np.load(work / "careamics_prediction.npy")

        # livescope after CAREamics, so the two never share the 2 cores
        rows = []
        for backend in ("onnxruntime", "torch"):
            eng = create_engine("denoise", model=str(package), backend=backend, tile=0)
            eng.setup(StreamSpec(shape=noisy.shape, dtype="uint8", bits=8))
            out = eng.process(noisy, FrameInfo(seq=0))["denoised"]
            times = []
            for i in range(args.repeats):
                t = time.perf_counter()
                eng.process(noisy, FrameInfo(seq=i + 1))
                times.append(time.perf_counter() - t)
            running = eng.describe()["backend_running"]
            rows.append((backend, running, out, statistics.median(times) * 1e3, eng.describe()))
            eng.close()

    cam_ms = statistics.median(cr["predict_s"]) * 1e3
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; CAREamics side: {cr['versions']}"
    )
    print(
        f"CAREamics N2V: {cr['params']} params, UNet depth {cr['model'].get('depth')}, "
        f"{cr['model'].get('num_channels_init')} initial channels, {cr['steps']} steps in {cr['fit_s']:.0f} s; "
        f"package {rows[0][4]['model'].get('name')!r}, weights {rows[0][4]['model'].get('weights')}\n"
    )
    print(
        "| held-out W2S 085_1, 512x512 | PSNR (dB) | SSIM | max abs diff to CAREamics | ms per frame (median) "
        "| speed vs CAREamics |\n|---|---|---|---|---|---|"
    )
    print(f"| raw | {psnr_affine(noisy, target):.3f} | {ssim_affine(noisy, target):.4f} | | | |")
    print(
        f"| CAREamics `CAREamist.predict` | {psnr_affine(cam_out, target):.3f} | {ssim_affine(cam_out, target):.4f} "
        f"| 0 | {cam_ms:.1f} | 1.00x |"
    )
    for _backend, running, out, ms, _ in rows:
        diff = float(np.abs(out - cam_out).max())
        print(
            f"| livescope denoise, imported package, {running} | {psnr_affine(out, target):.3f} | "
            f"{ssim_affine(out, target):.4f} | {diff:.2e} (of {float(np.ptp(cam_out)):.0f}) | {ms:.1f} "
            f"| {cam_ms / ms:.2f}x |"
        )
    done = "predict" if args.reuse else "fit, predict, export, weight conversion"
    print(f"\nCAREamics worker wall time {worker_s:.0f} s ({done})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
