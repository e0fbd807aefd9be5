"""Federated D-ADDA vs local-only training, on the defect types each site never held (demo and devbench categories).

Per category, the data is split into ``--sites`` sites with disjoint defect types (``split_into_sites``):

- **local only**: each site trains DADDA on its own data with the whole budget (``--rounds x`` the per-round steps);
- **federated**: ``anomalib-diffusion-federated simulate`` (Flower's simulation engine) trains the same budget per
  site in ``--rounds`` FedAvg rounds; after the last round every site sends per-type feature sums of the *global*
  detector on its own types' defects, and the server fits one defect-type head from them.

Every model is scored (anomalib ``Engine.test``) on the *full* test split restricted to the defect types its site
never held, plus the normal test images: image / pixel AUROC, and for the federated model the defect-type accuracy
(the head's type for the defect inside its ground-truth mask; a local-only model knows only its own types' names).

Rerun (writes docs/benchmarks/dadda_federated.md; its header gives the time it took)::

    python benchmarks/dadda_federated.py --textures ../shared/devbench/textures \\
        --categories brick grass gravel hard-grain paper-torchon waveflex --steps 60 --rounds 2

Smoke test (tiny data and models; prints only)::

    python benchmarks/dadda_federated.py --quick
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from anomalib.data import MVTecAD
from lightning import seed_everything

from anomalib_diffusion.data import MVTecADFewDefects
from anomalib_diffusion.federated.sites import Site, split_into_sites
from anomalib_diffusion.models import DADDA

sys.path.insert(0, str(Path(__file__).parent))
from common import build_categories, check_categories, engine, generated_line, machine_line, markdown_table, publish

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "dadda_federated.md"
# make_demo_dataset's image counts and size for --quick runs
QUICK_SIZES = {"n_train": 8, "n_test_good": 4, "n_test_per_defect": 4, "image_size": 64}
FEDERATED_COLUMNS = [
    "category",
    "site",
    "its defect types",
    "scored on (never held by the site)",
    "detector",
    "image AUROC",
    "pixel AUROC",
    "defect-type accuracy",
    "chance",
    "training minutes",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=["brick"], help="demo categories and/or texture names")
    parser.add_argument("--textures", type=Path, default=None, help="a folder of texture photographs (devbench)")
    parser.add_argument("--k", type=int, default=3, help="real defective images per type each site lends to training")
    parser.add_argument("--steps", type=int, default=None, help="generator and detector steps each, in total (60)")
    parser.add_argument("--sites", type=int, default=2, help="sites (disjoint defect types)")
    parser.add_argument("--rounds", type=int, default=2, help="FedAvg rounds (each: --steps / --rounds per phase)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    parser.add_argument("--output", default=None, help=f"report path ('-' prints only; default {REPORT})")
    parser.add_argument("--quick", action="store_true", help="tiny data and models, a few steps; prints only")
    return parser.parse_args(argv)


def dadda_settings(args: argparse.Namespace, default_steps: int = 60) -> dict[str, object]:
    """DADDA's benchmark settings: ``--steps`` per phase (``default_steps``), tiny networks with ``--quick``."""
    steps = args.steps or (2 if args.quick else default_steps)
    settings: dict[str, object] = {"generator_steps": steps, "detector_steps": steps, "visualizer": False}
    if args.quick:
        settings |= {"image_size": 64, "patch_size": 32, "block_out_channels": [8, 16], "generation_steps": 3}
        settings |= {"detector_width": 8, "type_samples_per_type": 4, "procedural_seeds": 8}
    return settings


def few_defects(root: Path, category: str, k: int, batch: int) -> MVTecADFewDefects:
    """``k`` real defects per type lent to training, the rest to test (seed 0); thresholds from synthetic anomalies."""
    return MVTecADFewDefects(
        root=root,
        category=category,
        defects_per_type=k,
        train_batch_size=batch,
        eval_batch_size=batch,
        num_workers=0,
        val_split_mode="synthetic",  # thresholds from synthetic anomalies on normal training images, not test labels
        seed=0,
    )


def unseen_test_set(root: Path, category: str, site: Site, destination: Path) -> Path:
    """An MVTec AD-layout copy of the full test split with only the defect types ``site`` never saw."""
    source = root / category
    target = destination / category
    shutil.copytree(source / "train", target / "train")
    shutil.copytree(source / "test" / "good", target / "test" / "good")
    for folder in sorted((source / "test").iterdir()):
        if folder.name not in {"good", *site.defect_types}:
            shutil.copytree(folder, target / "test" / folder.name)
            shutil.copytree(source / "ground_truth" / folder.name, target / "ground_truth" / folder.name)
    return destination


