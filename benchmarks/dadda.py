"""D-ADDA per category: what the generator's defects teach the type head and the detector (demo and devbench).

Two measurements per category (demo categories and/or texture photographs with the demo's planted defects; four
defect types each), one page (``docs/benchmarks/dadda.md``) and one figure (``docs/figures/dadda_defects.png``):

1. **All types lent.** ``MVTecADFewDefects`` lends ``--k`` real defective images per type to training and removes
   them from the test split; DADDA trains (its ``Engine.fit`` time is reported). On the held-out real defects:
   image / pixel AUROC and four defect-type accuracies: the head fitted on DAM pastes + generated defects (DADDA's
   default) or on generated defects only (the paper's protocol), each read inside the defect's **ground-truth mask**
   (the paper's protocol: the head alone, given the region) and inside the region **the model itself marks**
   (``anomaly_map`` at or above its pixel threshold, set on synthetic anomalies; what a user gets; an image where it
   marks nothing counts as wrong). Chance is 1 / number of types.
2. **Defect types never held.** ``split_into_sites`` gives a first site half of the defect types. Its detector
   trains twice with the same detector steps: with generated defects (DADDA's default) and with DAM pastes only
   (``generated_fraction 0``; no generator). Both are scored on the full test split restricted to the types that
   site never held, plus the normal images: does the generator teach the detector more than the pasted defects do?

Categories named in ``--held-out`` are averaged apart: no setting was tuned on them.
Rerun (writes the report; its header gives the time it took)::

    python benchmarks/dadda.py --textures ../shared/devbench/textures \\
        --categories brick grass gravel hard-grain paper-torchon waveflex --held-out hard-grain paper-torchon waveflex

Federated training has its own page: ``benchmarks/dadda_federated.py``.
Smoke test (tiny data and models; prints only)::

    python benchmarks/dadda.py --quick
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning import seed_everything

from anomalib_diffusion.data import DEMO_CATEGORIES, MVTecADFewDefects
from anomalib_diffusion.federated.sites import split_into_sites
from anomalib_diffusion.models import DADDA

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
)
from dadda_federated import QUICK_SIZES, dadda_settings, few_defects, unseen_test_set
from report import raw_outputs

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "dadda.md"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "dadda_defects.png"
DEFAULT_STEPS = 150
TYPE_COLUMNS = [
    "category",
    "types",
    "held-out real defects",
    "default head, true mask",
    "default head, own region",
    "generated only, true mask",
    "generated only, own region",
    "chance",
    "image AUROC",
    "pixel AUROC",
    "training minutes",
]
GAIN_COLUMNS = [
    "category",
    "site's types",
    "scored on (never held)",
    "image AUROC, generated + DAM",
    "image AUROC, DAM only",
    "pixel AUROC, generated + DAM",
    "pixel AUROC, DAM only",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--categories", nargs="+", default=list(DEMO_CATEGORIES), help="demo categories and/or textures"
    )
    parser.add_argument("--textures", type=Path, default=None, help="a folder of texture photographs (devbench)")
    parser.add_argument("--held-out", nargs="+", default=[], help="categories no setting was tuned on")
    parser.add_argument("--k", type=int, default=3, help="real defective images per type lent to training")
    parser.add_argument("--steps", type=int, default=None, help=f"generator and detector steps each ({DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything before building each model")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    parser.add_argument("--output", default=None, help=f"report path ('-' prints only; default {REPORT})")
    parser.add_argument("--figure", default=None, help=f"figure path ('-': none; default {FIGURE})")
    parser.add_argument("--quick", action="store_true", help="tiny data and models, a few steps; prints only")
    return parser.parse_args(argv)


def raw_test(run: Engine, model: DADDA, data: MVTecAD) -> dict[str, float]:
    """``Engine.test`` on raw scores and maps, as ``report.py`` scores.

    anomalib's post-processor would map them to [0, 1] with the range seen on the (synthetic) validation split and
    clamp what lies beyond, tying every test image past that range and lowering AUROC. DADDA's scores and maps are
    probabilities, so torchmetrics' AUROC takes them as they are; the type accuracy reads the raw pixel threshold.
    """
    with raw_outputs(model):
        return run.test(model=model, datamodule=data, verbose=False)[0]


def per_category(
    root: Path, category: str, args: argparse.Namespace, settings: dict, work: Path, panels: list
) -> tuple[list[str], list[float]]:
    """Part 1: one DADDA on every type's k lent defects; the table row and its numbers for the means."""
    seed_everything(args.seed, workers=True)
    model = DADDA(**settings)  # type: ignore[arg-type]
    data = few_defects(root, category, args.k, 4 if args.quick else 8)
    run = engine(work / f"{category}_all_types")
    started = time.perf_counter()
    run.fit(model=model, datamodule=data)
    minutes = (time.perf_counter() - started) / 60
    metrics = raw_test(run, model, data)
    print(f"{category}: {metrics}", flush=True)
    panels.append((category, defect_panels(model, data)))
    # The paper's protocol: the same detector, its head refitted on generated defects only.
    model.type_head_source = "generated"
    model.fit_defect_type_head()
    generated = raw_test(run, model, data)
    print(f"{category}, head on generated defects only: {generated}", flush=True)
    values = [
        metrics["defect_type_accuracy"],
        metrics.get("defect_type_accuracy_own_region", float("nan")),
        generated["defect_type_accuracy"],
        generated.get("defect_type_accuracy_own_region", float("nan")),
        1 / len(model.type_names),
        metrics["image_AUROC"],
        metrics["pixel_AUROC"],
        minutes,
    ]
    held = len(data.test_data.samples.query("label_index == 1"))
    row = [
        category,
        str(len(model.type_names)),
        str(held),
        *[f"{value:.3f}" for value in values[:-1]],
        f"{minutes:.1f}",
    ]
    return row, values


