"""Add the training data's feature statistics to a model file, without touching its weights.

    python engines/models/add_feature_stats.py                      # the shipped denoise_default.lsmodel
    python engines/models/add_feature_stats.py --model M.lsmodel --frames a.tif b.tif

The trust engine's feature check (docs/trust.md) measures how far a frame lies from the data a
model was trained on; ``fit`` stores those statistics in every model it writes
(``metadata["training_features"]``), but models fitted before it have none. This script
computes them from the training frames, normalised the way ``fit`` normalised them (each source
on its own, offset unknown, gain fitted), and rewrites ``metadata.json`` only: ``model.onnx`` and
``weights.npz`` are copied byte for byte, so their sha256 (and the model hash) stay the same.

Which frames: ``--frames`` when given; else, for a model of the supervised recipe of
engines/models/train_default.py (the shipped one), the crappified training frames that script
draws (its ``feature_frames``, from the same clean images and seeds: sim frames and the
cell-migration time-lapse from ``../shared/data`` next to the repository, or --data); else the
W2S frame ``input_avg1_035_1`` that the earlier Noise2Void default was fitted on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def rewrite_metadata(path: Path, metadata: dict) -> None:
    """Replace metadata.json in the zip at ``path``; every other member keeps its bytes."""
    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info.filename)) for info in zf.infolist() if info.filename != "metadata.json"]
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", json.dumps(metadata, indent=1, sort_keys=True))
        for info, data in members:
            zf.writestr(info, data, compress_type=info.compress_type)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / "denoise_default.lsmodel")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument(
        "--frames", type=Path, nargs="*", help="training frames (default: the model's own training draws, see above)"
    )
    p.add_argument("--description", default=None)
    p.add_argument("--seed", type=int, default=0, help="supervised recipe: train_default.py's --seed")
    p.add_argument("--sim-images", type=int, default=48, help="supervised recipe: train_default.py's --sim-images")
    args = p.parse_args(argv)

    import tifffile

    from livescope.engines import modelfile
    from livescope.engines.inference import Normalisation
    from livescope.engines.trust import feature_statistics, normalised_features

    model = modelfile.load(args.model)
    if not args.frames and model.metadata.get("training", {}).get("method") == "supervised-crappify":
        return _supervised(args, model)
    frames = args.frames or [args.data / "w2s_pairs" / "input_avg1_035_1.tif"]
    missing = [f for f in frames if not f.is_file()]
    if missing:
        print(f"training frames not found: {', '.join(map(str, missing))}; pass --data or --frames", file=sys.stderr)
        return 2
    cfg = model.metadata["normalisation"]
    feats = []
    for f in frames:
        stack = np.asarray(tifffile.imread(f), np.float32)
        stack = stack[None] if stack.ndim == 2 else stack
        # as fit() does: one normalisation per source, offset unknown, gain fitted
        norm = Normalisation.estimate(
            stack, vst=bool(cfg.get("vst", True)), percentiles=tuple(cfg.get("percentiles", (1.0, 99.8)))
        )
        for frame in stack[:: max(1, len(stack) // 8)][:8]:
            feats.append(normalised_features(frame, norm, shifts=True))
    desc = args.description or "; ".join(f.name for f in frames) + " (added by engines/models/add_feature_stats.py)"
    return _write(args.model, model, feature_statistics(feats, description=desc))


def _supervised(args: argparse.Namespace, model) -> int:
    """The supervised recipe's statistics: the crappified frames train_default.py draws."""
    import importlib.util

    from livescope.engines.trust import feature_statistics, normalised_features

    if not (args.data / "cancer_cell_migration_crop.tif").is_file():
        print(f"training data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("train_default", HERE / "train_default.py")
    assert spec is not None and spec.loader is not None  # a .py file: always a spec with a loader
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    pool, _ = train.clean_pool(args.data, sim_images=args.sim_images, seed=args.seed)
    feats = [normalised_features(f, n, shifts=True) for f, n in train.feature_frames(pool, seed=args.seed + 1)]
    desc = args.description or "crappified training frames (engines/models/train_default.py feature_frames)"
    return _write(args.model, model, feature_statistics(feats, description=desc))


def _write(path: Path, model, stats: dict) -> int:
    from livescope.engines import modelfile

    before = {k: hashlib.sha256(v).hexdigest() for k, v in _members(path).items()}
    meta = dict(model.metadata)
    meta["training_features"] = stats
    rewrite_metadata(path, meta)
    after = {k: hashlib.sha256(v).hexdigest() for k, v in _members(path).items()}
    reloaded = modelfile.load(path)
    assert before == after and reloaded.hash == model.hash, "member bytes changed"
    print(
        json.dumps(
            {
                "model": str(path),
                "hash": reloaded.hash,
                "members_unchanged": before == after,
                "tiles": meta["training_features"]["tiles"],
                "z_quantiles": meta["training_features"]["z_quantiles"],
            },
            indent=1,
        )
    )
    return 0


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in ("model.onnx", "weights.npz")}


if __name__ == "__main__":
    sys.exit(main())
