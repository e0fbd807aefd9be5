"""GLAD ablation on the offline demo data set: what ATP and ADS/SAFF each buy (the paper's Table 4).

Five rows per category, scored with anomalib's ``Engine.test`` (default evaluator):

- **plain**: a DDPM trained with the plain noise loss, reconstruction by plain DDIM from the start step;
- **+ADS**: the same weights, with the adaptive step search and spatial fusion (calibrated on
  held-out normal training images);
- **+ATP**: anomaly-aware training, plain DDIM reconstruction;
- **+ATP +ADS**: both (GLAD's default);
- **+ATP +ADS, 10 steps**: the same weights with DDIM steps every 100 timesteps (8 U-Net calls,
  5 search steps) instead of the default 5 steps (4 calls, 2 search steps).

Two models are trained per category (plain loss and ATP); each is scored with ADS on and off
(and the ATP model also with 10 steps), so the rows that share a training run differ only at inference. Every model is trained with the
same seed, data and step budget. Timing is ``glad_latency.py``'s job: this script measures quality
only, so it may share the machine with other work.

Rerun (writes ``docs/benchmarks/glad_ablation.md``; about 25 minutes per category on an idle
2-core CPU)::

    python benchmarks/glad_ablation.py

Smoke test (one category, tiny data, a few steps; prints only)::

    python benchmarks/glad_ablation.py --quick
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning import seed_everything

from anomalib_diffusion.data import DEMO_CATEGORIES, make_demo_dataset
from anomalib_diffusion.models import GLAD

sys.path.insert(0, str(Path(__file__).parent))
from common import finish_figure, generated_line, machine_line, markdown_table, publish

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "glad_ablation.md"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "glad_demo.png"
# (name, ATP, ADS + SAFF, inference settings over the defaults). The last row reuses the ATP weights with
# DDIM steps every 100 timesteps (8 U-Net calls instead of 4): what the faster default gives up, if anything.
SLOW_STEPS = {"num_inference_steps": 10}
VARIANTS: tuple[tuple[str, bool, bool, dict[str, int]], ...] = (
    ("plain", False, False, {}),
    ("+ADS", False, True, {}),
    ("+ATP", True, False, {}),
    ("+ATP +ADS", True, True, {}),
    ("+ATP +ADS, 10 steps", True, True, SLOW_STEPS),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", choices=list(DEMO_CATEGORIES), default=list(DEMO_CATEGORIES))
    parser.add_argument("--max-steps", type=int, default=None, help="GLAD training steps (default 300; --quick: 4)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the demo data (0: the reported set)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything before building each model")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    parser.add_argument("--output", default=None, help=f"report path ('-' prints only; default {REPORT})")
    parser.add_argument("--figure", default=None, help=f"figure path ('-': none; default {FIGURE})")
    parser.add_argument("--quick", action="store_true", help="tiny data and model, a few steps; prints only")
    return parser.parse_args(argv)


def glad_settings(args: argparse.Namespace) -> dict[str, object]:
    settings: dict[str, object] = {"max_steps": args.max_steps or (4 if args.quick else 300), "visualizer": False}
    if args.quick:
        settings |= {"image_size": 64, "patch_size": 32, "block_out_channels": (8, 16)}
    return settings


def datamodule(root: Path, category: str) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=0)


def score(model: GLAD, data: MVTecAD, work: Path, train: bool) -> dict[str, float]:
    """Fit (or only validate, to calibrate and set the post-processor) and test; anomalib's test metrics."""
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    if train:
        engine.fit(model=model, datamodule=data)
    else:
        engine.validate(model=model, datamodule=data)
    metrics = engine.test(model=model, datamodule=data)[0]
    return {name: float(value) for name, value in metrics.items()}


