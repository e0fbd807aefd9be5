"""Which generated defects D-ADDA's pool should keep: selection rules rescored on a defect-type page's trained models.

``benchmarks/dadda.py --work-dir W`` keeps every category's trained D-ADDA (generator and detector) under ``W``. This
script loads each category's main model (k real defects per type lent), rebuilds its generated pool with each
selection rule from the pool seed the model was trained with, refits the type head on generated defects only (the
paper's protocol) and tests it on the same held-out real defects (true mask / own region). The detector is the one
trained with the default pool in every row, so the rows differ only in which generated defects the head learns from.

Rules (``--rules``):

- ``bar``: the default, ``generated_min_change: 0.5`` (a draw that changes its crop by less than half the DAM
  pastes' median change is drawn again; docs/dadda.md, *Our choices*);
- ``nobar``: ``generated_min_change: 0`` (the first draws);
- ``likeness``: draw three times the pool and keep the draws whose colour statistics inside the mask (mean change
  per channel, mean absolute change, change of the spread) lie nearest those of the DAM pastes of the same type in
  the same masks, in units of the pastes' spread.

Per type it also prints those colour statistics, the pastes' and the generated draws' (before selection), which say
what the generator draws differently from the real defects. About 10 minutes per category on 2 cores::

    python benchmarks/dadda.py --textures ../shared/devbench/textures --work-dir runs/page6/work \\
        --categories brick grass gravel hard-grain paper-torchon waveflex --held-out hard-grain paper-torchon waveflex
    python benchmarks/dadda_pool_selection.py --work-dir runs/page6/work --categories brick grass gravel
"""

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dadda_federated import few_defects
from report import engine

from anomalib_diffusion.augmentation.defects import change_inside
from anomalib_diffusion.models import DADDA

STATISTICS = ("change_r", "change_g", "change_b", "abs_change", "spread_change")


def colour_statistics(images: torch.Tensor, backgrounds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B, 5)`` inside each mask: mean change per channel, mean absolute change (the pool bar's ``change_inside``),
    change of the mean channel spread."""
    area = masks.flatten(1).sum(1).clamp_min(1)

    def mean(values: torch.Tensor) -> torch.Tensor:
        return (values * masks).flatten(2).sum(2) / area[:, None]

    def spread(values: torch.Tensor) -> torch.Tensor:
        centred = values - mean(values)[:, :, None, None]
        return mean(centred**2).sqrt().mean(1)

    absolute = change_inside(images, backgrounds, masks)[:, None]
    return torch.cat(
        [mean(images - backgrounds).cpu(), absolute, (spread(images) - spread(backgrounds))[:, None].cpu()], 1
    )


def draw(
    model: DADDA, normal_images: torch.Tensor, defect_type: int, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` generated defects of one type: ``(images, masks, their statistics, their DAM pastes' statistics)``."""
    images, masks, generated, pasted = [], [], [], []
    for start in range(0, count, 8):
        outputs, batch_masks, backgrounds, pastes = model._generated_draw(
            normal_images, defect_type, min(8, count - start)
        )
        images.append(outputs.cpu())
        masks.append(batch_masks.cpu())
        generated.append(colour_statistics(outputs, backgrounds, batch_masks))
        pasted.append(colour_statistics(pastes, backgrounds, batch_masks))
    return torch.cat(images), torch.cat(masks), torch.cat(generated), torch.cat(pasted)


def likeness_selection(model: DADDA, report: dict) -> object:
    """A replacement of ``DADDA._visible_generated``: 3x the pool drawn, the nearest to the type's pastes kept."""

    def select(normal_images: torch.Tensor, defect_type: int, bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks, generated, pasted = draw(model, normal_images, defect_type, 3 * model.generated_pool)
        centre, scale = pasted.mean(0), pasted.std(0).clamp_min(1e-3)
        distance = ((generated - centre) / scale).square().sum(1)
        keep = distance.argsort()[: model.generated_pool]
        name = model.type_names[defect_type]
        report[name] = {
            "pastes": [round(value, 3) for value in pasted.mean(0).tolist()],
            "generated": [round(value, 3) for value in generated.mean(0).tolist()],
            "kept": [round(value, 3) for value in generated[keep].mean(0).tolist()],
        }
        bar.update(model.generated_pool)
        return images[keep], masks[keep]

    return select


def rescore(work: Path, category: str, rules: Sequence[str], k: int, seed: int) -> dict:
    checkpoint = next((work / category / f"{category}_all_types").rglob("model.ckpt"))
    model = DADDA.load_from_checkpoint(checkpoint, visualizer=False)
    data = few_defects(work / "data", category, k, batch=8)
    model.prepare_defect_bank(data)
    model._pool_seed = model._resumed_pool_seed  # the pool the model was trained with
    result: dict = {"category": category, "statistics": list(STATISTICS), "per_type": {}}
    with tempfile.TemporaryDirectory() as folder:
        runner = engine(Path(folder))
        for rule in rules:
            if rule == "likeness":
                model._visible_generated = likeness_selection(model, result["per_type"])
            else:
                model.__dict__.pop("_visible_generated", None)
                model.generated_min_change = {"bar": 0.5, "nobar": 0.0}[rule]
            model.type_head_source = "generated"
            torch.manual_seed(seed)  # the head's defects: the same draw for every rule
            model.build_generated_pool()
            model.fit_defect_type_head()
            metrics = runner.test(model=model, datamodule=data, verbose=False)[0]
            result[rule] = [
                round(metrics.get("defect_type_accuracy", float("nan")), 3),
                round(metrics.get("defect_type_accuracy_own_region", float("nan")), 3),
            ]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="the --work-dir of a benchmarks/dadda.py run")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument(
        "--rules", nargs="+", default=["bar", "likeness", "nobar"], choices=["bar", "likeness", "nobar"]
    )
    parser.add_argument("--k", type=int, default=3, help="real defects per type lent, as the page's run (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the head's defect draw")
    args = parser.parse_args(argv)
    for category in args.categories:
        print(json.dumps(rescore(args.work_dir, category, args.rules, args.k, args.seed)), flush=True)


if __name__ == "__main__":
    main()
