"""What DADDA's generator draws: its defects next to the DAM pastes it learnt from, per type, on one category.

Trains the generator alone (``generator_steps``, the detector one step) with ``--k`` real defects per type lent,
then, for every type, lets the DAM paste six real defects of that type on normal training images and lets the
generator draw a defect of that type in each of the same masks on the same backgrounds. Prints, per type, the mean
colour inside the mask (DAM paste, generated, background) and the mean absolute change from the background there;
``--figure`` saves the crops (DAM row above generated row). The runs behind docs/dadda.md's *Our choices*::

    python benchmarks/dadda_generator_probe.py --root datasets/devbench --category bump-relief \\
        --settings '{"generator_target": "epsilon", "generator_residual": false}' \\
        --figure docs/figures/dadda_generator_probe_epsilon.png
    python benchmarks/dadda_generator_probe.py --root datasets/devbench --category bump-relief \\
        --settings '{"generator_target": "sample", "generator_residual": false}' \\
        --figure docs/figures/dadda_generator_probe_sample.png
    python benchmarks/dadda_generator_probe.py --root datasets/devbench --category bump-relief \\
        --settings '{"generator_target": "epsilon"}'
    python benchmarks/dadda_generator_probe.py --root datasets/devbench --category bump-relief \\
        --figure docs/figures/dadda_generator_probe_residual.png

(The first was DADDA's default generator until 2026-12-06: the noise target on the defective crop. The last is its
default since: the clean change from the normal crop. The third is that change with the noise target.)
"""

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import engine, save_figure_atomically
from dadda_federated import few_defects

from anomalib_diffusion.models import DADDA
from anomalib_diffusion.models.dadda.torch_model import crop_at, defect_crop_boxes

PER_TYPE = 6


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD-layout root (e.g. datasets/devbench)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--k", type=int, default=3, help="real defective images per type lent")
    parser.add_argument("--generator-steps", type=int, default=300)
    parser.add_argument("--settings", default="{}", help="JSON object: further DADDA arguments")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--figure", type=Path, default=None)
    return parser.parse_args(argv)


def colour(crops: torch.Tensor, masks: torch.Tensor) -> list[float]:
    return [round(value, 3) for value in ((crops * masks).sum((0, 2, 3)) / masks.sum()).tolist()]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from lightning.pytorch import seed_everything

    seed_everything(args.seed, workers=True)
    data = few_defects(args.root, args.category, args.k, batch=8)
    settings = {"visualizer": False, "generated_pool": 0, "type_head_source": "dam", **json.loads(args.settings)}
    model = DADDA(generator_steps=args.generator_steps, detector_steps=1, **settings)
    with tempfile.TemporaryDirectory() as work:
        engine(Path(work)).fit(model=model, datamodule=data)
    model.eval()
    dam, images = model._require_dam(), model._normal_images
    if images is None:
        msg = "the fit kept no normal images"
        raise RuntimeError(msg)
    torch.manual_seed(0)
    rows = []
    for index, name in enumerate(model.type_names):
        picks = torch.randint(len(images), (PER_TYPE,))
        samples = dam(images[picks], torch.full((PER_TYPE,), index))
        pasted = samples.defect_types >= 0
        corners = defect_crop_boxes(samples.masks[pasted], model.patch_size)
        background = crop_at(images[picks][pasted], corners, model.patch_size)
        real = crop_at(samples.images[pasted], corners, model.patch_size)
        masks = crop_at(samples.masks[pasted], corners, model.patch_size)
        generated = model.model.generator.generate(
            background, masks, torch.full((len(masks),), index), generator=torch.Generator().manual_seed(1)
        )
        line = {
            "type": name,
            "colour_dam": colour(real, masks),
            "colour_generated": colour(generated, masks),
            "colour_background": colour(background, masks),
            "change_dam": round(float(((real - background).abs() * masks).sum() / masks.sum() / 3), 3),
            "change_generated": round(float(((generated - background).abs() * masks).sum() / masks.sum() / 3), 3),
            "settings": {"generator_steps": args.generator_steps, **json.loads(args.settings)},
        }
        print(json.dumps(line), flush=True)
        rows.append((name, real[:4], generated[:4]))
    if args.figure is not None:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(2 * len(rows), 4, figsize=(6, 3 * len(rows)))
        for row, (name, real, generated) in enumerate(rows):
            for column in range(4):
                for offset, (label, crops) in enumerate((("DAM", real), ("generated", generated))):
                    axis = axes[2 * row + offset, column]
                    axis.axis("off")
                    if column < len(crops):
                        axis.imshow(crops[column].permute(1, 2, 0).clamp(0, 1).numpy())
                        axis.set_title(f"{name}: {label}", fontsize=7)
        figure.tight_layout()
        save_figure_atomically(figure, args.figure)


if __name__ == "__main__":
    main()
