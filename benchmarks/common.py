"""What every benchmark script shares: the OpenVINO compile set-up, timing, data for INT8 calibration, the machine
description, and writing reports and figures so that a reader never sees a half-written one.

The scripts import it as a sibling module (``sys.path`` holds the script's folder when it is run as
``python benchmarks/<script>.py``).
"""

import argparse
import importlib.metadata
import os
import platform
import re
import sys
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
from anomalib.engine import Engine
from lightning import Callback
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from anomalib_diffusion.components.border import border_bands
from anomalib_diffusion.data import DEMO_CATEGORIES, make_demo_dataset, texture_categories
from anomalib_diffusion.deploy import compile_config

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# "FP32" must mean FP32 on every CPU: without the hint OpenVINO runs f32 models in bf16 on CPUs
# that have AMX / AVX512-BF16. The INT8 model gets the same hint so that quantisation is the only
# difference between the FP32 and INT8 rows.
OPENVINO_CONFIG = compile_config("f32", PERFORMANCE_HINT="LATENCY")


@dataclass
class OpenVINOQuality:
    """AUROC of an exported model over the test split, and whether its outputs carry information."""

    image_auroc: float
    pixel_auroc: float
    constant_scores: bool
    constant_maps: bool
    scores: list[float] = field(default_factory=list)  # per test image, in the split's order
    labels: list[int] = field(default_factory=list)


def texture_names(textures: Path | None) -> list[str]:
    """The categories that ``textures`` (a folder of texture photographs) offers; exits with its problem."""
    try:
        return list(texture_categories(textures)) if textures else []
    except ValueError as error:
        raise SystemExit(str(error)) from error


def check_categories(categories: Sequence[str], textures: Path | None) -> None:
    """Exit naming every category that is neither a demo category nor a photograph in ``textures``."""
    available = texture_names(textures)
    if unknown := [name for name in categories if name not in available and name not in DEMO_CATEGORIES]:
        where = f"a texture in {textures}" if textures else "a texture (pass --textures with a folder of photographs)"
        raise SystemExit(f"{' '.join(unknown)}: neither a demo category ({', '.join(DEMO_CATEGORIES)}) nor {where}.")


def build_categories(
    root: Path, categories: Sequence[str], textures: Path | None, seed: int = 0, sizes: dict[str, int] | None = None
) -> Path:
    """The demo's planted defects on demo categories and on texture photographs, in one MVTec AD-layout root.

    ``sizes``: ``make_demo_dataset``'s image counts and size (``--quick`` runs shrink them).
    """
    available = texture_names(textures)
    try:
        for names, folder in (
            ([c for c in categories if c not in available], None),
            ([c for c in categories if c in available], textures),
        ):
            if names:
                make_demo_dataset(root, categories=names, seed=seed, progress=False, textures=folder, **(sizes or {}))
    except ValueError as error:
        raise SystemExit(str(error)) from error
    return root


NEAR_BORDER = 8  # pixels from the image edge that count as "at the border" (12 % of a 256x256 image)


def border_share(maps: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of each map's top-``fraction`` pixels within ``NEAR_BORDER`` pixels of the edge, over ``(N, 1, H, W)`` maps.

    High when normal images are scored by their border (as RADAR's and GLAD's were before their border bands).
    """
    near = border_bands(*maps.shape[-2:], NEAR_BORDER + 1).flatten() < NEAR_BORDER
    flat = maps.flatten(1)
    top = flat.topk(max(1, int(fraction * flat.shape[1])), dim=1).indices
    return round(float(near[top].float().mean()), 3)


def engine(root: Path, callbacks: list[Callback] | None = None) -> Engine:
    """The benchmarks' anomalib ``Engine``: CPU, one device, no logger and no progress bar (logs stay readable)."""
    return Engine(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=callbacks,
    )


def calibration_datamodule(root: Path, category: str, seed: int) -> MVTecAD:
    """Calibrate INT8 on normal training images.

    anomalib's exporter calibrates on the datamodule's validation split, which MVTecAD makes a
    copy of the test split by default: the INT8 model would then be scored on the very images
    (anomalies included) that set its quantisation ranges. Batch size 1 matches deployment and
    keeps traced graphs within memory.
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


def file_size_mb(path: Path) -> float:
    """Size of an export; an OpenVINO model is its .xml plus its .bin."""
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(file.stat().st_size for file in files) / 2**20


def machine_info() -> dict[str, str]:
    """CPU, cores, OpenVINO's view of the CPU and the versions that matter, for the foot of every page."""
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


def machine_line() -> str:
    """:func:`machine_info` as the page's "Machine" bullet."""
    return "- Machine: " + ", ".join(f"{key} {value}" for key, value in machine_info().items())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_atomically(path: Path, text: str | bytes) -> None:
    """Readers see the old report (or saved result) or the new one, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename is atomic; a plain open (not mkstemp's 0600) keeps the usual permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(text, bytes):
            temporary.write_bytes(text)
        else:
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


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that ran ``benchmarks/<script>`` with ``argv`` (default: this process's arguments)."""
    return " ".join([f"python benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])


def generated_line(script: str, argv: Sequence[str] | None, minutes: float) -> str:
    """The page's first line: the exact command that wrote it, the date and how long it took."""
    command = command_line(script, argv)
    return (
        f"Generated by `{command}` on {datetime.now().strftime('%Y-%m-%d')} in {minutes:.1f} min; do not edit by hand."
    )


def finish_figure(figure: "Figure", axes: "np.ndarray", path: Path) -> None:
    """Image grids: no ticks on any panel, a tight layout, then :func:`save_figure_atomically`."""
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    save_figure_atomically(figure, path)


def output_path(args: argparse.Namespace, default: Path) -> Path | None:
    """Where the page goes: ``--output`` (default ``default``); none for ``--output -`` or a --quick run without one."""
    output = None if args.quick and args.output is None else (args.output or str(default))
    return Path(output) if output and output != "-" else None


def publish(report: str, args: argparse.Namespace, default: Path) -> None:
    """Print the page and write it to :func:`output_path`, if any."""
    print(report)
    output = output_path(args, default)
    if output is not None:
        write_atomically(output, report)
        print(f"Report written to {output}")
