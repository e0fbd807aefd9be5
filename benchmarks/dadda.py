"""D-ADDA on the offline demo data set: defect-type accuracy, AUROC, and federated vs local-only training.

Two parts, one report (``docs/benchmarks/dadda.md``) and one figure (``docs/figures/dadda_defects.png``):

1. **Per category** (the paper's protocol, on the demo categories instead of MVTec AD's 14):
   ``MVTecADFewDefects`` lends ``--k`` real defective images per type to training and removes them
   from the test split; DADDA trains; anomalib's ``Engine.test`` reports image / pixel AUROC and
   the defect-type accuracy of the head (fitted on generated defects only) on the held-out real
   defects. Chance level is 1 / number of types.
2. **Federated** (first category): the data is split into ``--sites`` sites with disjoint defect
   types (``split_into_sites``). Each site trains a local-only DADDA with the whole budget
   (``rounds x`` the per-round steps); the federation (``anomalib-diffusion-federated simulate``, Flower's
   simulation engine) trains the same budget per site in ``--rounds`` FedAvg rounds. Every model
   is scored on the *full* test split restricted to the defect types that its site never saw
   (plus the normal test images): can a site detect defects it has no example of?

Rerun (writes the report; about an hour on 2 cores, its header gives the time it took)::

    python benchmarks/dadda.py --steps 100 --rounds 2

The default (three categories, 300 steps per phase, 3 rounds) trains eight DADDA models at 256x256 and
takes several hours on a 2-core CPU; a full run of ``--steps 240`` on one category did not finish in three.

Smoke test (tiny data and models; prints only)::

    python benchmarks/dadda.py --quick
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import seed_everything

from anomalib_diffusion.data import DEMO_CATEGORIES, MVTecADFewDefects, make_demo_dataset
from anomalib_diffusion.models import DADDA

sys.path.insert(0, str(Path(__file__).parent))
from common import engine, finish_figure, generated_line, machine_line, markdown_table, publish
from dadda_federated import FEDERATED_COLUMNS, dadda_settings, federated, few_defects

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "dadda.md"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "dadda_defects.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", choices=list(DEMO_CATEGORIES), default=list(DEMO_CATEGORIES))
    parser.add_argument("--k", type=int, default=3, help="real defective images per type lent to training")
    parser.add_argument("--steps", type=int, default=None, help="generator and detector steps each (default 300)")
    parser.add_argument("--sites", type=int, default=2, help="federated sites (disjoint defect types)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (each: --steps / rounds per phase)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the demo data (0: the reported set)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything before building each model")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    parser.add_argument("--output", default=None, help=f"report path ('-' prints only; default {REPORT})")
    parser.add_argument("--figure", default=None, help=f"figure path ('-': none; default {FIGURE})")
    parser.add_argument("--quick", action="store_true", help="tiny data and models, a few steps; prints only")
    return parser.parse_args(argv)


def per_category(
    root: Path, category: str, args: argparse.Namespace, settings: dict, work: Path, figure: Path | None
) -> list[str]:
    seed_everything(args.seed, workers=True)
    model = DADDA(**settings)  # type: ignore[arg-type]
    data = few_defects(root, category, args.k, 4 if args.quick else 8)
    run = engine(work / f"{category}_local")
    run.fit(model=model, datamodule=data)
    metrics = run.test(model=model, datamodule=data, verbose=False)[0]
    print(f"{category}: {metrics}", flush=True)
    if figure is not None:
        draw_defects(model, data, figure)
    # The paper's protocol: the same detector, its head refitted on generated defects only.
    model.type_head_source = "generated"
    model.fit_defect_type_head()
    generated_only = run.test(model=model, datamodule=data, verbose=False)[0]["defect_type_accuracy"]
    print(f"{category}: defect-type accuracy with the head on generated defects only: {generated_only}", flush=True)
    types = len(model.type_names)
    return [
        category,
        str(types),
        str(args.k),
        str(len(data.test_data.samples.query("label_index == 1"))),
        f"{metrics['defect_type_accuracy']:.3f}",
        f"{generated_only:.3f}",
        f"{1 / types:.3f}",
        f"{metrics['image_AUROC']:.3f}",
        f"{metrics['pixel_AUROC']:.3f}",
    ]


@torch.no_grad()
def draw_defects(model: DADDA, data: MVTecADFewDefects, path: Path) -> None:
    """Rows: real lent defects, DAM outputs, generated defects (one column per defect type)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    dam = model._require_dam()
    normals = model._normal_images
    assert normals is not None  # noqa: S101 - set by fit
    count = len(model.type_names)
    figure, axes = plt.subplots(3, count, figsize=(2.4 * count, 7.5), squeeze=False)
    lent = data.defect_data
    for column, name in enumerate(model.type_names):
        index = next(i for i, p in enumerate(lent.samples.image_path) if Path(p).parent.name == name)
        item = lent[index]
        real = model.pre_processor(item.image[None])[0]
        types = torch.tensor([column])
        torch.manual_seed(column)
        pasted = dam(normals[column : column + 1], types)
        torch.manual_seed(column)
        generated, masks = model.defective_batch(normals[column : column + 1], 1.0, 1.0, types)
        panels = [(real, "real (lent)"), (pasted.images[0], "DAM output"), (generated[0], "generated")]
        for row, (image, label) in enumerate(panels):
            axes[row, column].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            if row == 2 and masks[0].any():
                axes[row, column].contour(masks[0, 0].numpy(), levels=[0.5], colors="white", linewidths=0.6)
            axes[row, 0].set_ylabel(label)
        axes[0, column].set_title(name, fontsize=9)
    finish_figure(figure, axes, path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    categories = args.categories[:1] if args.quick else args.categories
    settings = dadda_settings(args, default_steps=300)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        data_root = work / f"demo_seed{args.data_seed}"
        sizes = {"n_train": 8, "n_test_good": 4, "n_test_per_defect": 4, "image_size": 64} if args.quick else {}
        make_demo_dataset(data_root, categories=categories, seed=args.data_seed, progress=False, **sizes)
        start = time.perf_counter()
        figure = None if args.figure == "-" or (args.quick and args.figure is None) else Path(args.figure or FIGURE)
        rows = [
            per_category(data_root, category, args, settings, work, figure if category == categories[0] else None)
            for category in categories
        ]
        federated_rows = federated(data_root, categories[0], args, settings, work / "federated")
        minutes = (time.perf_counter() - start) / 60
    report = "\n".join(
        [
            "# D-ADDA on the demo data set",
            "",
            generated_line("dadda.py", argv, minutes),
            "",
            "## Defect-type accuracy and AUROC per category",
            "",
            markdown_table(
                [
                    "category",
                    "defect types",
                    "real defects lent per type (k)",
                    "held-out real defects",
                    "defect-type accuracy (head: DAM + generated)",
                    "defect-type accuracy (head: generated only)",
                    "chance",
                    "image AUROC",
                    "pixel AUROC",
                ],
                rows,
            ),
            "",
            "Defect-type accuracy is scored on the held-out real defects (their ground-truth masks give the "
            "region); lent images are never scored. The head is a logistic regression on the detector's features "
            "inside the mask, fitted either on DAM pastes of the lent defects plus generated defects of each type "
            "(DADDA's default, `type_head_source: both`) or on generated defects only (the paper's protocol, "
            "`type_head_source: generated`); the detector is the same.",
            "",
            f"## Federated ({args.sites} sites with disjoint defect types, {args.rounds} rounds) vs local only, "
            f"category {categories[0]}",
            "",
            markdown_table(FEDERATED_COLUMNS, federated_rows),
            "",
            "Measured as `benchmarks/dadda_federated.py` measures it (its page, docs/benchmarks/dadda_federated.md, "
            "covers devbench textures too): both detectors of a site get the same number of local optimiser steps, "
            "the federated one in FedAvg rounds on Flower's simulation engine; scores use the full test split's normal "
            "images and the defect types the site never held; defect-type accuracy is n/a for a local-only detector, "
            "which knows only its own site's type names. "
            "This script measures quality only (it may share the machine with other work).",
            "",
            f"- Data: offline demo set (`make_demo_dataset`, seed {args.data_seed}), MVTec AD layout, 256x256 "
            "unless --quick.",
            f"- DADDA settings: `{settings}` (all else default); k = {args.k}.",
            machine_line(),
            "",
        ]
    )
    publish(report, args, REPORT)


if __name__ == "__main__":
    main()
