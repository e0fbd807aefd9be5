"""How a trained model's anomaly map becomes an image score: extra smoothing and top shares, on the same weights.

Trains one model per category as ``benchmarks/report.py`` does (its grid in ``--config``, anomalib ``Engine``,
``MVTecAD`` with a synthetic validation split, seed 42), keeps the anomaly map the model returns for every test
image (raw: anomalib's normalisation off), and scores it again with a Gaussian blur of each ``--sigmas`` (0: the
map as the model returns it) and the mean of each ``--top-fractions`` of its highest values as the image score.
Image and pixel AUROC with scikit-learn. Also printed, per variant: ``border``, the share of the normal test
images' top-1 % pixels that lie within 8 px of the image edge (12 % of a 256x256 image's area), which shows when
normal images are scored by their border; and, for the first blur and share given, ``per_type``: image AUROC of
each defect type's test images against all normal test images (which kind of defect a model misses).

One JSON line per category. The runs behind docs/dadda.md's image-score share (*Our choices*; tuning half) and its
same-weights check on the held-out half (*Measured*); about 3-4 minutes per texture on 2 cores::

    anomalib-diffusion-demo-data --textures ../shared/devbench/textures --root datasets/devbench
    python benchmarks/map_scoring.py --model DADDA --root datasets/devbench --categories bump-relief melt vegetal \\
        --sigmas 0 2 4 8 --top-fractions 0.01 0.001
    python benchmarks/map_scoring.py --model DADDA --root datasets/devbench \\
        --categories hard-grain paper-torchon waveflex --sigmas 0 --top-fractions 0.01 0.003 0.001
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from lightning import seed_everything
from sklearn.metrics import roc_auc_score

from anomalib_diffusion.components import SeparableGaussianBlur
from anomalib_diffusion.components.features import top_k_mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import border_share
from report import CONFIG, build, datamodule, engine, model_grid, raw_outputs

if TYPE_CHECKING:
    from anomalib.data import MVTecAD
    from anomalib.models import AnomalibModule


def test_maps(model: "AnomalibModule", data: "MVTecAD") -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """``(maps (N, 1, H, W), labels (N,), masks (N, H, W), kinds (N,))``: the raw anomaly maps over the test split.

    ``kinds``: each image's folder name (``good`` or its defect type).
    """
    maps, labels, masks, kinds = [], [], [], []
    model.eval()
    with raw_outputs(model), torch.inference_mode():
        for batch in data.test_dataloader():
            images = model.pre_processor(batch.image)
            anomaly_map = model.model(images).anomaly_map.float()
            anomaly_map = anomaly_map.reshape(len(images), 1, *anomaly_map.shape[-2:])
            truth = batch.gt_mask.float().reshape(len(images), 1, *batch.gt_mask.shape[-2:])
            maps.append(anomaly_map)
            masks.append(F.interpolate(truth, anomaly_map.shape[-2:])[:, 0].numpy() > 0.5)
            labels += batch.gt_label.int().tolist()
            kinds += [Path(path).parent.name for path in batch.image_path]
    return torch.cat(maps), np.asarray(labels), np.concatenate(masks), np.asarray(kinds)


def per_type_auroc(scores: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type's images against all normal ones (``good``)."""
    normal = scores[kinds == "good"]
    result = {}
    for kind in sorted(set(kinds.tolist()) - {"good"}):
        defective = scores[kinds == kind]
        truth = np.r_[np.zeros(len(normal)), np.ones(len(defective))]
        result[kind] = round(float(roc_auc_score(truth, np.r_[normal, defective])), 4)
    return result


def measure(
    name: str, settings: dict, root: Path, category: str, seed: int, sigmas: Sequence[float], tops: Sequence[float]
) -> dict:
    seed_everything(seed, workers=True)
    data = datamodule(root, category, seed, batch=8)
    model = build(name, settings)
    start = time.perf_counter()
    engine(Path("runs/map_scoring") / name / category).fit(model=model, datamodule=data)
    result: dict = {"model": name, "category": category, "fit_s": round(time.perf_counter() - start)}
    data.setup("test")
    maps, labels, masks, kinds = test_maps(model, data)
    for sigma in sigmas:
        smoothed = SeparableGaussianBlur(sigma)(maps) if sigma else maps
        pixel = round(float(roc_auc_score(masks.ravel(), smoothed.numpy().ravel())), 4)
        key = f"sigma{sigma:g}"
        result[key] = {"pixel": pixel, "border": border_share(smoothed[labels == 0])}
        for top in tops:
            scores = top_k_mean(smoothed, top).numpy()
            result[key][f"top{top:g}"] = round(float(roc_auc_score(labels, scores)), 4)
            if "per_type" not in result:
                result["per_type"] = per_type_auroc(scores, kinds)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=["RADAR", "GLAD", "DADDA"])
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD-layout root (e.g. datasets/devbench)")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the benchmark grid the model's settings come from")
    parser.add_argument("--settings", default="{}", help="JSON overrides of the grid's settings")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0], help="extra map blurs (0: none)")
    parser.add_argument("--top-fractions", type=float, nargs="+", default=[0.01], help="image score top shares")
    parser.add_argument("--seed", type=int, default=42, help="as configs/benchmark.yaml")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="several seeds in turn (each printed; overrides --seed)"
    )
    args = parser.parse_args(argv)
    settings = model_grid(yaml.safe_load(args.config.read_text()), [args.model], False)[args.model]
    settings |= json.loads(args.settings)
    for seed in args.seeds or [args.seed]:
        for category in args.categories:
            result = measure(args.model, settings, args.root, category, seed, args.sigmas, args.top_fractions)
            print(json.dumps(result | {"seed": seed, "settings": settings}), flush=True)


if __name__ == "__main__":
    main()
