"""How DADDA's training defaults were chosen: variants on the *tuning* textures of the devbench.

Each ``--run`` is a JSON object of ``DADDA`` arguments (plus a ``"tag"``); each is trained and tested on
every ``--category`` exactly as ``benchmarks/report.py`` does (anomalib ``Engine``, ``MVTecAD`` with a
synthetic validation split, AUROC with scikit-learn on raw scores and maps), one-class (procedural seeds,
``defects_per_type`` 0) unless ``--k`` lends real defects. One JSON line per result is printed and
appended to ``--log``. The defaults of ``DADDA``'s ``generated_pool`` and ``detector_crop`` are what this
gave on the tuning half (bump-relief, melt, vegetal); the held-out half is measured only by
``benchmarks/report.py``. The runs behind docs/dadda.md's *Our choices*::

    anomalib-diffusion-demo-data --textures ../shared/devbench/textures --root datasets/devbench
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories melt \\
        --run '{"tag": "fresh_full_150", "generated_pool": 0, "detector_crop": null,
                "generator_steps": 150, "detector_steps": 150}' \\
        --run '{"tag": "pool_crop128_150", "generator_steps": 150, "detector_steps": 150}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief --k 3 \\
        --head-strengths 1.0 0.6 0.4 --run '{"tag": "k3_pool_crop128_150", "generator_steps": 150, "detector_steps": 150}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories vegetal --k 3 \\
        --head-strengths 1.0 0.6 0.4 --run '{"tag": "k3_pool_crop128_150", "generator_steps": 150, "detector_steps": 150}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief \\
        --run '{"tag": "pool_crop128_150", "generator_steps": 150, "detector_steps": 150}' \\
        --run '{"tag": "pool_crop128_300", "generator_steps": 300, "detector_steps": 300}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief vegetal --k 3 \\
        --head-strengths 1.0 --run '{"tag": "k3_sample_150", "generator_steps": 150, "detector_steps": 150,
                                     "generator_target": "sample"}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief vegetal --k 3 \\
        --head-strengths 1.0 \\
        --run '{"tag": "k3_sample_repaint_150", "generator_steps": 150, "detector_steps": 150,
                "generator_target": "sample", "generation_repaint": true}' \\
        --run '{"tag": "k3_sample_repaint_cfg3_150", "generator_steps": 150, "detector_steps": 150,
                "generator_target": "sample", "generation_repaint": true, "generator_guidance": 3.0}' \\
        --run '{"tag": "k3_eps_repaint_150", "generator_steps": 150, "detector_steps": 150, "generation_repaint": true}' \\
        --run '{"tag": "k3_eps_cfg3_150", "generator_steps": 150, "detector_steps": 150, "generator_guidance": 3.0}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief --k 3 --head-strengths 1.0 \\
        --run '{"tag": "k3_gen600_150", "generator_steps": 600, "detector_steps": 150}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief vegetal --k 3 \\
        --head-strengths 1.0 --run '{"tag": "k3_alpha_150", "generator_steps": 150, "detector_steps": 150, "blending": "alpha"}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief vegetal melt --k 3 \\
        --head-strengths 1.0 \\
        --run '{"tag": "k3_res_sample_150", "generator_steps": 150, "detector_steps": 150,
                "generator_residual": true, "generator_target": "sample"}' \\
        --run '{"tag": "k3_eps_150", "generator_steps": 150, "detector_steps": 150,
                "generator_residual": false, "generator_target": "epsilon"}' \\
        --run '{"tag": "k3_res_eps_150", "generator_steps": 150, "detector_steps": 150,
                "generator_residual": true, "generator_target": "epsilon"}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief vegetal melt --k 3 \
        --head-variants --head-samples 32 32 32 128 512 \
        --run '{"tag": "k3_heads_150_s42", "generator_steps": 150, "detector_steps": 150}'
    python benchmarks/dadda_tuning.py --root datasets/devbench --categories bump-relief vegetal melt --k 3 \
        --head-gates 0 0.25 0.5 0.75 \
        --run '{"tag": "k3_gate0_150", "generator_steps": 150, "detector_steps": 150, "generated_min_change": 0.0}'

(The ``--head-gates`` run, 2026-12-07, chose ``generated_min_change``: the detector trains without the gate, then
the generated pool is rebuilt with each value from the same seed and a head of generated defects only is refitted;
each refit draws its head defects anew, so one defect's difference is that spread.
The ``--head-variants`` run was made on 2026-12-06 when ``type_samples_per_type`` was 32 and the head a logistic
regression; it fits every classifier on the same features, so the defaults it chose do not change what it
measures. The command before it ran on 2026-12-06 with ``k3_eps_150`` and ``k3_res_eps_150`` written without the
``generator_target`` and ``k3_eps_150`` without ``generator_residual``, which were then ``"epsilon"`` and false by
default; since, the defaults are ``k3_res_sample_150``'s. For the commands before it, ``generated_pool`` 32,
``detector_crop`` 128, ``generator_target`` ``"epsilon"``, ``generation_repaint`` false, ``generator_guidance`` 1
and ``blending`` ``"mixed"`` were the defaults. Only the vegetal and ``generator_target`` runs were made after the
pool was seeded from the generator's weights (commit dd16c9b); the others drew it from the global random stream, so
a rerun of them draws another pool of the same kind.)
"""

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import engine
from dadda_federated import few_defects
from report import datamodule, train_and_score
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from anomalib_diffusion.components import build_unet
from anomalib_diffusion.models.dadda.type_head import DefectTypeStatistics, pooled_type_head


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD-layout root (e.g. datasets/devbench)")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--run", action="append", required=True, help="JSON object: DADDA arguments and a tag")
    parser.add_argument("--k", type=int, default=0, help="real defective images per type lent (0: one-class)")
    parser.add_argument("--seed", type=int, default=42, help="as configs/benchmark.yaml")
    parser.add_argument(
        "--head-strengths",
        type=float,
        nargs="*",
        default=[],
        help="after each fit: rebuild the generated pool at each of these generation_strength values, refit the "
        "type head on generated defects only (the paper's protocol) and test again (needs --k)",
    )
    parser.add_argument(
        "--head-gates",
        type=float,
        nargs="*",
        default=[],
        help="after each fit: rebuild the generated pool with each of these generated_min_change values, refit the "
        "type head on generated defects only and test again; reports the pool's defects per type too (needs --k)",
    )
    parser.add_argument(
        "--head-variants",
        action="store_true",
        help="after each fit: compute the detector features of generated head defects (and of DAM + generated) and of "
        "the real test defects inside their true masks once, then fit several classifiers on the same features and "
        "report each one's accuracy (needs --k)",
    )
    parser.add_argument(
        "--head-samples",
        type=int,
        nargs="+",
        default=[32],
        help="head defects per type for --head-variants; each count is a new draw (repeat one to see the spread)",
    )
    parser.add_argument("--log", type=Path, default=None, help="append the JSON lines here too")
    return parser.parse_args(argv)


