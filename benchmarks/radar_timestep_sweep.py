"""Sweep RADAR's inference timestep and inference mode on a development copy of the demo data.

RADAR's one free inference choice is the diffusion timestep ``t`` (the paper sweeps 50-250). This
script trains one RADAR per category on a *development* demo data set (seed 1 by default; the
reported benchmarks use seed 0, so the default choice is not tuned on the data it is scored on),
then, for every ``t`` and inference mode, refits the Isolation Forest on the training images and
reports image and pixel AUROC on the development test split and the inference time per image.

    python benchmarks/radar_timestep_sweep.py --categories brick gravel --timesteps 25 50 100 200
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning import seed_everything
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from anomalib_diffusion.data import make_demo_dataset
from anomalib_diffusion.models import RADAR


def pre_processed(model: RADAR, loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, masks = [], [], []
    for batch in loader:
        images.append(model.pre_processor(batch.image))
        labels.append(batch.gt_label)
        if batch.gt_mask is not None:
            masks.append(batch.gt_mask)
    stacked = torch.cat(images)
    mask = torch.cat(masks)[:, None].float() if masks else torch.zeros(stacked.shape[0], 1, *stacked.shape[-2:])
    mask = torch.nn.functional.interpolate(mask, size=stacked.shape[-2:], mode="nearest")[:, 0] > 0.5
    return stacked, torch.cat(labels), mask


def sweep(category: str, root: Path, work: Path, args: argparse.Namespace) -> list[tuple]:
    seed_everything(0)
    datamodule = MVTecAD(root=root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = RADAR(max_steps=args.max_steps, block_out_channels=args.channels)
    engine = Engine(default_root_dir=work / category, accelerator="cpu", devices=1, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    datamodule.setup("test")
    network = model.model.eval()
    train_images, _, _ = pre_processed(model, datamodule.train_dataloader())
    test_images, labels, masks = pre_processed(model, datamodule.test_dataloader())
    rows = []
    settings = [(mode, t) for mode in args.modes for t in args.timesteps]
    for mode, timestep in tqdm(settings, desc=f"{category}: timestep sweep"):
        network.inference_mode, network.timestep = mode, timestep
        with torch.inference_mode():
            network.forest.fit(torch.cat([network.image_features(chunk) for chunk in train_images.split(8)]))
            start = time.perf_counter()
            outputs = [network(chunk) for chunk in test_images.split(8)]
            seconds = (time.perf_counter() - start) / test_images.shape[0]
        scores = torch.cat([output.pred_score for output in outputs]).numpy()
        maps = torch.cat([output.anomaly_map for output in outputs])[:, 0].numpy()
        rows.append(
            (
                category,
                mode,
                timestep,
                roc_auc_score(labels.numpy(), scores),
                roc_auc_score(masks.numpy().ravel(), maps.ravel()),
                seconds,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--timesteps", nargs="+", type=int, default=[25, 50, 100, 200])
    parser.add_argument("--modes", nargs="+", default=["patch", "full"], choices=["patch", "full"])
    parser.add_argument("--seed", type=int, default=1, help="demo data seed (1 = the development copy)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--channels", type=lambda text: [int(v) for v in text.split(",")], default=[16, 32, 64])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        root = make_demo_dataset(work / "data", categories=args.categories, seed=args.seed)
        rows = [row for category in args.categories for row in sweep(category, root, work, args)]
    print("| category | mode | t | image AUROC | pixel AUROC | s / image |")
    print("|---|---|---|---|---|---|")
    for category, mode, timestep, image_auroc, pixel_auroc, seconds in rows:
        print(f"| {category} | {mode} | {timestep} | {image_auroc:.3f} | {pixel_auroc:.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