def run_category(
    root: Path, category: str, settings: dict[str, object], seed: int, work: Path, figure: Path | None
) -> list[list[str]]:
    rows = []
    for atp in (False, True):
        trained: GLAD | None = None
        for name, variant_atp, ads, inference in VARIANTS:
            if variant_atp != atp:
                continue
            seed_everything(seed, workers=True)
            model = GLAD(anomaly_aware_training=atp, adaptive_steps=ads, **(settings | inference))  # type: ignore[arg-type]
            if trained is None:
                metrics = score(model, datamodule(root, category), work / f"{category}_{name}", train=True)
                trained = model
            else:
                for part in ("unet", "ema_unet"):
                    getattr(model.model, part).load_state_dict(getattr(trained.model, part).state_dict())
                metrics = score(model, datamodule(root, category), work / f"{category}_{name}", train=False)
            print(f"{category} {name}: {metrics}")
            if figure is not None and atp and ads and not inference:
                draw_figure(model, root / category, figure)
            rows.append(
                [
                    category,
                    name,
                    f"{metrics['image_AUROC']:.3f}",
                    f"{metrics['pixel_AUROC']:.3f}",
                    "yes" if atp else "no",
                    "yes" if ads else "no",
                    str(len(model.model.timesteps)),
                ]
            )
    order = {name: index for index, (name, *_) in enumerate(VARIANTS)}
    return sorted(rows, key=lambda row: order[row[1]])


@torch.no_grad()
def draw_figure(model: GLAD, category_root: Path, path: Path) -> None:
    """Input / reconstruction / anomaly map of two normal and three defective test images, with each chosen step."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from anomalib.data.utils import read_image

    picks = sorted((category_root / "test" / "good").glob("*.png"))[:2]
    for defect in ("scratch", "hole", "stain"):
        picks += sorted((category_root / "test" / defect).glob("*.png"))[:1]
    model = model.eval()
    images = torch.stack([read_image(p, as_tensor=True) for p in picks])
    images = model.pre_processor(images)
    samples = model.model.pad(images * 2 - 1)
    result = model.model.reconstruct(samples)
    maps = model.model(images).anomaly_map
    figure, axes = plt.subplots(3, len(picks), figsize=(2.6 * len(picks), 8))
    for column, source in enumerate(picks):
        label = source.parent.name
        step = int(result.chosen_timestep[column])
        score = float(model.model.top_k_mean(maps[column : column + 1]))
        axes[0, column].imshow(images[column].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0, column].set_title(f"{label}\nstep {'none (normal)' if step == 0 else step}", fontsize=9)
        axes[1, column].imshow(((result.reconstruction[column] + 1) / 2).permute(1, 2, 0).clamp(0, 1).numpy())
        axes[2, column].imshow(maps[column, 0].numpy(), cmap="jet")
        axes[2, column].set_title(f"score {score:.3f}", fontsize=9)
        mask = category_root / "ground_truth" / label / f"{source.stem}_mask.png"
        if mask.is_file():
            axes[2, column].contour(read_image(mask, as_tensor=True)[0].numpy(), levels=[0.5], colors="white")
    for row, name in enumerate(("input", "reconstruction", "anomaly map")):
        axes[row, 0].set_ylabel(name)
    finish_figure(figure, axes, path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    categories = args.categories[:1] if args.quick else args.categories
    settings = glad_settings(args)
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        data_root = work / f"demo_seed{args.data_seed}"
        sizes = {"n_train": 8, "n_test_good": 4, "n_test_per_defect": 2, "image_size": 64} if args.quick else {}
        make_demo_dataset(data_root, categories=categories, seed=args.data_seed, progress=False, **sizes)
        start = time.perf_counter()
        rows = []
        for category in categories:
            figure = None if args.figure == "-" or (args.quick and args.figure is None) else Path(args.figure or FIGURE)
            rows += run_category(
                data_root, category, settings, args.seed, work, figure if category == categories[0] else None
            )
        minutes = (time.perf_counter() - start) / 60
    table = markdown_table(
        ["category", "variant", "image AUROC", "pixel AUROC", "ATP", "ADS + SAFF", "U-Net calls"], rows
    )
    report = "\n".join(
        [
            "# GLAD ablation: plain reconstruction vs +ADS vs +ATP vs both",
            "",
            generated_line("glad_ablation.py", argv, minutes),
            "",
            table,
            "",
            f"- Data: offline demo set (`make_demo_dataset`, seed {args.data_seed}), MVTec AD layout, 256x256 unless --quick.",
            f"- GLAD settings besides the variant flags: `{settings}` (all else default).",
            "- Rows sharing a training run (plain / +ADS; the three +ATP rows) use the same weights; "
            "ADS rows are calibrated on held-out normal training images.",
            f"- The last row runs the ATP weights with `{SLOW_STEPS}` (DDIM steps every 100 timesteps, same start "
            "and search range) instead of the default 5.",
            machine_line(),
            "",
        ]
    )
    publish(report, args, REPORT)


if __name__ == "__main__":
    main()