def never_held(root: Path, category: str, args: argparse.Namespace, settings: dict, work: Path) -> list[str]:
    """Part 2: a site's detector with and without generated defects, on the types the site never held."""
    site = split_into_sites(root, category, 2, work / "sites")[0]
    unseen = unseen_test_set(root, category, site, work / "unseen")
    scored = sorted({path.name for path in (unseen / category / "test").iterdir()} - {"good"})
    batch = 4 if args.quick else 8
    dam_only = {"generated_fraction": 0.0, "generator_steps": 0, "type_head_source": "dam"}
    results = []
    for name, variant in (("generated + DAM", {}), ("DAM only", dam_only)):
        seed_everything(args.seed, workers=True)
        model = DADDA(**(settings | variant))  # type: ignore[arg-type]
        engine(work / f"{name}_fit").fit(model=model, datamodule=few_defects(site.root, category, args.k, batch))
        test_data = MVTecAD(root=unseen, category=category, eval_batch_size=batch, num_workers=0, seed=0)
        metrics = raw_test(engine(work / f"{name}_test"), model, test_data)
        print(f"{category} {site.name} {name} on {scored}: {metrics}", flush=True)
        results.append(metrics)
    generated, pasted = results
    return [
        category,
        ", ".join(site.defect_types),
        ", ".join(scored),
        *(f"{metrics[key]:.3f}" for key in ("image_AUROC",) for metrics in (generated, pasted)),
        *(f"{metrics[key]:.3f}" for key in ("pixel_AUROC",) for metrics in (generated, pasted)),
    ]


@torch.no_grad()
def defect_panels(model: DADDA, data: MVTecADFewDefects) -> list[tuple[str, list[torch.Tensor]]]:
    """Per defect type: a real lent defect, a DAM output and a generated defect (with its mask drawn in)."""
    dam = model._require_dam()
    normals = model._normal_images
    assert normals is not None  # noqa: S101 - set by fit
    lent = data.defect_data
    panels = []
    for column, name in enumerate(model.type_names):
        index = next(i for i, p in enumerate(lent.samples.image_path) if Path(p).parent.name == name)
        real = model.pre_processor(lent[index].image[None])[0]
        types = torch.tensor([column])
        torch.manual_seed(column)
        pasted = dam(normals[column : column + 1], types)
        torch.manual_seed(column)
        generated, masks = model.defective_batch(normals[column : column + 1], 1.0, 1.0, types)
        panels.append((name, [real, pasted.images[0], generated[0], masks[0, 0]]))
    return panels


