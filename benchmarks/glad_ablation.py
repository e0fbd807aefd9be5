"""GLAD ablation on the demo categories and/or devbench textures: what ATP and ADS/SAFF each buy (the paper's Table 4).

Six rows per category, each scored with anomalib's ``Engine.test`` on raw outputs (scikit-learn AUROC, as
``report.py`` scores):

- **plain**: a DDPM trained with the plain noise loss, reconstruction by plain DDIM from the start step;
- **+ADS**: the same weights, with the adaptive step search and spatial fusion (calibrated on
  held-out normal training images);
- **+ATP**: anomaly-aware training, plain DDIM reconstruction (GLAD's default);
- **+ATP +ADS**: both (the paper's GLAD);
- **+ATP, 10 steps** and **+ATP +ADS, 10 steps**: the ATP weights with DDIM steps every 100 timesteps (7 U-Net
  calls per noise draw; ADS then has 5 search steps) instead of the default 5 (3 calls per draw, 2 search steps).

Two models are trained per category (plain loss and ATP), each with the calibration hold-out kept out of training
(``adaptive_steps: true`` at fit time), so the rows that share a training run differ only at inference and every
ADS row calibrates on images its U-Net never saw. (GLAD's default, plain DDIM, trains on every image; here the
plain rows give up that 10 % so that the comparison is fair.) Every model is trained with the same seed, data and
step budget. Timing is ``glad_latency.py``'s job: this script measures quality only, so it may share the machine
with other work.

Rerun (writes ``docs/benchmarks/glad_ablation.md``; about 14 minutes per category on an idle 2-core CPU)::

    python benchmarks/glad_ablation.py --textures ../shared/devbench/textures \
        --categories hard-grain paper-torchon waveflex --held-out hard-grain paper-torchon waveflex \
        --figure docs/figures/glad_ablation.png

With ``--work-dir`` each category's rows are kept there as it finishes (``rows/<category>.json``); the same command
with ``--resume`` takes those and computes only the rest, so a run cut short loses one category at most. The page
says which rows were taken, and from when. (The figure is drawn with the first category: resuming that category keeps
the figure its run drew.)

Smoke test (one category, tiny data, a few steps; prints only)::

    python benchmarks/glad_ablation.py --quick
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from lightning import seed_everything
from sklearn.metrics import roc_auc_score

from anomalib_diffusion.data import DEMO_CATEGORIES
from anomalib_diffusion.models import GLAD

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    build_categories,
    check_categories,
    engine,
    finish_figure,
    generated_line,
    machine_line,
    markdown_table,
    publish,
    write_atomically,
)
from report import TestOutputs, datamodule, raw_outputs, raw_test_outputs

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "glad_ablation.md"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "glad_demo.png"
# (name, ATP, ADS + SAFF, inference settings over the defaults). The 10-step rows reuse the ATP weights with
# DDIM steps every 100 timesteps (7 U-Net calls per draw instead of 3): what the faster default gives up, if anything.
SLOW_STEPS = {"num_inference_steps": 10}
DEFAULT_VARIANT = "+ATP"
VARIANTS: tuple[tuple[str, bool, bool, dict[str, int]], ...] = (
    ("plain", False, False, {}),
    ("+ADS", False, True, {}),
    ("+ATP", True, False, {}),
    ("+ATP +ADS", True, True, {}),
    ("+ATP, 10 steps", True, False, SLOW_STEPS),
    ("+ATP +ADS, 10 steps", True, True, SLOW_STEPS),
)
SEED = 42  # report.py's (configs/benchmark.yaml's benchmark.seed): the same data split and training seed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--textures", type=Path, default=None, help="folder of texture photographs (the devbench)")
    parser.add_argument(
        "--categories", nargs="+", default=None, help="demo categories and/or textures (default: the demo's three)"
    )
    parser.add_argument("--held-out", nargs="+", default=[], help="categories no setting was tuned on")
    parser.add_argument("--max-steps", type=int, default=None, help="GLAD training steps (default 300; --quick: 4)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the demo data (0: the reported set)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed_everything before building each model")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    parser.add_argument("--output", default=None, help=f"report path ('-' prints only; default {REPORT})")
    parser.add_argument("--figure", default=None, help=f"figure path ('-': none; default {FIGURE})")
    parser.add_argument("--quick", action="store_true", help="tiny data and model, a few steps; prints only")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="take each category whose rows --work-dir already holds from an earlier run with the same settings and "
        "seeds (every category's rows are kept there as it finishes); compute only the others",
    )
    args = parser.parse_args(argv)
    if args.resume and args.work_dir is None:
        parser.error("--resume needs --work-dir: the folder an earlier run kept its rows in.")
    args.categories = args.categories or list(DEMO_CATEGORIES)
    check_categories(args.categories, args.textures)
    if unknown := sorted(set(args.held_out) - set(args.categories)):
        parser.error(f"--held-out {' '.join(unknown)}: not among --categories.")
    return args


def glad_settings(args: argparse.Namespace) -> dict[str, object]:
    settings: dict[str, object] = {"max_steps": args.max_steps or (4 if args.quick else 300), "visualizer": False}
    if args.quick:
        settings |= {"image_size": 64, "patch_size": 32, "block_out_channels": (8, 16)}
    return settings


def score(model: GLAD, data: MVTecAD, work: Path, train: bool) -> dict[str, float]:
    """Fit (or only validate, to calibrate and set the post-processor), then test on raw outputs."""
    collector = TestOutputs()
    runner = engine(work, callbacks=[collector])
    if train:
        runner.fit(model=model, datamodule=data)
    else:
        runner.validate(model=model, datamodule=data)
    with raw_outputs(model):
        runner.test(model=model, datamodule=data, verbose=False)
    scores, labels, pixels, masks = raw_test_outputs(collector.batches)
    return {"image_AUROC": float(roc_auc_score(labels, scores)), "pixel_AUROC": float(roc_auc_score(masks, pixels))}


def run_category(
    root: Path, category: str, settings: dict[str, object], seed: int, work: Path, figure: Path | None
) -> list[list[str]]:
    rows = []
    for atp in (False, True):
        trained: GLAD | None = None
        # The ADS variant trains (its fit keeps the calibration hold-out out); the others reuse its weights.
        variants = sorted((v for v in VARIANTS if v[1] == atp), key=lambda v: (not v[2], bool(v[3])))
        for name, _, ads, inference in variants:
            seed_everything(seed, workers=True)
            model = GLAD(anomaly_aware_training=atp, adaptive_steps=ads, **(settings | inference))  # type: ignore[arg-type]
            data = datamodule(root, category, seed, 8)
            if trained is None:
                metrics = score(model, data, work / f"{category}_{name}", train=True)
                trained = model
            else:
                for part in ("unet", "ema_unet"):
                    getattr(model.model, part).load_state_dict(getattr(trained.model, part).state_dict())
                model._holdout_indices = trained._holdout_indices  # calibrate on the same held-out images
                metrics = score(model, data, work / f"{category}_{name}", train=False)
            print(f"{category} {name}: {metrics}", flush=True)
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


def labelled(variant: str) -> str:
    """The variant's name as the tables show it: GLAD's default is marked."""
    return f"{variant} (default)" if variant == DEFAULT_VARIANT else variant


def mean_rows(rows: list[list[str]], categories: Sequence[str], label: str) -> list[list[str]]:
    """One row per variant: image and pixel AUROC averaged over ``categories``."""
    means = []
    for name, *_ in VARIANTS:
        chosen = [row for row in rows if row[0] in categories and row[1] == name]
        if chosen:
            image = statistics.fmean(float(row[2]) for row in chosen)
            pixel = statistics.fmean(float(row[3]) for row in chosen)
            means.append([label, labelled(name), f"{image:.3f}", f"{pixel:.3f}", *chosen[0][4:]])
    return means


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
    output = model.model(images)
    maps = output.anomaly_map
    figure, axes = plt.subplots(3, len(picks), figsize=(2.6 * len(picks), 8))
    for column, source in enumerate(picks):
        label = source.parent.name
        step = int(result.chosen_timestep[column])
        score = float(output.pred_score[column])
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
        data_root = work / f"data_seed{args.data_seed}"
        sizes = {"n_train": 8, "n_test_good": 4, "n_test_per_defect": 2, "image_size": 64} if args.quick else None
        build_categories(data_root, categories, args.textures, seed=args.data_seed, sizes=sizes)
        rows, minutes, resumed = [], 0.0, []
        key = {"settings": repr(settings), "seed": args.seed, "data_seed": args.data_seed}  # what a kept row must match
        for category in categories:
            cache = work / "rows" / f"{category}.json"
            if args.resume and cache.is_file():
                kept = json.loads(cache.read_text())
                if kept["key"] != key:
                    raise SystemExit(
                        f"{cache} was written with {kept['key']}, this run has {key}: rerun without --resume, or "
                        "with another --work-dir."
                    )
                print(f"{category}: rows of {kept['date']} taken from {cache}", flush=True)
                rows += kept["rows"]
                minutes += kept["minutes"]
                resumed.append(f"{category} ({kept['date']})")
                continue
            figure = None if args.figure == "-" or (args.quick and args.figure is None) else Path(args.figure or FIGURE)
            start = time.perf_counter()
            category_rows = run_category(
                data_root, category, settings, args.seed, work, figure if category == categories[0] else None
            )
            category_minutes = (time.perf_counter() - start) / 60
            if args.work_dir is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                kept = {
                    "key": key,
                    "date": datetime.now().strftime("%Y-%m-%d"),
                    "minutes": category_minutes,
                    "rows": category_rows,
                }
                write_atomically(cache, json.dumps(kept, indent=1))
            rows += category_rows
            minutes += category_minutes
    header = ["category", "variant", "image AUROC", "pixel AUROC", "ATP", "ADS + SAFF", "U-Net calls"]
    shown = [
        [f"{row[0]} (held out)" if row[0] in args.held_out else row[0], labelled(row[1]), *row[2:]] for row in rows
    ]
    tuned = [name for name in categories if name not in args.held_out]
    means = []
    for names, label in ((args.held_out, "held-out mean"), (tuned, "mean" if not args.held_out else "tuned-on mean")):
        if len(names) > 1:
            means += ["", f"Mean over {', '.join(names)}:", "", markdown_table(header, mean_rows(rows, names, label))]
    data_line = (
        f"- Data: `make_demo_dataset` (seed {args.data_seed}, MVTec AD layout, 256x256 unless --quick): the demo's "
        "planted defects"
        + (
            f" on the texture photographs of `{args.textures}` (one category per texture)"
            if set(categories) - set(DEMO_CATEGORIES)
            else ""
        )
        + ". Thresholds are not needed (AUROC); the validation split is anomalib's synthetic one, as in report.py."
    )
    report = "\n".join(
        [
            "# GLAD ablation: plain reconstruction vs +ADS vs +ATP vs both",
            "",
            generated_line("glad_ablation.py", argv, minutes),
            "",
            markdown_table(header, shown),
            *means,
            "",
            data_line,
            f"- GLAD settings besides the variant flags: `{settings}` (all else default).",
            "- Rows sharing a training run (plain / +ADS; the four +ATP rows) use the same weights, trained with the "
            "calibration hold-out (10 % of the training images) kept out; ADS rows are calibrated on those images. "
            "GLAD's default (+ATP, plain DDIM) trains on every image when used on its own.",
            f"- The 10-step rows run the ATP weights with `{SLOW_STEPS}` (DDIM steps every 100 timesteps, same start "
            "and search range) instead of the default 5.",
            "- Image / pixel AUROC: scikit-learn on the raw scores and maps of `Engine.test` (as report.py).",
            *(
                [
                    f"- Resumed: the rows of {', '.join(resumed)} come from an earlier run of this command with the "
                    "same settings and seeds (`--resume`, the work dir's rows); the minutes are the sum of each "
                    "category's own."
                ]
                if resumed
                else []
            ),
            machine_line(),
            "",
        ]
    )
    publish(report, args, REPORT)


if __name__ == "__main__":
    main()
