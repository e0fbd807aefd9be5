"""The benchmark page users read: every model of a benchmark config, quality, cost and INT8, in one run.

One command writes ``docs/benchmarks.md`` and the PNG figures it shows (``docs/figures/benchmarks_*.png``):

1. **Quality**, per category and model: each model is built from the grid of ``configs/benchmark.yaml``
   (the same settings ``anomalib benchmark`` uses), trained with anomalib's ``Engine.fit`` and scored with
   ``Engine.test`` through an anomalib ``Evaluator`` with image AUROC, pixel AUROC, PRO (anomalib's
   ``AUPRO``: area under the per-region-overlap curve up to a false-positive rate of 0.3, the MVTec AD
   protocol) and image / pixel F1. F1 needs a threshold: each model sets it on a validation split of
   *synthetic* anomalies made from 20 % of the normal training images (anomalib's
   ``ValSplitMode.SYNTHETIC``), so no test image or test label sets a threshold. ROC curves come from
   the same test pass (its output batches).
2. **Latency** of one image (batch 1, median of ``--latency-runs`` after ``--warmup-runs``) on the first
   category's models: torch eager (``model(image)``: pre-processing, network and post-processing, the graph
   that is exported), OpenVINO FP32, and OpenVINO INT8 (NNCF post-training quantisation through anomalib's
   exporter, calibrated on normal training images only). Each also as a ratio to PaDiM (``PadimLite0``) in
   the same backend and run.
3. **INT8 accuracy loss**: image / pixel AUROC of the FP32 and INT8 OpenVINO models over the first
   category's test split, and the difference.
4. **Deployment cost**: exported file sizes and the peak memory of a process that runs the OpenVINO model
   with the plain runtime (``anomalib_diffusion.deploy.openvino_runtime``; torch is blocked in it).

Rerun (writes the page and figures; the demo data is generated when --root is not given)::

    # the committed page: the demo brick and the devbench's held-out half at the issues' budget (about 1.5 h here;
    # add bump-relief melt vegetal for all six textures, about 2.7 h; the same --work-dir resumes an interrupted run)
    python benchmarks/report.py --config configs/benchmark_devbench.yaml --textures ../shared/devbench/textures \
        --categories brick hard-grain paper-torchon waveflex \
        --held-out hard-grain paper-torchon waveflex --work-dir runs/report-devbench
    # the demo grid of configs/benchmark.yaml (with DRAEM) on the demo brick (about 1 h)
    python benchmarks/report.py --categories brick --output docs/benchmarks/brick.md --figures docs/figures/brick
    python benchmarks/report.py --root /data/mvtec_ad --categories bottle carpet

Smoke test (tiny data and models; prints, writes nothing unless --output is given)::

    python benchmarks/report.py --quick
"""

import argparse
import io
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anomalib.models
import numpy as np
import openvino as ov
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.data.utils import ValSplitMode
from anomalib.deploy import CompressionType, ExportType
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from lightning import Callback, seed_everything
from lightning.pytorch.trainer.states import TrainerFn
from sklearn.metrics import roc_auc_score, roc_curve
from torchvision.transforms.v2 import Resize

from anomalib_diffusion.deploy import compile_config, device_supports

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    OPENVINO_CONFIG,
    build_categories,
    calibration_datamodule,
    check_categories,
    command_line,
    engine,
    file_size_mb,
    machine_info,
    machine_line,
    markdown_table,
    openvino_quality,
    output_path,
    publish,
    save_figure_atomically,
    texture_names,
    time_runs,
    write_atomically,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "benchmark.yaml"
REPORT = REPO / "docs" / "benchmarks.md"
FIGURES = REPO / "docs" / "figures"
REFERENCE = "PadimLite0"
BACKENDS = ("torch", "OpenVINO FP32", "OpenVINO BF16", "OpenVINO INT8")
# "OpenVINO BF16" is the FP32 export compiled with the bf16 hint: forced, so the numbers are the same on every CPU
# that can compute in bf16 (natively, or emulated on AVX-512); a CPU without it gets no BF16 column.
BF16_CONFIG = compile_config("bf16", PERFORMANCE_HINT="LATENCY")
HAS_BF16 = device_supports("bf16")
# Compile set-up and IR of each OpenVINO backend.
BACKEND_CONFIG = {"OpenVINO FP32": OPENVINO_CONFIG, "OpenVINO BF16": BF16_CONFIG, "OpenVINO INT8": OPENVINO_CONFIG}
BACKEND_EXPORT = {"OpenVINO FP32": "OpenVINO FP32", "OpenVINO BF16": "OpenVINO FP32", "OpenVINO INT8": "OpenVINO INT8"}
# Exports take 256x256 images (static height and width: anomalib's INT8_PTQ needs a static input shape);
# the pre-processors inside the graphs resize to each model's own size.
INPUT_SIZE = (256, 256)
# --quick: tiny models, a few steps; the same code path as the real run.
QUICK_SETTINGS = {
    "RADAR": {
        "image_size": 64,
        "patch_size": 32,
        "stride": 16,
        "window_size": 16,
        "block_out_channels": [8, 16],
        "attention_resolutions": [16],
        "max_steps": 3,
        "n_estimators": 25,
    },
    "GLAD": {
        "image_size": 64,
        "patch_size": 32,
        "block_out_channels": [8, 16],
        "attention_resolutions": [16],
        "num_inference_steps": 5,
        "start_timestep": 600,
        "min_timestep": 300,
        "max_steps": 3,
        "calibration_fraction": 0.25,
    },
    "DADDA": {
        "image_size": 64,
        "patch_size": 32,
        "block_out_channels": [8, 16],
        "attention_resolutions": [16],
        "generation_steps": 3,
        "detector_width": 8,
        "procedural_seeds": 8,
        "generator_steps": 2,
        "detector_steps": 2,
        "type_samples_per_type": 4,
    },
    "PadimLite0": {},
    "PatchcoreLite0": {},
    "DraemOffline": {"max_epochs": 1},
}