def head_classifiers() -> dict:
    """Classifiers on the detector's mask-pooled features, each ``fit(x, y) -> predict``; all standardise first."""

    def pipeline(classifier: object) -> object:
        return make_pipeline(StandardScaler(), classifier)

    return {
        "logistic_C1": lambda: pipeline(LogisticRegression(max_iter=2000)),
        "logistic_C0.1": lambda: pipeline(LogisticRegression(C=0.1, max_iter=2000)),
        "logistic_C0.01": lambda: pipeline(LogisticRegression(C=0.01, max_iter=2000)),
        "logistic_C0.001": lambda: pipeline(LogisticRegression(C=0.001, max_iter=2000)),
        "lda_shrinkage": lambda: pipeline(LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")),
        "nearest_centroid": lambda: pipeline(NearestCentroid()),
        "shared_diagonal": SharedDiagonal,
    }


class SharedDiagonal:
    """The federated head (:func:`pooled_type_head`): class means, one diagonal variance shared by all types."""

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "SharedDiagonal":
        statistics = DefectTypeStatistics.empty(int(labels.max()) + 1, features.shape[1])
        self.rows, self.weight, self.bias = pooled_type_head(statistics.add_features(features, labels))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        logits = torch.as_tensor(features, dtype=torch.float64) @ self.weight.T + self.bias
        return self.rows[logits.argmax(dim=1)].numpy()


def head_variants(model: object, runner: object, data: object, samples: Sequence[int]) -> dict:
    """Accuracy on the real test defects (true mask) of each classifier of :func:`head_classifiers`, fitted on the
    same features: generated defects only (the paper's protocol) and DAM pastes + generated (the default head)."""
    recorded, calls = [], [0]
    original_step, original_correct = model.test_step, model.correct_defect_types

    def test_step(*args: object, **kwargs: object) -> object:
        calls[0] = 0
        return original_step(*args, **kwargs)

    def record(images: torch.Tensor, regions: torch.Tensor, truth: torch.Tensor) -> int:
        if calls[0] == 0:  # a test step's first call pools inside the true masks, the second in the model's region
            recorded.append((model.model.detector.mask_features(images, regions).cpu(), truth.clone()))
        calls[0] += 1
        return original_correct(images, regions, truth)

    model.test_step, model.correct_defect_types = test_step, record
    try:
        runner.test(model=model, datamodule=data, verbose=False)
    finally:
        del model.test_step, model.correct_defect_types
    test_x = torch.cat([features for features, _ in recorded]).double().numpy()
    test_y = torch.cat([truth for _, truth in recorded]).numpy()
    # Put back what the variants change, so that a --head-strengths measurement after them sees the fitted model.
    kept = {
        name: getattr(model, name)
        for name in ("generation_strength", "type_head_source", "type_samples_per_type", "generated_dam")
    }
    model.generation_strength = 1.0
    results = {}
    generator = model.model.generator
    trained = generator.unet
    sources = [(source, count, draw) for draw, count in enumerate(samples) for source in ("generated", "both")]
    sources.append(("untrained_generator", max(samples), 0))
    for source, count, draw in sources:
        model.type_head_source = "both" if source == "both" else "generated"
        model.type_samples_per_type = count
        if source == "untrained_generator":
            # The control: the same detector, and generated defects from a generator that never trained (same
            # masks, pool size and DAM); what the head still gets right comes from the masks and the pastes.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                generator.unet = build_unet(generator.unet_config)
            model.build_generated_pool()
        types = list(range(len(model.type_names)))
        with torch.no_grad():
            features, labels = model._type_head_features(types)
        train_x, train_y = features.double().numpy(), labels.numpy()
        for name, make in head_classifiers().items():
            predicted = make().fit(train_x, train_y).predict(test_x)
            results[f"{source}/n{count}#{draw}/{name}"] = round(float((predicted == test_y).mean()), 3)
    generator.unet = trained
    for name, value in kept.items():
        setattr(model, name, value)
    results["test_defects"] = len(test_y)
    return results


def generated_only_head(model: object, runner: object, data: object, setting: str, value: float) -> list[float]:
    """Set one DADDA ``setting``, rebuild the generated pool, refit the head on generated defects only (the paper's
    protocol) and test: ``[accuracy in the true mask, accuracy in the model's own region]``, rounded to 3 places."""
    setattr(model, setting, value)
    model.type_head_source = "generated"
    model.build_generated_pool()
    model.fit_defect_type_head()
    metrics = runner.test(model=model, datamodule=data, verbose=False)[0]
    return [
        round(metrics.get("defect_type_accuracy", float("nan")), 3),
        round(metrics.get("defect_type_accuracy_own_region", float("nan")), 3),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    runs = [json.loads(text) for text in args.run]
    for run in runs:
        settings = {key: value for key, value in run.items() if key != "tag"}
        settings.setdefault("visualizer", False)
        for category in args.categories:
            with tempfile.TemporaryDirectory() as work:
                if args.k:
                    data = few_defects(args.root, category, args.k, batch=8)
                else:
                    data = datamodule(args.root, category, args.seed, batch=8)
                model, _checkpoint, result = train_and_score("DADDA", settings, data, Path(work), args.seed)
                runner = engine(Path(work) / "heads")  # the heads below are tested on the trained model
                heads, variants = {}, {}
                if args.head_variants:
                    variants = head_variants(model, runner, data, args.head_samples)
                for strength in args.head_strengths:
                    heads[str(strength)] = generated_only_head(model, runner, data, "generation_strength", strength)
                gates = {}
                for gate in args.head_gates:
                    accuracy, own_region = generated_only_head(model, runner, data, "generated_min_change", gate)
                    pool = model.generated_dam.bank.counts() if model.generated_dam is not None else {}
                    gates[str(gate)] = {"accuracy": accuracy, "accuracy_own_region": own_region, "pool": pool}
            line = {
                "tag": run.get("tag", ""),
                "category": category,
                "k": args.k,
                "image_AUROC": round(result.metrics["image_AUROC"], 4),
                "pixel_AUROC": round(result.metrics["pixel_AUROC"], 4),
                "PRO": round(result.metrics.get("pixel_AUPRO", float("nan")), 4),
                "fit_s": round(result.fit_seconds, 1),
                "type_accuracy": result.metrics.get("defect_type_accuracy"),
                "type_accuracy_own_region": result.metrics.get("defect_type_accuracy_own_region"),
                "generated_only_head_by_strength": heads,
                "generated_only_head_by_gate": gates,
                "head_variants": variants,
                "settings": settings,
            }
            del model
            text = json.dumps(line)
            print(text, flush=True)
            if args.log is not None:
                with args.log.open("a") as log:
                    log.write(text + "\n")


if __name__ == "__main__":
    main()
