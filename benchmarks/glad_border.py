"""Where GLAD's normal maps peak, and what standardising them per border band or padding the image changes.

Trains GLAD as the benchmark does (``configs/benchmark.yaml``: 300 steps, seed 42, anomalib ``Engine``, ``MVTecAD`` with a
synthetic validation split), with the map as it was before the border bands: one band, and no hold-out, so that the
U-Net trains on every training image as it then did. Then, on the test split (AUROC with scikit-learn on raw maps;
the image score is the mean of the map's top 1 %, GLAD's):

- where the top 1 % of each *normal* test image's map lies: the share within 8 px of the border (12 % of a 256x256
  image's area);
- ``plain``: the smoothed distance, GLAD's map before the bands;
- ``bands<n>``: standardised per border band (:class:`BorderStandardiser`) with the mean and spread of the validation
  split's normal images (normal training images the U-Net never trained on; GLAD itself now fits them on its own
  hold-out);
- ``seed<s>-reflect<p>``: the image reflect-padded by ``p`` px before reconstruction and the map cropped back, with
  the fixed inference noise of seed ``s`` (``reflect0``: no padding; a padded image also meets another part of the
  noise tile, so the seeds show how much of a padding's effect is the noise draw alone);
- ``crop<n>``: the image score of the map without its outer ``n`` px (a diagnosis, not a method).

Prints one JSON line per texture. The runs behind docs/glad.md's *Border bands* (tuning half only)::

    anomalib-diffusion-demo-data --textures ../shared/devbench/textures --root datasets/devbench
    python benchmarks/glad_border.py --root datasets/devbench --categories vegetal melt bump-relief
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning import seed_everything
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from anomalib_diffusion.components import FixedNoiseDraws
from anomalib_diffusion.components.border import BorderStandardiser, band_moments, border_bands
from anomalib_diffusion.models import GLAD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NEAR_BORDER, border_share
from report import datamodule, engine

BANDS = (4, 8, 16, 32)
PADDINGS = (0, 16, 32)
NOISE_SEEDS = (0, 1, 2)
CROPS = (4, 8, 16)


def top_share(maps: torch.Tensor) -> np.ndarray:
    """``(N,)`` mean of each ``(N, 1, H, W)`` map's top 1 % (GLAD's image score)."""
    flat = maps.flatten(1)
    return flat.topk(max(1, flat.shape[1] // 100), dim=1).values.mean(dim=1).numpy()


def smoothed_maps(model: GLAD, loader: DataLoader, padding: int = 0, normal_only: bool = False) -> tuple:
    """``(maps (N, 1, H, W), labels, masks)``: GLAD's smoothed distance, optionally on reflect-padded images."""
    network = model.model
    maps, labels, masks = [], [], []
    with torch.inference_mode():
        for batch in loader:
            images = model.pre_processor(batch.image)
            padded = F.pad(images, (padding,) * 4, mode="reflect") if padding else images
            distance = network.smoothed_distance(padded)
            if padding:
                distance = distance[..., padding:-padding, padding:-padding]
            truth = None
            if batch.gt_mask is not None:
                truth = F.interpolate(
                    batch.gt_mask.float().view(len(images), 1, *batch.gt_mask.shape[-2:]), images.shape[-2:]
                )
            for index, label in enumerate(batch.gt_label.int().tolist()):
                if normal_only and label:
                    continue
                maps.append(distance[index])
                labels.append(label)
                if truth is not None:
                    masks.append(truth[index, 0].numpy() > 0.5)
    return torch.stack(maps), np.array(labels), masks


def measure(root: Path, category: str, max_steps: int, seed: int) -> dict:
    seed_everything(seed, workers=True)
    data = datamodule(root, category, seed, batch=8)
    # One band and no hold-out: the U-Net trains on every training image, and the map is the plain smoothed distance
    # (one band's standardisation is a monotone rescaling; no AUROC below depends on it); one noise draw and the own
    # encoder's distance alone, as then.
    model = GLAD(max_steps=max_steps, border_bands=1, calibration_fraction=0.0, noise_draws=1, extra_features=[])
    start = time.perf_counter()
    engine(Path("runs/glad_border") / category).fit(model=model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    model.eval()
    validation_normals = smoothed_maps(model, data.val_dataloader(), normal_only=True)[0]
    data.setup("test")
    maps, labels, masks = smoothed_maps(model, data.test_dataloader())
    truth = np.concatenate([mask.ravel() for mask in masks]).astype(bool)

    def aurocs(values: torch.Tensor) -> list[float]:
        return [
            round(float(roc_auc_score(labels, top_share(values))), 4),
            round(float(roc_auc_score(truth, values.numpy().ravel())), 4),
        ]

    height, width = maps.shape[-2:]
    band = border_bands(height, width, NEAR_BORDER + 1).numpy().ravel()
    result = {
        "category": category,
        "fit_s": round(fit_seconds),
        "normal_top1%_within_8px": border_share(maps[labels == 0]),
        "area_within_8px": round(float(np.mean(band < NEAR_BORDER)), 3),
        "validation_normals": len(validation_normals),
        "plain": aurocs(maps),
    }
    for bands in BANDS:
        standardiser = BorderStandardiser(1, bands)
        standardiser.fit(band_moments(validation_normals, bands))
        result[f"bands{bands}"] = aurocs(standardiser(maps))
    noise = model.model.inference_noise
    for noise_seed in NOISE_SEEDS:
        model.model.inference_noise = FixedNoiseDraws(3, noise_seed) if noise_seed else noise
        for padding in PADDINGS:
            padded = maps if padding == noise_seed == 0 else smoothed_maps(model, data.test_dataloader(), padding)[0]
            result[f"seed{noise_seed}-reflect{padding}"] = aurocs(padded)
    model.model.inference_noise = noise
    for crop in CROPS:
        inner = maps[..., crop : height - crop, crop : width - crop]
        result[f"crop{crop}"] = [round(float(roc_auc_score(labels, top_share(inner))), 4)]
    return result


def study_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of the GLAD studies that train GLAD per texture as the benchmark does."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD-layout root (e.g. datasets/devbench)")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--max-steps", type=int, default=300, help="GLAD's training budget (the benchmark's 300)")
    parser.add_argument("--seed", type=int, default=42, help="as configs/benchmark.yaml")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = study_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    for category in args.categories:
        print(json.dumps(measure(args.root, category, args.max_steps, args.seed)), flush=True)


if __name__ == "__main__":
    main()