@dataclass
class Run:
    """One model on one category."""

    metrics: dict[str, float]
    fit_seconds: float
    scores: np.ndarray
    labels: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # image name -> anomaly map, for the grid


@dataclass
class Deployment:
    """The first category's exports of one model and what they cost."""

    exports: dict[str, Path]
    int8_note: str | None
    latency_ms: dict[str, float]
    quality: dict[str, tuple[float, float]]  # backend -> (image AUROC, pixel AUROC)
    peak_rss_mb: dict[str, float]
    score_gap: dict[str, float] = field(default_factory=dict)  # backend -> largest |score - torch score|
    label_flips: dict[str, int] = field(default_factory=dict)  # backend -> images labelled otherwise than by torch
    test_images: int = 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="anomalib benchmark config with the model grid")
    parser.add_argument("--root", type=Path, default=None, help="MVTec AD-layout root (default: generate demo data)")
    parser.add_argument(
        "--textures",
        type=Path,
        default=None,
        help="build the data from this folder of texture photographs (one category per image, the demo's "
        "planted defects; e.g. ../shared/devbench/textures); --categories then defaults to all of them",
    )
    parser.add_argument(
        "--held-out",
        nargs="+",
        default=[],
        help="categories no setting was tuned on: their mean is reported apart from the others'",
    )
    parser.add_argument(
        "--quality-only",
        action="store_true",
        help="train and test every model on every category, skip exports, latency and INT8 (prints only)",
    )
    parser.add_argument("--categories", nargs="+", default=None, help="default: the config's category grid")
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the config's models")
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--warmup-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="default: the config's benchmark.seed")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep data, runs and exports here; rerun with the same folder to resume an interrupted run (every model's "
        "results are reused where data, seed and settings match; the first category's models, which are exported, are "
        "reloaded from their checkpoints)",
    )
    parser.add_argument("--output", default=None, help=f"page path ('-' prints only; default {REPORT})")
    parser.add_argument("--figures", type=Path, default=None, help=f"folder for the PNGs (default {FIGURES})")
    parser.add_argument("--quick", action="store_true", help="tiny data and models; prints only")
    parser.add_argument("--int8-export-worker", nargs=6, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_grid(config: dict, names: Sequence[str] | None, quick: bool) -> dict[str, dict]:
    grid = {entry["class_path"]: dict(entry.get("init_args") or {}) for entry in config["benchmark"]["model"]["grid"]}
    if REFERENCE not in grid:
        msg = f"{REFERENCE} must be in the model grid: latencies are given as ratios to it."
        raise ValueError(msg)
    if names:
        unknown = sorted(set(names) - set(grid))
        if unknown:
            msg = f"Models {unknown} are not in the config's grid {sorted(grid)}."
            raise ValueError(msg)
        grid = {name: grid[name] for name in grid if name in names or name == REFERENCE}
    if quick:
        grid = {name: QUICK_SETTINGS[name] for name in grid}
    return grid


def evaluator() -> Evaluator:
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )


def build(name: str, settings: dict) -> AnomalibModule:
    model = getattr(anomalib.models, name)(**settings)
    model.evaluator = evaluator()
    return model


def datamodule(root: Path, category: str, seed: int, batch: int) -> MVTecAD:
    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=batch,
        eval_batch_size=batch,
        num_workers=0,
        val_split_mode=ValSplitMode.SYNTHETIC,
        val_split_ratio=0.2,
        seed=seed,
    )


def grid_images(data: MVTecAD) -> list[str]:
    """One normal test image and the first image of each defect type."""
    paths = data.test_data.samples.image_path.tolist()
    chosen: dict[str, str] = {}
    for path in sorted(paths):
        chosen.setdefault(Path(path).parent.name, path)
    return [chosen["good"], *[chosen[kind] for kind in sorted(chosen) if kind != "good"]] if "good" in chosen else []


class TestOutputs(Callback):
    """Keeps ``Engine.test``'s output batches: ROC curves and map grids without a second inference pass.

    The post-processor and the evaluator work on the same batch objects in place, so once the test has
    run, these hold the scores and maps the metrics were computed from (raw: see ``train_and_score``).
    """

    def __init__(self) -> None:
        self.batches: list = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
        self.batches.append(outputs)


