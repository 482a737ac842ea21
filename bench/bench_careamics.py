"""Denoising against CAREamics (Noise2Void, PyTorch Lightning), side by side in one run.

    python bench/bench_careamics.py                        # CAREamics venv: /tmp/careamics-venv
    python bench/bench_careamics.py --careamics-python /path/to/venv/bin/python --minutes 13

Run it with livescope's venv; CAREamics lives in a venv of its own (its releases cap
torchvision at <= 0.26, which pins torch 2.11; see docs/denoising.md, "CAREamics", for how it
was installed next to torch 2.13). This script re-runs itself in that venv as a worker
(``--worker``); the two sides exchange arrays as .npy files in a temporary folder.

1. The W2S pair, as livescope's shipped model was made (engines/models/train_default.py):
   CAREamics N2V (its 2-D defaults: UNet depth 2, 32 channels, 20 % of pixels masked in an 11 px
   window, mean/std normalisation, flips and 90 degree rotations) fitted on ONE noisy frame,
   ``input_avg1_035_1``, with livescope's batch (16) and patch (64), for the shipped model's
   number of steps (3291) or the wall-clock budget ``--minutes``, whichever ends first; then
   scored on the held-out pair 085_1 exactly as bench/bench_denoise.py scores (PSNR and SSIM
   after an affine fit to the 400-frame average, its own functions), next to livescope's
   shipped model (onnxruntime) on the same input in the same run. The CAREamics network is
   also scored every ``--eval-every`` seconds while it trains (quality against time).
2. Inference time per 512x512 frame: livescope's engine (onnxruntime), CAREamics'
   ``CAREamist.predict`` (its user-facing path) and its bare network in torch eager.
3. Fitting on the user's own stream (the 64-frame 256x256 stream of bench_denoise.py: the
   W2S 085_1 target crop with fresh Poisson noise per frame): livescope ``fit`` and CAREamics
   N2V, each for ``--stream-seconds`` from scratch, and livescope continued from its shipped
   model (the default of ``livescope fit`` and the live fit), next to that model unfitted; PSNR
   of a 65th frame against the known photon rate, and the time CAREamics needs to reach
   livescope's from-scratch PSNR (read from its curve).

Both sides use 2 torch threads and no data-loader worker processes (the machine has 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHIPPED_STEPS = 3291  # engines/models/denoise_default.lsmodel metadata["training"]["steps"]


# ---------------------------------------------------------------------------------------------
# worker: runs in the CAREamics venv, imports nothing of livescope
# ---------------------------------------------------------------------------------------------


def torchvision_stand_in() -> None:
    """CAREamics imports torchvision only for its LVAE models (``center_crop``) and the BMZ
    export (a version string). The PyPI torchvision 0.28 (the release for torch 2.13) is a CUDA
    build that cannot load next to torch 2.13+cpu, and no CPU build can be installed here, so
    the venv has none; N2V never calls it. This stand-in makes the import succeed and fails
    loudly if anything does call it. Installed after Lightning and torchmetrics are imported,
    so that they keep treating torchvision as absent."""
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        pass
    import types

    def _missing(*_a, **_k):
        raise RuntimeError("torchvision is not installed in this venv (see docs/denoising.md)")

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0-not-installed"
    tr = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")
    fn.center_crop = fn.interpolate = _missing
    tr.functional = fn
    tv.transforms = tr
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})


def _careamics_fit(
    train: np.ndarray,
    axes: str,
    evaluate: np.ndarray,
    *,
    steps: int,
    seconds: float,
    eval_every: float,
    work: Path,
    name: str,
    seed: int,
) -> dict:
    """Fit CAREamics N2V on ``train``; every ``eval_every`` s store the network's output on
    ``evaluate``. Returns the CAREamist, the curve and the training time (evaluations excluded)."""
    import torch
    from careamics import CAREamist
    from careamics.config import create_advanced_n2v_config
    from lightning.pytorch import Callback

    mean, std = float(train.mean()), float(train.std())
    config = create_advanced_n2v_config(
        experiment_name=name,
        data_type="array",
        axes=axes,
        patch_size=[64, 64],
        batch_size=16,
        num_epochs=100000,
        num_workers=0,
        seed=seed + 1,  # CAREamics wants a seed > 0
        normalization="mean_std",
        normalization_params={"input_means": [mean], "input_stds": [std]},
        trainer_params={
            "max_steps": steps,
            "max_time": {"seconds": seconds},
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        },
    )
    x_eval = torch.from_numpy(((evaluate.astype(np.float32) - mean) / std)[None, None])

    class Curve(Callback):
        def __init__(self):
            self.t0 = None
            self.eval_s = 0.0
            self.next = eval_every
            self.points = []  # (train seconds, step, output file)

        def _eval(self, trainer, pl_module):
            t = time.perf_counter()
            was = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                out = pl_module.model(x_eval)[0, 0].numpy() * std + mean
            pl_module.train(was)
            path = work / f"{name}_curve_{len(self.points)}.npy"
            np.save(path, out.astype(np.float32))
            self.points.append((t - self.t0 - self.eval_s, trainer.global_step, str(path)))
            self.eval_s += time.perf_counter() - t

        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if time.perf_counter() - self.t0 - self.eval_s >= self.next:
                self._eval(trainer, pl_module)
                self.next += eval_every

        def on_train_end(self, trainer, pl_module):
            self._eval(trainer, pl_module)
            self.end = time.perf_counter()

    curve = Curve()
    cam = CAREamist(config, work_dir=work / name, callbacks=[curve], enable_progress_bar=False)
    t = time.perf_counter()
    cam.train(train_data=train)
    total = time.perf_counter() - t
    return {
        "careamist": cam,
        "curve": curve.points,
        "steps": int(cam.trainer.global_step),
        "train_s": curve.end - curve.t0 - curve.eval_s,
        "total_s": total,
        "eval_s": curve.eval_s,
    }


def worker(args) -> int:
    import logging

    logging.disable(logging.WARNING)  # Lightning's per-run chatter; errors still raise
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(2)
    import lightning.pytorch  # noqa: F401  before the stand-in: torchmetrics then sees no torchvision

    torchvision_stand_in()
    import careamics
    import lightning

    work = Path(args.worker)
    w2s_train = np.load(work / "w2s_train.npy")
    w2s_eval = np.load(work / "w2s_eval.npy")
    res = {
        "versions": {
            "careamics": careamics.__version__,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "numpy": np.__version__,
        }
    }

    fit = _careamics_fit(
        w2s_train.astype(np.float32),
        "YX",
        w2s_eval,
        steps=args.steps,
        seconds=60 * args.minutes,
        eval_every=args.eval_every,
        work=work,
        name="w2s",
        seed=args.seed,
    )
    cam = fit.pop("careamist")
    res["w2s"] = fit
    net = cam.model.model
    res["params"] = int(sum(p.numel() for p in net.parameters()))
    res["model"] = cam.config.algorithm_config.model.model_dump(mode="json")

    # CAREamics' own prediction path (whole frame, no tiling), then its timing
    x = w2s_eval.astype(np.float32)
    pred, _ = cam.predict(x, axes="YX", data_type="array", num_workers=0)
    np.save(work / "w2s_predict.npy", np.squeeze(np.asarray(pred[0])).astype(np.float32))
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        cam.predict(x, axes="YX", data_type="array", num_workers=0)
        times.append(time.perf_counter() - t)
    res["predict_s"] = times
    net.eval()
    xt = torch.from_numpy(x[None, None])
    times = []
    with torch.no_grad():
        net(xt)
        for _ in range(args.repeats):
            t = time.perf_counter()
            net(xt)
            times.append(time.perf_counter() - t)
    res["forward_s"] = times

    stream = np.load(work / "stream.npy")
    fit = _careamics_fit(
        stream[:64].astype(np.float32),
        "SYX",
        stream[64],
        steps=10**9,
        seconds=args.stream_seconds,
        eval_every=args.stream_eval_every,
        work=work,
        name="stream",
        seed=args.seed,
    )
    fit.pop("careamist")
    res["stream"] = fit
    (work / "careamics.json").write_text(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------
# main: livescope's venv
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--careamics-python", default="/tmp/careamics-venv/bin/python")
    p.add_argument("--steps", type=int, default=SHIPPED_STEPS, help="CAREamics N2V steps on the W2S frame")
    p.add_argument(
        "--minutes", type=float, default=13.0, help="wall-clock cap of that fit (the shipped model's budget)"
    )
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds between curve points (W2S)")
    p.add_argument("--stream-seconds", type=float, default=90.0, help="fit budget on the stream, each side")
    p.add_argument("--stream-eval-every", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import tifffile
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_denoise import livescope_engine, psnr_affine, ssim_affine  # the same scoring

    from livescope.engines import FrameInfo, modelfile
    from livescope.engines.fit import fit
    from livescope.engines.inference import Normalisation, OnnxRuntimeBackend, run_tiled

    torch.set_num_threads(2)
    if not (DATA / "w2s_pairs").is_dir():
        print(f"real data not found at {DATA}", file=sys.stderr)
        return 2
    w2s_train = tifffile.imread(DATA / "w2s_pairs" / "input_avg1_035_1.tif")
    noisy = tifffile.imread(DATA / "w2s_pairs" / "input_avg1_085_1.tif")
    target = tifffile.imread(DATA / "w2s_pairs" / "target_avg400_085_1.tif")

    # the stream of bench_denoise.fitting_time, built the same way
    rng = np.random.default_rng(1)
    clean = tifffile.imread(DATA / "w2s_pairs" / "target_avg400_085_1.tif").astype(np.float32)[:256, :256]
    photons = clean / clean.max() * 30 + 1
    stream = np.stack([rng.poisson(photons) for _ in range(65)]).astype(np.uint16) + 100
    truth = photons + 100

    def stream_psnr(a):
        return float(10 * np.log10(float(truth.max() - truth.min()) ** 2 / np.mean((a - truth) ** 2)))

    with tempfile.TemporaryDirectory(prefix="bench_careamics_") as tmp:
        work = Path(tmp)
        np.save(work / "w2s_train.npy", w2s_train)
        np.save(work / "w2s_eval.npy", noisy)
        np.save(work / "stream.npy", stream)
        cmd = [
            args.careamics_python,
            str(Path(__file__).resolve()),
            "--worker",
            str(work),
            "--steps",
            str(args.steps),
            "--minutes",
            str(args.minutes),
            "--eval-every",
            str(args.eval_every),
            "--stream-seconds",
            str(args.stream_seconds),
            "--stream-eval-every",
            str(args.stream_eval_every),
            "--repeats",
            str(args.repeats),
            "--seed",
            str(args.seed),
        ]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        worker_s = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
            print(f"CAREamics worker failed (rc {proc.returncode}); command: {' '.join(cmd)}", file=sys.stderr)
            return 1
        cr = json.loads((work / "careamics.json").read_text())
        cam_out = np.load(work / "w2s_predict.npy")
        w2s_curve = [(s, step, psnr_affine(np.load(f), target)) for s, step, f in cr["w2s"]["curve"]]
        stream_curve = [(s, step, stream_psnr(np.load(f))) for s, step, f in cr["stream"]["curve"]]

        # livescope after CAREamics, so the two never share the 2 cores
        eng = livescope_engine(shape=noisy.shape)
        eng.process(noisy, FrameInfo(seq=0))
        times = []
        for i in range(args.repeats):
            t = time.perf_counter()
            out = eng.process(noisy, FrameInfo(seq=i + 1))["denoised"]
            times.append(time.perf_counter() - t)
        ls_ms = statistics.median(times) * 1e3
        model = modelfile.load(None)
        ls_train = model.metadata["training"]

        norm65 = Normalisation.estimate(stream[64])
        x65 = norm65.forward(stream[64])[None]

        def on_frame_65(m):
            return stream_psnr(norm65.inverse(run_tiled(OnnxRuntimeBackend(m).run, x65, multiple=m.multiple)))

        shipped_stream_psnr = on_frame_65(model)  # no fitting: the shipped model was never shown 085_1
        # from scratch, as CAREamics; then continued from the shipped model, which is what
        # `livescope fit` and the daemon's live fit do by default
        res = fit(stream[:64], steps=10**9, time_budget_s=args.stream_seconds, progress=False, seed=args.seed)
        ls_stream_psnr = on_frame_65(res.model)
        warm = fit(
            stream[:64], model=model, steps=10**9, time_budget_s=args.stream_seconds, progress=False, seed=args.seed
        )
        warm_stream_psnr = on_frame_65(warm.model)

    from scipy import ndimage

    gauss = {s: ndimage.gaussian_filter(noisy.astype(np.float32), s) for s in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)}
    best = max(gauss, key=lambda s: psnr_affine(gauss[s], target))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; versions: {cr['versions']}"
    )
    print(
        f"CAREamics N2V network: {cr['params']} params, UNet depth {cr['model'].get('depth')}, "
        f"{cr['model'].get('num_channels_init')} initial channels; livescope model {model.hash}\n"
    )
    w = cr["w2s"]
    print("| held-out W2S 085_1 | PSNR (dB) | SSIM | fitted on | fit |\n|---|---|---|---|---|")
    print(f"| raw | {psnr_affine(noisy, target):.2f} | {ssim_affine(noisy, target):.3f} | | |")
    print(
        f"| livescope shipped model (onnxruntime) | {psnr_affine(out, target):.2f} | "
        f"{ssim_affine(out, target):.3f} | input_avg1_035_1 | {ls_train['steps']} steps x 16 patches 64x64, "
        f"{ls_train['seconds']:.0f} s (shipped; not re-run) |"
    )
    print(
        f"| CAREamics N2V (`CAREamist.predict`) | {psnr_affine(cam_out, target):.2f} | "
        f"{ssim_affine(cam_out, target):.3f} | input_avg1_035_1 | {w['steps']} steps x 16 patches 64x64, "
        f"{w['train_s']:.0f} s (this run) |"
    )
    print(
        f"| Gaussian, best sigma ({best}) | {psnr_affine(gauss[best], target):.2f} | "
        f"{ssim_affine(gauss[best], target):.3f} | sigma tuned on target | |"
    )
    print(
        "\nCAREamics N2V on 085_1 while it trains (training seconds, step, PSNR dB): "
        + ", ".join(f"{s:.0f} s / {st} / {ps:.2f}" for s, st, ps in w2s_curve)
    )

    pr, fw = statistics.median(cr["predict_s"]) * 1e3, statistics.median(cr["forward_s"]) * 1e3
    print("\n| 512x512 frame, this CPU | latency (ms, median) | frames/s |\n|---|---|---|")
    print(f"| livescope shipped model, engine, onnxruntime | {ls_ms:.1f} | {1e3 / ls_ms:.1f} |")
    print(f"| CAREamics N2V, `CAREamist.predict` | {pr:.1f} | {1e3 / pr:.1f} |")
    print(f"| CAREamics N2V, bare network, torch eager | {fw:.1f} | {1e3 / fw:.1f} |")

    s = cr["stream"]
    reach = next(((t, st) for t, st, ps in stream_curve if ps >= ls_stream_psnr), None)
    print(
        f"\n| fit on the stream (64 frames 256x256), budget {args.stream_seconds:.0f} s each | steps | "
        f"training s | PSNR of frame 65 (dB) |\n|---|---|---|---|"
    )
    print(f"| raw frame 65 | | | {stream_psnr(stream[64].astype(np.float32)):.2f} |")
    print(f"| livescope shipped model, no fitting | 0 | 0 | {shipped_stream_psnr:.2f} |")
    print(
        f"| livescope `fit` from scratch (Noise2Void + temporal pairs) | {len(res.losses)} | {res.seconds:.1f} | "
        f"{ls_stream_psnr:.2f} |"
    )
    print(
        f"| livescope `fit` continued from the shipped model (its default) | {len(warm.losses)} | "
        f"{warm.seconds:.1f} | {warm_stream_psnr:.2f} |"
    )
    print(f"| CAREamics N2V | {s['steps']} | {s['train_s']:.1f} | {stream_curve[-1][2]:.2f} |")
    print(
        "\nCAREamics on the stream (training seconds, step, PSNR dB): "
        + ", ".join(f"{t:.0f} s / {st} / {ps:.2f}" for t, st, ps in stream_curve)
    )
    print(
        "CAREamics reaches livescope's from-scratch stream PSNR: "
        + (f"after {reach[0]:.0f} s ({reach[1]} steps)" if reach else f"not within {s['train_s']:.0f} s")
    )
    print(
        f"\ncurve check: last curve point {w2s_curve[-1][2]:.2f} dB vs CAREamist.predict "
        f"{psnr_affine(cam_out, target):.2f} dB; CAREamics worker wall time {worker_s:.0f} s "
        f"(curve evaluations {w['eval_s'] + s['eval_s']:.0f} s, excluded from training s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