def draw_defects(panels: list, path: Path) -> None:
    """Rows: real lent defects, DAM outputs, generated defects of each category; one column per defect type."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(types) for _, types in panels)
    figure, axes = plt.subplots(3 * len(panels), columns, figsize=(1.9 * columns, 1.9 * 3 * len(panels)), squeeze=False)
    for block, (category, types) in enumerate(panels):
        for column, (name, (real, pasted, generated, mask)) in enumerate(types):
            for offset, (image, label) in enumerate(((real, "real"), (pasted, "DAM"), (generated, "generated"))):
                axis = axes[3 * block + offset, column]
                axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
                if offset == 2 and mask.any():
                    axis.contour(mask.numpy(), levels=[0.5], colors="white", linewidths=0.6)
                axes[3 * block + offset, 0].set_ylabel(f"{category}\n{label}", fontsize=8)
            axes[3 * block, column].set_title(name, fontsize=8)
    finish_figure(figure, axes, path)


def mean_row(label: str, values: list[list[float]]) -> list[str]:
    means = np.nanmean(np.asarray(values, dtype=float), axis=0)
    return [label, "", "", *[f"{value:.3f}" for value in means[:-1]], f"{means[-1]:.1f}"]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    categories = args.categories[:1] if args.quick else args.categories
    check_categories(categories, args.textures)
    if unknown := sorted(set(args.held_out) - set(categories)):
        raise SystemExit(f"--held-out {' '.join(unknown)}: not among --categories.")
    settings = dadda_settings(args, default_steps=DEFAULT_STEPS)
    start = time.perf_counter()
    panels: list = []
    rows, values, gains = [], {}, []
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        root = build_categories(work / "data", categories, args.textures, sizes=QUICK_SIZES if args.quick else None)
        for category in categories:
            row, values[category] = per_category(root, category, args, settings, work / category, panels)
            rows.append([f"{category} (held out)" if category in args.held_out else category, *row[1:]])
            gains.append(never_held(root, category, args, settings, work / category / "never_held"))
        minutes = (time.perf_counter() - start) / 60
    held_out = [values[c] for c in categories if c in args.held_out]
    tuned = [values[c] for c in categories if c not in args.held_out]
    means = [
        mean_row(f"mean, {label}", group)
        for label, group in (("tuning and demo", tuned), ("held out", held_out))
        if group
    ]
    means.append(mean_row("mean, all", list(values.values())))
    figure = None if args.figure == "-" or (args.quick and args.figure is None) else Path(args.figure or FIGURE)
    if figure is not None:
        draw_defects(panels, figure)
    report = "\n".join(
        [
            "# D-ADDA: defect types and what the generated defects teach",
            "",
            generated_line("dadda.py", argv, minutes),
            "",
            f"## Defect-type accuracy and AUROC per category (k = {args.k} real defects per type lent)",
            "",
            markdown_table(TYPE_COLUMNS, rows + means),
            "",
            "Scored on the held-out real defects of the test split; lent images are never scored. The head is a "
            "linear classifier (scikit-learn's shrunk linear discriminant, `type_head_classifier: lda`) on the "
            "detector's features pooled inside a region, fitted on DAM pastes of the lent defects plus generated "
            "defects of each type (DADDA's default, `type_head_source: both`) or on generated defects only (the "
            "paper's protocol, `type_head_source: generated`); the detector is the same. *True mask*: features "
            "pooled inside the defect's ground-truth mask (the paper's protocol: it measures the head alone, given a "
            "perfect region). *Own region*: inside the pixels the model marks (anomaly map at or above its pixel "
            "threshold, set on synthetic anomalies, no test label); an image where it marks nothing counts as wrong: "
            "what a user gets. Training minutes: `Engine.fit` wall-clock (generator, generated pool, detector and "
            "head).",
            "",
            "## Does the detector gain from generated defects? (the types a site never held)",
            "",
            markdown_table(GAIN_COLUMNS, gains),
            "",
            "A site holds half of the category's defect types (k real defects each, `split_into_sites`). Its "
            "detector trains twice with the same detector steps: with generated defects (DADDA's default: half of "
            "the defects it sees are the generator's, half DAM pastes) and with DAM pastes only "
            "(`generated_fraction: 0`, no generator). Both are scored on the full test split's normal images and the "
            "defect types the site never held. AUROC needs no threshold; every AUROC here is computed on the raw "
            "scores and maps (as in `benchmarks/report.py`), not on anomalib's normalised ones, which are clamped "
            "to the range seen on the synthetic validation split.",
            "",
            "![Real, DAM and generated defects per type](../figures/dadda_defects.png)",
            "",
            "- Data: "
            + (f"demo categories and texture photographs of `{args.textures}`" if args.textures else "demo categories")
            + " with the demo's planted defects (`make_demo_dataset`, seed 0, MVTec AD layout, 256x256 unless "
            "--quick).",
            f"- DADDA settings: `{settings}` (all else default); k = {args.k}.",
            "- This script measures quality and training time; nothing else ran on the machine unless its log says so.",
            machine_line(),
            "",
        ]
    )
    publish(report, args, REPORT)


if __name__ == "__main__":
    main()