@contextmanager
def raw_outputs(model: AnomalibModule) -> Iterator[None]:
    """Within: the model's post-processor passes raw scores and maps on, labelled at the raw thresholds.

    anomalib thresholds at ``1 - sensitivity`` (0.5 once normalised); on raw outputs that is the raw threshold itself.
    A graph exported within keeps this (the normalisation it leaves out is a few element-wise operations).
    """
    post_processor = model.post_processor
    saved = post_processor.image_sensitivity, post_processor.pixel_sensitivity
    post_processor.enable_normalization = False
    post_processor.image_sensitivity = 1.0 - float(post_processor.image_threshold)
    post_processor.pixel_sensitivity = 1.0 - float(post_processor.pixel_threshold)
    try:
        yield
    finally:  # back to what `anomalib export` puts in the graph
        post_processor.enable_normalization = True
        post_processor.image_sensitivity, post_processor.pixel_sensitivity = saved


def normalised_scores(model: AnomalibModule, scores: Sequence[float]) -> np.ndarray:
    """Raw image scores as anomalib's post-processor hands them to users: normalised to [0, 1], threshold at 0.5."""
    post = model.post_processor
    values = post._normalize(
        torch.as_tensor(np.asarray(scores), dtype=torch.float32), post.image_min, post.image_max, post.image_threshold
    )
    return values.double().numpy()


def raw_test_outputs(batches: Sequence) -> tuple[list[float], list[int], np.ndarray, np.ndarray]:
    """Image scores, image labels, map values and mask values of test batches (run within ``raw_outputs``)."""
    scores, labels, pixels, masks = [], [], [], []
    for batch in batches:
        scores += batch.pred_score.reshape(-1).tolist()
        labels += batch.gt_label.reshape(-1).int().tolist()
        pixels.append(batch.anomaly_map.reshape(-1).float().numpy())
        masks.append(batch.gt_mask.reshape(-1).bool().numpy())
    return scores, labels, np.concatenate(pixels), np.concatenate(masks)


def train_and_score(
    name: str, settings: dict, data: MVTecAD, root: Path, seed: int
) -> tuple[AnomalibModule, Path, Run]:
    """Train and test one model in ``root``: the model, its checkpoint (``root/model.ckpt``) and its results."""
    seed_everything(seed, workers=True)
    model = build(name, settings)
    collector = TestOutputs()
    runner = engine(root, callbacks=[collector])
    start = time.perf_counter()
    runner.fit(model=model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    # Scored on the raw outputs: anomalib's post-processor maps scores and maps to [0, 1] with the min and max seen
    # on the validation split and clamps what lies beyond, which ties every test image past that range and so lowers
    # AUROC and PRO by an amount that depends on the validation split. Thresholds (and so F1) are the same either way.
    post_processor = model.post_processor
    with raw_outputs(model):
        results = runner.test(model=model, datamodule=data, verbose=False)[0]
    metrics = {key: float(value) for key, value in results.items()}
    batches = collector.batches
    wanted = set(grid_images(data))
    scores, labels, pixels, masks = raw_test_outputs(batches)
    maps = {}
    for batch in batches:
        # The figure shows maps as anomalib normalises them.
        normalised = post_processor._normalize(
            batch.anomaly_map, post_processor.pixel_min, post_processor.pixel_max, post_processor.pixel_threshold
        )
        for path, anomaly_map in zip(batch.image_path, normalised, strict=True):
            if path in wanted:
                maps[path] = anomaly_map.reshape(anomaly_map.shape[-2:]).float().numpy()
    # torchmetrics' AUROC passes each batch through a sigmoid when its values leave [0, 1], which saturates raw
    # scores (PaDiM's run into the hundreds) and differs from batch to batch: AUROC with scikit-learn instead.
    # (anomalib's AUPRO takes raw maps as they are.)
    metrics["image_AUROC"] = float(roc_auc_score(labels, scores))
    metrics["pixel_AUROC"] = float(roc_auc_score(masks, pixels))
    print(f"{name}: fit {fit_seconds:.0f} s, {metrics}", flush=True)
    callback = runner.trainer.checkpoint_callback
    checkpoint = torch.load(
        callback.best_model_path or callback.last_model_path, map_location="cpu", weights_only=False
    )
    # The report's evaluator (AUPRO keeps a buffer) is not part of the model anomalib rebuilds from a checkpoint.
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("evaluator.")}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomically(root / "model.ckpt", buffer.getvalue())
    return model, root / "model.ckpt", Run(metrics, fit_seconds, np.asarray(scores), np.asarray(labels), maps)


def load_run(path: Path, key: dict) -> tuple[Run | None, Path | None]:
    """A run saved by an earlier, interrupted report under the same key (``--work-dir``) and its model's checkpoint;
    None for either that is not there."""
    if not path.is_file():
        return None, None
    saved = pickle.loads(path.read_bytes())  # noqa: S301 - written by this script into the user's own work dir
    if saved.get("key") != key:
        return None, None
    checkpoint = saved.get("checkpoint")
    return saved["run"], Path(checkpoint) if checkpoint and Path(checkpoint).is_file() else None


def save_run(path: Path, run: Run, key: dict, checkpoint: Path) -> None:
    write_atomically(path, pickle.dumps({"run": run, "key": key, "checkpoint": str(checkpoint.resolve())}))