def federated(root: Path, category: str, args: argparse.Namespace, settings: dict, work: Path) -> list[list[str]]:
    """Local-only vs federated detectors on each site's unseen defect types; one table row per site and detector."""
    sites = split_into_sites(root, category, args.sites, work / "sites")
    per_round = {key: max(1, int(settings[key]) // args.rounds) for key in ("generator_steps", "detector_steps")}
    total = {key: value * args.rounds for key, value in per_round.items()}
    batch = 4 if args.quick else 8
    config = {
        "federation": {"rounds": args.rounds, "seed": args.seed, "evaluate_each_round": False},
        "site": {"defects_per_type": args.k, "batch_size": batch},
        "model": {key: value for key, value in settings.items() if key != "visualizer"} | per_round,
    }
    config_path = work / "federated.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "anomalib_diffusion.federated", "simulate", "--root", str(root)]
    command += ["--category", category, "--sites", str(args.sites), "--config", str(config_path)]
    command += ["--work-dir", str(work / "federation")]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    federated_minutes = (time.perf_counter() - started) / 60
    global_model = DADDA.load_from_checkpoint(work / "federation" / "global.ckpt")
    rows = []
    for site in sites:
        seed_everything(args.seed, workers=True)
        local = DADDA(**(settings | total))  # type: ignore[arg-type]
        data = few_defects(site.root, category, args.k, batch)
        started = time.perf_counter()
        engine(work / f"{site.name}_local").fit(model=local, datamodule=data)
        local_minutes = (time.perf_counter() - started) / 60
        unseen = unseen_test_set(root, category, site, work / f"{site.name}_unseen")
        unseen_types = sorted({path.name for path in (unseen / category / "test").iterdir()} - {"good"})
        for name, model, minutes in (("local only", local, local_minutes), ("federated", global_model, None)):
            test_data = MVTecAD(root=unseen, category=category, eval_batch_size=batch, num_workers=0, seed=0)
            metrics = engine(work / f"{site.name}_{name}_test").test(model=model, datamodule=test_data, verbose=False)
            metrics = metrics[0]
            print(f"{category} {site.name} {name}: {metrics}", flush=True)
            rows.append(
                [
                    category,
                    site.name,
                    ", ".join(site.defect_types),
                    ", ".join(unseen_types),
                    name,
                    f"{metrics['image_AUROC']:.3f}",
                    f"{metrics['pixel_AUROC']:.3f}",
                    f"{metrics['defect_type_accuracy']:.3f}" if "defect_type_accuracy" in metrics else "n/a",
                    f"{1 / len(unseen_types + list(site.defect_types)):.3f}",
                    f"{minutes:.1f}" if minutes is not None else f"{federated_minutes:.1f} (all sites)",
                ]
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    categories = args.categories[:1] if args.quick else args.categories
    check_categories(categories, args.textures)
    settings = dadda_settings(args)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        root = build_categories(work / "data", categories, args.textures, sizes=QUICK_SIZES if args.quick else None)
        rows = [row for category in categories for row in federated(root, category, args, settings, work / category)]
        minutes = (time.perf_counter() - start) / 60
    federated_rows = [row for row in rows if row[4] == "federated"]
    accuracy = [float(row[7]) for row in federated_rows]
    chance = [float(row[8]) for row in federated_rows]
    report = "\n".join(
        [
            "# D-ADDA: federated vs local-only training on the defect types a site never held",
            "",
            generated_line("dadda_federated.py", argv, minutes),
            "",
            markdown_table(FEDERATED_COLUMNS, rows),
            "",
            f"Mean defect-type accuracy of the federated model on the types a site never held: "
            f"**{sum(accuracy) / len(accuracy):.3f}** over {len(accuracy)} sites x categories (chance "
            f"{sum(chance) / len(chance):.3f}).",
            "",
            f"{args.sites} sites per category with disjoint defect types; each lends k = {args.k} real defects per "
            f"type of its own. Both detectors of a site get the same local optimiser steps: the local-only one "
            f"{settings['generator_steps']} generator + {settings['detector_steps']} detector steps at once, the "
            f"federated one the same in {args.rounds} FedAvg rounds (Flower's simulation engine, the sites training "
            "at the same time on this machine's cores, so its minutes are for all sites together). Scores use the full "
            "test split's normal images and the defect types the site never held. Defect-type accuracy: the head's "
            "type for the defect inside its ground-truth mask (the paper's protocol); it is n/a for a local-only "
            "detector, which knows only its own site's type names. The federated head is fitted once after the last "
            "round from per-type feature sums that each site computes with the global detector on DAM pastes and "
            "generated defects of its own types (anomalib_diffusion.models.dadda.type_head).",
            "",
            "- Data: "
            + (f"demo categories and texture photographs of `{args.textures}`" if args.textures else "demo categories")
            + " with the demo's planted defects (`make_demo_dataset`, seed 0, MVTec AD layout, 256x256 unless "
            "--quick); AUROC and the ground-truth-mask type accuracy use no threshold.",
            f"- DADDA settings: `{settings}` (all else default).",
            machine_line(),
            "",
        ]
    )
    publish(report, args, REPORT)


if __name__ == "__main__":
    main()