def export(
    model: AnomalibModule, trained_checkpoint: Path, name: str, root: Path, category: str, seed: int, out: Path
) -> tuple[dict[str, Path], str | None]:
    """Torch, OpenVINO FP32 and (in a child process, which a crash costs only a table cell) OpenVINO INT8."""
    model.eval()
    runner = engine(out)
    exports = {
        "torch": runner.export(model=model, export_type=ExportType.TORCH, export_root=out / "torch"),
    }
    with raw_outputs(model):  # AUROC on raw outputs, as in the quality table; the page says what this leaves out
        exports["OpenVINO FP32"] = runner.export(
            model=model, export_type=ExportType.OPENVINO, export_root=out / "fp32", input_size=INPUT_SIZE
        )
    if CompressionType.INT8_PTQ in getattr(model, "REFUSED_COMPRESSION", ()):
        return exports, f"{name} refuses INT8_PTQ (activation quantisation breaks its map; see its docs)"
    command = [sys.executable, __file__, "--int8-export-worker", str(trained_checkpoint), name, str(root), category]
    command += [str(seed), str(out / "int8")]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    path = out / "int8" / "weights" / "openvino" / "model.xml"
    if result.returncode != 0 or not path.is_file():
        reason = "segmentation fault" if result.returncode == -signal.SIGSEGV else f"exit code {result.returncode}"
        print(result.stderr[-2000:], file=sys.stderr)
        stage = "OpenVINO compile/run of the INT8 IR" if "INT8 IR WRITTEN" in result.stdout else "INT8 export"
        return exports, f"{stage} crashed ({reason})"
    exports["OpenVINO INT8"] = path
    return exports, None


def calibration_data(root: Path, category: str, seed: int) -> MVTecAD:
    """Normal training images (``common.calibration_datamodule``), resized to the exports' input size."""
    data = calibration_datamodule(root, category, seed)
    data.train_augmentations = data.val_augmentations = data.test_augmentations = Resize(INPUT_SIZE)
    return data


def int8_export_worker(checkpoint: str, name: str, root: str, category: str, seed: str, out: str) -> None:
    model = getattr(anomalib.models, name).load_from_checkpoint(checkpoint).eval()
    with raw_outputs(model):
        engine(Path(out)).export(
            model=model,
            export_type=ExportType.OPENVINO,
            export_root=Path(out),
            compression_type=CompressionType.INT8_PTQ,
            datamodule=calibration_data(Path(root), category, int(seed)),
            input_size=INPUT_SIZE,
        )
    print("INT8 IR WRITTEN", flush=True)  # tells the parent which stage crashed
    # OpenVINO's compile_model has crashed (SIGSEGV) on some INT8 IRs (PaDiM's): find out here, not in the parent.
    compiled = ov.Core().compile_model(Path(out) / "weights" / "openvino" / "model.xml", "CPU", OPENVINO_CONFIG)
    compiled(np.zeros((1, 3, 256, 256), dtype=np.float32))


# Run in a fresh interpreter (this script imports torch): only OpenVINO, NumPy, Pillow and the plain runtime load.
MEMORY_PROBE = """
import json, sys
sys.modules["torch"] = None  # the runtime must not need it
import numpy as np
from anomalib_diffusion.deploy.openvino_runtime import OpenVINODetector
detector = OpenVINODetector(sys.argv[1], config=json.loads(sys.argv[2]))
image = np.random.default_rng(0).random((256, 256, 3), dtype=np.float32)
for _ in range(20):
    detector.predict(image)
status = open("/proc/self/status").read()  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's)
print(json.dumps({"peak_mb": int(status.split("VmHWM:")[1].split()[0]) / 1024}))
"""


def peak_rss_mb(model_path: Path) -> float:
    """Peak resident memory of a torch-free process that compiles the model and scores 20 images."""
    command = [sys.executable, "-c", MEMORY_PROBE, str(model_path), json.dumps(OPENVINO_CONFIG)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"])


def deploy(
    models: dict[str, tuple[AnomalibModule, Path]],
    root: Path,
    category: str,
    seed: int,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Deployment]:
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    test_data = MVTecAD(
        root=root,
        category=category,
        eval_batch_size=1,
        num_workers=0,
        seed=seed,
        test_augmentations=Resize(INPUT_SIZE),  # the exports take INPUT_SIZE; masks are resized with the images
    )
    test_data.setup()
    deployments = {}
    for name, (model, checkpoint) in models.items():
        exports, note = export(model, checkpoint, name, root, category, seed, work / "exports" / name)
        reference = torch_scores(model, test_data)
        # The gap as users see it: on normalised scores (threshold 0.5), which the measured IRs leave out.
        reference_normalised = normalised_scores(model, reference)
        threshold = float(model.post_processor.image_threshold)
        deployment = Deployment(exports, note, {}, {}, {}, test_images=len(reference))
        for backend in openvino_backends(exports):
            quality = openvino_quality(
                exports[BACKEND_EXPORT[backend]], test_data, f"{name} {backend}", BACKEND_CONFIG[backend]
            )
            deployment.quality[backend] = (quality.image_auroc, quality.pixel_auroc)
            gap = normalised_scores(model, quality.scores) - reference_normalised
            deployment.score_gap[backend] = float(np.abs(gap).max())
            deployment.label_flips[backend] = int(
                ((np.asarray(quality.scores) >= threshold) != (reference >= threshold)).sum()
            )
        deployment.peak_rss_mb = {
            backend: peak_rss_mb(exports[backend])
            for backend in ("OpenVINO FP32", "OpenVINO INT8")
            if backend in exports
        }
        deployments[name] = deployment
    core = ov.Core()
    for backend in BACKENDS:  # all models back to back within a backend, so the ratios compare like with like
        for name, deployment in deployments.items():
            if backend == "torch":
                model = models[name][0].eval()

                def call(model: AnomalibModule = model) -> object:
                    with torch.inference_mode():
                        return model(image)

            elif backend in openvino_backends(deployment.exports):
                compiled = core.compile_model(
                    deployment.exports[BACKEND_EXPORT[backend]], "CPU", BACKEND_CONFIG[backend]
                )
                request = compiled.create_infer_request()

                def call(request: ov.InferRequest = request) -> object:
                    return request.infer({0: image.numpy()})

            else:
                continue
            times = time_runs(call, args.warmup_runs, args.latency_runs, f"{name} {backend}")
            deployment.latency_ms[backend] = statistics.median(times)
    return deployments


def openvino_backends(exports: dict[str, Path]) -> list[str]:
    """The OpenVINO backends this run measures for a model with these exports."""
    return [
        backend
        for backend in BACKEND_CONFIG
        if BACKEND_EXPORT[backend] in exports and (backend != "OpenVINO BF16" or HAS_BF16)
    ]


def torch_scores(model: AnomalibModule, test_data: MVTecAD) -> np.ndarray:
    """The torch model's raw image scores over the test split, in the split's order (batch of one)."""
    model.eval()
    with torch.inference_mode(), raw_outputs(model):
        return np.array(
            [float(model(item.image[None]).pred_score.reshape(-1)[0]) for item in test_data.test_data], dtype=np.float64
        )


# -- the page ------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.{digits}f}"


METRICS = (
    ("image AUROC", "image_AUROC"),
    ("pixel AUROC", "pixel_AUROC"),
    ("PRO", "pixel_AUPRO"),
    ("image F1", "image_F1Score"),
    ("pixel F1", "pixel_F1Score"),
)


def mean_table(results: dict[str, dict[str, Run]], categories: Sequence[str]) -> str:
    names = list(next(iter(results.values())))
    rows = [
        [
            name,
            *[
                fmt(statistics.mean(results[c][name].metrics.get(key, np.nan) for c in categories))
                for _, key in METRICS
            ],
            f"{sum(results[c][name].fit_seconds for c in categories):.0f}",
        ]
        for name in names
    ]
    return markdown_table(["model", *[label for label, _ in METRICS], "train s"], rows)


def quality_tables(results: dict[str, dict[str, Run]], held_out: Sequence[str] = ()) -> str:
    header = ["category", "model", *[label for label, _ in METRICS], "train s"]
    rows = [
        [
            category + (" (held out)" if category in held_out else ""),
            name,
            *[fmt(run.metrics.get(key)) for _, key in METRICS],
            f"{run.fit_seconds:.0f}",
        ]
        for category, runs in results.items()
        for name, run in runs.items()
    ]
    text = markdown_table(header, rows)
    tuned = [category for category in results if category not in held_out]
    groups = [("the held out", list(held_out)), ("the tuned on", tuned)] if held_out else [("all", list(results))]
    for label, categories in groups:
        if len(categories) > 1 or (held_out and categories):
            text += f"\n\nMean over {label} categories ({', '.join(categories)}; train s: the sum):\n\n"
            text += mean_table(results, categories)
    return text


def latency_table(deployments: dict[str, Deployment]) -> str:
    reference = deployments[REFERENCE].latency_ms
    header = ["model"] + [part for backend in BACKENDS for part in (f"{backend} ms", "× PaDiM")]
    rows = []
    for name, deployment in deployments.items():
        row = [name]
        for backend in BACKENDS:
            value = deployment.latency_ms.get(backend)
            # Where PaDiM has no INT8 model (its INT8 IR crashes OpenVINO's compiler), compare with its FP32 model.
            base = backend if backend in reference else "OpenVINO FP32"
            ratio = fmt(value / reference[base], 2) if value is not None else "–"
            row += [fmt(value, 1), ratio + ("†" if value is not None and base != backend else "")]
        rows.append(row)
    return markdown_table(header, rows)


def int8_table(deployments: dict[str, Deployment]) -> str:
    header = [
        "model",
        "FP32 image AUROC",
        "INT8 image AUROC",
        "Δ image",
        "FP32 pixel AUROC",
        "INT8 pixel AUROC",
        "Δ pixel",
        "note",
    ]
    rows = []
    for name, deployment in deployments.items():
        fp32 = deployment.quality.get("OpenVINO FP32", (None, None))
        int8 = deployment.quality.get("OpenVINO INT8", (None, None))
        delta = [None if a is None or b is None else b - a for a, b in zip(fp32, int8, strict=True)]
        rows.append(
            [
                name,
                fmt(fp32[0]),
                fmt(int8[0]),
                fmt(delta[0]),
                fmt(fp32[1]),
                fmt(int8[1]),
                fmt(delta[1]),
                deployment.int8_note or "",
            ]
        )
    return markdown_table(header, rows)


def precision_table(deployments: dict[str, Deployment]) -> str:
    """f32 against bf16 for every model: speed, accuracy, and how far the scores move from torch's."""
    header = [
        "model",
        "FP32 ms",
        "BF16 ms",
        "BF16 speed-up",
        "image AUROC FP32",
        "image AUROC BF16",
        "pixel AUROC FP32",
        "pixel AUROC BF16",
        "max |Δ score| FP32",
        "max |Δ score| BF16",
        "labels changed BF16",
    ]
    rows = []
    for name, deployment in deployments.items():
        fp32, bf16 = (deployment.latency_ms.get(backend) for backend in ("OpenVINO FP32", "OpenVINO BF16"))
        quality = {
            backend: deployment.quality.get(backend, (None, None)) for backend in ("OpenVINO FP32", "OpenVINO BF16")
        }
        flips = deployment.label_flips.get("OpenVINO BF16")
        rows.append(
            [
                name,
                fmt(fp32, 1),
                fmt(bf16, 1),
                fmt(fp32 / bf16, 2) if fp32 and bf16 else "–",
                fmt(quality["OpenVINO FP32"][0]),
                fmt(quality["OpenVINO BF16"][0]),
                fmt(quality["OpenVINO FP32"][1]),
                fmt(quality["OpenVINO BF16"][1]),
                fmt(deployment.score_gap.get("OpenVINO FP32"), 4),
                fmt(deployment.score_gap.get("OpenVINO BF16"), 4),
                "–" if flips is None else f"{flips} of {deployment.test_images}",
            ]
        )
    return markdown_table(header, rows)


def cost_table(deployments: dict[str, Deployment]) -> str:
    header = [
        "model",
        "torch .pt MB",
        "OpenVINO FP32 MB",
        "OpenVINO INT8 MB",
        "runtime peak RSS FP32 MB",
        "runtime peak RSS INT8 MB",
    ]
    rows = []
    for name, deployment in deployments.items():
        sizes = [  # BF16 is the FP32 file compiled otherwise: no file of its own
            fmt(file_size_mb(deployment.exports[b]), 1) if b in deployment.exports else "–"
            for b in ("torch", "OpenVINO FP32", "OpenVINO INT8")
        ]
        memory = [fmt(deployment.peak_rss_mb.get(b), 0) for b in ("OpenVINO FP32", "OpenVINO INT8")]
        rows.append([name, *sizes, *memory])
    return markdown_table(header, rows)


def draw_roc(results: dict[str, dict[str, Run]], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for axis, (category, runs) in zip(axes[0], results.items(), strict=True):
        for name, run in runs.items():
            if len(set(run.labels.tolist())) == 2:
                fpr, tpr, _ = roc_curve(run.labels, run.scores)
                axis.plot(fpr, tpr, label=f"{name} ({run.metrics.get('image_AUROC', np.nan):.2f})")
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle="--")
        axis.set(title=f"{category}: image ROC", xlabel="false-positive rate", ylabel="true-positive rate")
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    save_figure_atomically(figure, path)


def draw_latency(deployments: dict[str, Deployment], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(BACKENDS)
    names = list(deployments)
    for index, backend in enumerate(BACKENDS):
        values = [deployments[name].latency_ms.get(backend, np.nan) for name in names]
        axis.bar(np.arange(len(names)) + index * width, values, width, label=backend)
    axis.set_xticks(np.arange(len(names)) + width, names, rotation=15)
    axis.set(yscale="log", ylabel="ms per 256x256 image (median, log scale)", title="latency, batch 1, CPU")
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure_atomically(figure, path)


def draw_maps(runs: dict[str, Run], category: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image

    images = sorted(next(iter(runs.values())).maps)
    images = sorted(images, key=lambda p: (Path(p).parent.name != "good", p))
    if not images:
        return
    figure, axes = plt.subplots(
        len(runs) + 1, len(images), figsize=(2.2 * len(images), 2.2 * (len(runs) + 1)), squeeze=False
    )
    for column, image_path in enumerate(images):
        with Image.open(image_path) as image:
            axes[0, column].imshow(image.convert("RGB"))
        axes[0, column].set_title(Path(image_path).parent.name, fontsize=9)
        for row, (name, run) in enumerate(runs.items(), start=1):
            axes[row, column].imshow(run.maps[image_path], cmap="jet", vmin=0, vmax=1)
            axes[row, 0].set_ylabel(name, fontsize=8)
    axes[0, 0].set_ylabel("input", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"{category}: normalised anomaly maps (0 to 1; 0.5 is each model's threshold)", fontsize=10)
    figure.tight_layout()
    save_figure_atomically(figure, path)


def data_description(args: argparse.Namespace) -> str:
    if args.root:
        return f"`{args.root}`"
    if args.textures:
        return (
            f"texture photographs of `{args.textures}`, one category per image, with the demo's planted defects "
            "(`anomalib-diffusion-demo-data --textures`, seed 0, MVTec AD layout, 256x256; grey photographs tinted "
            "with a fixed colour ramp chosen from the file name)"
        )
    return "the offline demo set (`make_demo_dataset`, seed 0, MVTec AD layout, 256x256)"


def setup_lines(args: argparse.Namespace, grid: dict) -> list[str]:
    """The pages' closing "Set-up" section: data, model settings, machine."""
    return [
        "## Set-up",
        "",
        "- Data: " + data_description(args),
        "- Models: " + "; ".join(f"{name} `{settings or 'defaults'}`" for name, settings in grid.items()),
        machine_line(),
        "",
    ]


def render_quality(
    args: argparse.Namespace, minutes: float, grid: dict, results: dict, argv: Sequence[str] | None
) -> str:
    """The page of a ``--quality-only`` run: the quality tables and the set-up, no deployment."""
    return "\n".join(
        [
            "# Quality on surfaces the defaults were not tuned on" if args.held_out else "# Quality",
            "",
            f"Generated by `{command_line('report.py', argv)}` on {datetime.now().strftime('%Y-%m-%d')} in {minutes:.0f} min; do not "
            "edit by hand. Models trained with anomalib's `Engine.fit`, scored with `Engine.test` (image / pixel AUROC, "
            "PRO as anomalib's `AUPRO`, on raw scores and maps: anomalib's normalisation clamps to the validation "
            "split's range; F1 at each model's threshold, set on synthetic anomalies made from normal "
            "training images, never on test labels)."
            + (
                f" Held out: {', '.join(args.held_out)}: no setting of any model was chosen on them."
                if args.held_out
                else ""
            ),
            "",
            quality_tables(results, args.held_out),
            "",
            *setup_lines(args, grid),
        ]
    )


def render(
    args: argparse.Namespace,
    command: str,
    minutes: float,
    grid: dict,
    results: dict,
    deployments: dict,
    figures: dict,
    page: Path | None = None,
) -> str:
    """The page; ``page`` is the folder it is written to, for its links (the repository root when only printed)."""
    first = next(iter(results))
    show = lambda key: f"![{key}]({figures[key]})" if key in figures else ""  # noqa: E731
    deployment = os.path.relpath(REPO / "docs" / "deployment.md", page or REPO)
    return "\n".join(
        [
            f"# Benchmarks: {', '.join(grid)}",
            "",
            f"Generated by `{command}` on {datetime.now().strftime('%Y-%m-%d')} in {minutes:.0f} min; do not edit by "
            f"hand. The models and their settings are the grid of `{config_name(args.config)}` (run it through "
            "`anomalib benchmark` for anomalib's own results table).",
            "",
            "## Quality",
            "",
            quality_tables(results, args.held_out),
            "",
            "PRO is anomalib's `AUPRO` (area under the per-region-overlap curve up to a false-positive rate of 0.3). "
            "AUROC (scikit-learn) and PRO are computed on each model's raw scores and maps: anomalib's post-processor "
            "would map them to [0, 1] with the range seen on the validation split and clamp what lies outside, tying "
            "test images beyond it, and torchmetrics' AUROC passes out-of-range values through a sigmoid that saturates. "
            "F1 uses each model's own threshold, set on synthetic anomalies made from 20 % of the normal training "
            "images (anomalib's `ValSplitMode.SYNTHETIC`): no test image or label sets it. AUROC and PRO need no "
            "threshold. Train time is `Engine.fit` wall-clock on this machine.",
            "",
            show("roc"),
            "",
            f"## Latency ({first}'s models, one 256x256 image, batch 1)",
            "",
            latency_table(deployments),
            "",
            "† PaDiM has no INT8 model in this run (see the INT8 table): the ratio is to PaDiM's OpenVINO FP32 latency.\n"
            if "OpenVINO INT8" not in deployments[REFERENCE].latency_ms
            else "",
            f"Median of {args.latency_runs} runs after {args.warmup_runs} warm-up runs; all models run back to back "
            "within each backend. torch: `model(image)` under `torch.inference_mode` (pre-processing, network, "
            "post-processing). OpenVINO FP32 / BF16: the FP32 export compiled in f32 / forced bf16 (next section). "
            "OpenVINO INT8: NNCF post-training quantisation through `anomalib export --compression_type INT8_PTQ`, "
            "calibrated on normal training images, compiled with the f32 hint for the layers left in float. The "
            "OpenVINO IRs measured here are exported with anomalib's normalisation switched off, so that AUROC can be "
            "computed on raw outputs; what that leaves out is a few element-wise operations on the score and map.",
            "",
            show("latency"),
            "",
            f"## FP32 or BF16 ({first})",
            "",
            precision_table(deployments)
            if HAS_BF16
            else "This CPU cannot compute in bf16 (OpenVINO's `OPTIMIZATION_CAPABILITIES` lacks `BF16`): no BF16 column.\n\n"
            + precision_table(deployments),
            "",
            "OpenVINO's CPU plugin computes an f32 model in bf16 on CPUs with native bf16 (Intel Xeon from Sapphire "
            "Rapids on, AMD Zen 4) unless told otherwise. Here FP32 is compiled with `INFERENCE_PRECISION_HINT=f32` and "
            "BF16 with `INFERENCE_PRECISION_HINT=bf16` (forced, the same on every CPU that has bf16), both from the same "
            "FP32 export. AUROC on the OpenVINO model's raw outputs, as in the quality table. max |Δ score|: the largest "
            "difference between the OpenVINO model's image score and the torch model's on the same test image, both "
            "normalised as anomalib's post-processor hands them to users (0 to 1, threshold 0.5); labels changed: test "
            "images whose decision differs from torch's. This package's inference paths compile in f32 unless asked "
            f"([deployment.md]({deployment}#precision-f32-by-default-bf16-on-request)).",
            "",
            f"## Accuracy lost by INT8 ({first})",
            "",
            int8_table(deployments),
            "",
            "Image / pixel AUROC (scikit-learn) of the OpenVINO models' own raw outputs over the test split.",
            "",
            "## Deployment cost",
            "",
            cost_table(deployments),
            "",
            "Peak RSS: a separate process with torch blocked that loads only OpenVINO, compiles the model and "
            "scores 20 images with `anomalib_diffusion.deploy.openvino_runtime` (the plain-runtime deployment of "
            f"[deployment.md]({deployment})). It includes the OpenVINO runtime itself.",
            "",
            f"## Anomaly maps ({first})",
            "",
            show("maps"),
            "",
            *setup_lines(args, grid),
        ]
    )


def config_name(path: Path) -> str:
    """The config's path as the page shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.int8_export_worker:
        int8_export_worker(*args.int8_export_worker)
        return
    if args.latency_runs < 1 or args.warmup_runs < 0:
        raise SystemExit("--latency-runs must be at least 1 and --warmup-runs at least 0.")
    if args.root and args.textures:
        raise SystemExit("--root and --textures exclude each other: pass an existing data set or a texture folder.")
    config = yaml.safe_load(args.config.read_text())
    grid = model_grid(config, args.models, args.quick)
    data_config = config["benchmark"]["data"]["init_args"]
    if args.textures:
        # Demo categories may be named next to the textures: both are built into one root.
        categories = args.categories or texture_names(args.textures)
        check_categories(categories, args.textures)
    else:
        categories = args.categories or data_config["category"].get("grid", [data_config["category"]])
    categories = categories[:1] if args.quick else categories
    if unknown := sorted(set(args.held_out) - set(categories)):
        raise SystemExit(f"--held-out {' '.join(unknown)}: not among the categories measured ({' '.join(categories)}).")
    seed = config["benchmark"].get("seed", 0) if args.seed is None else args.seed
    batch = 4 if args.quick else int(data_config.get("train_batch_size", 8))
    if args.quick:
        args.latency_runs, args.warmup_runs = min(args.latency_runs, 3), min(args.warmup_runs, 1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        root = args.root
        if root is None:
            sizes = {"n_train": 10, "n_test_good": 4, "n_test_per_defect": 2, "image_size": 64} if args.quick else None
            root = build_categories(work / "data", categories, args.textures, sizes=sizes)
        elif not all((root / category / "train" / "good").is_dir() for category in categories):
            raise SystemExit(f"{root} is not an MVTec AD-layout folder with {categories} (each needs train/good).")
        results: dict[str, dict[str, Run]] = {}
        trained: dict[str, tuple[AnomalibModule, Path]] = {}  # the first category's models, for the exports
        machine = {key: value for key, value in machine_info().items() if key != "Python"}  # not the kernel's build
        for category in categories:
            data = datamodule(root, category, seed, batch)
            # Split once, from the seed, before any model: anomalib's synthetic validation split draws from the global
            # random streams (pandas' sample, its Perlin generator). Left to the first model's fit, it would shift that
            # model's training draws (and no other's) and make the split depend on which model comes first.
            seed_everything(seed, workers=True)
            data.setup(TrainerFn.FITTING)
            results[category] = {}
            for name, settings in grid.items():
                run_dir = work / "runs" / category / name
                # A saved run counts only for the same data, settings, seed, batch and machine (the page names one).
                key = {"root": str(root.resolve()), "settings": settings, "seed": seed, "batch": batch}
                key |= {"protocol": "split before the models", "machine": machine}
                exported = category == categories[0] and not args.quality_only
                run, checkpoint = load_run(run_dir / "run.pkl", key)
                # The exported category's model is reloaded from its checkpoint; without one it is trained again.
                if run is not None and (not exported or checkpoint is not None):
                    print(f"{category} {name}: reused {run_dir / 'run.pkl'} (fit {run.fit_seconds:.0f} s)", flush=True)
                    results[category][name] = run
                    if exported:
                        trained[name] = (getattr(anomalib.models, name).load_from_checkpoint(checkpoint), checkpoint)
                    continue
                model, checkpoint, run = train_and_score(name, settings, data, run_dir, seed)
                results[category][name] = run
                save_run(run_dir / "run.pkl", run, key, checkpoint)
                if exported:
                    trained[name] = (model, checkpoint)
        if args.quality_only:
            text = render_quality(args, (time.perf_counter() - start) / 60, grid, results, argv)
            print(text)
            if args.output and args.output != "-":
                write_atomically(Path(args.output), text)
                print(f"Report written to {args.output}")
            return
        deployments = deploy(trained, root, categories[0], seed, args, work)
        minutes = (time.perf_counter() - start) / 60
        output = output_path(args, REPORT)
        figures: dict[str, str] = {}
        page = None
        if output is not None:
            folder = args.figures or FIGURES
            paths = {key: folder / f"benchmarks_{key}.png" for key in ("roc", "latency", "maps")}
            draw_roc(results, paths["roc"])
            draw_latency(deployments, paths["latency"])
            draw_maps(results[categories[0]], categories[0], paths["maps"])
            page = output.resolve().parent
            figures = {key: os.path.relpath(path.resolve(), page) for key, path in paths.items()}
        text = render(
            args, command_line("report.py", argv), minutes, grid, results, deployments, figures, page
        )  # reads the exports' sizes
    publish(text, args, REPORT)


if __name__ == "__main__":
    main()
