"""Soak test: thousands of OpenVINO predictions in one process, with latency and memory tracked throughout.

A deployed model runs for weeks; a slow leak or a latency drift shows only after thousands of calls.
This script scores ``--predictions`` images (the test images of a demo category, cycled) with the plain
OpenVINO runtime (``anomalib_diffusion.deploy.openvino_runtime``, the deployment path of
``docs/deployment.md``), reading each image from disk as a deployment would. It records every call's
wall-clock latency and the process's resident memory (RSS, from ``/proc/self/statm``) every
``--rss-every`` calls, and reports: median and 99th-percentile latency in the first and the last
``--window`` calls, and RSS after the warm-up against RSS at the end. A figure shows both over time.

The model is either an export you pass (``--xml``) or one of ``configs/benchmark.yaml``'s models trained
here for ``--train-steps`` steps (latency and memory of the exported graph do not depend on how long it
trained; its settings, image size included, are the config's).

Rerun (writes docs/benchmarks/soak.md and docs/figures/soak.png)::

    python benchmarks/soak.py --model DADDA --predictions 3000

Smoke test (prints only)::

    python benchmarks/soak.py --quick
"""

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import anomalib.models
import numpy as np
import yaml
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning import seed_everything
from tqdm import tqdm

from anomalib_diffusion.data import make_demo_dataset
from anomalib_diffusion.deploy.openvino_runtime import OpenVINODetector, image_paths, read_image

sys.path.insert(0, str(Path(__file__).parent))
from common import OPENVINO_CONFIG, machine_line, markdown_table, publish, save_figure_atomically
from report import QUICK_SETTINGS

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "docs" / "benchmarks" / "soak.md"
FIGURE = REPO / "docs" / "figures" / "soak.png"
STEP_KEYS = ("max_steps", "generator_steps", "detector_steps")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--xml", type=Path, default=None, help="an exported OpenVINO model.xml to soak")
    source.add_argument("--model", default="DADDA", help="a model of configs/benchmark.yaml to train and export")
    parser.add_argument("--train-steps", type=int, default=30, help="training steps (or epochs) for --model")
    parser.add_argument("--category", default="brick", help="demo category whose test images are scored")
    parser.add_argument("--predictions", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=20, help="calls before the baseline RSS is taken")
    parser.add_argument("--window", type=int, default=500, help="calls in the first / last latency window")
    parser.add_argument("--rss-every", type=int, default=50)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--output", default=None, help=f"report path ('-' prints only; default {REPORT})")
    parser.add_argument("--figure", default=None, help=f"figure path ('-': none; default {FIGURE})")
    parser.add_argument("--quick", action="store_true", help="tiny data, 200 predictions; prints only")
    args = parser.parse_args(argv)
    if args.quick:
        args.predictions, args.window, args.warmup, args.rss_every = 200, 50, 5, 10
    if args.predictions < 2 * args.window or args.window < 1:
        parser.error(f"--predictions ({args.predictions}) must be at least twice --window ({args.window}).")
    return args


def rss_mb() -> float:
    """Current resident memory of this process (not the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def train_and_export(name: str, steps: int, root: Path, category: str, work: Path, quick: bool) -> Path:
    grid = yaml.safe_load((REPO / "configs" / "benchmark.yaml").read_text())["benchmark"]["model"]["grid"]
    settings = {entry["class_path"]: dict(entry.get("init_args") or {}) for entry in grid}
    if name not in settings:
        msg = f"--model {name} is not in configs/benchmark.yaml ({sorted(settings)}); or pass --xml."
        raise SystemExit(msg)
    chosen = settings[name]
    for key in STEP_KEYS:
        if key in chosen or (name in {"RADAR", "GLAD"} and key == "max_steps"):
            chosen[key] = steps
    if "max_epochs" in chosen:
        chosen["max_epochs"] = max(1, min(steps, int(chosen["max_epochs"])))
    if quick:
        chosen = dict(QUICK_SETTINGS[name])
    seed_everything(0, workers=True)
    model = getattr(anomalib.models, name)(**chosen)
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    data = MVTecAD(root=root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=0)
    engine.fit(model=model, datamodule=data)
    return engine.export(model=model.eval(), export_type=ExportType.OPENVINO, export_root=work / "export")


def soak(xml: Path, images: list[Path], args: argparse.Namespace) -> tuple[list[float], list[tuple[int, float]]]:
    detector = OpenVINODetector(xml, config=OPENVINO_CONFIG)
    latencies: list[float] = []
    memory: list[tuple[int, float]] = []
    source = itertools.cycle(images)
    for call in tqdm(range(args.warmup + args.predictions), desc="soak", unit="call"):
        path = next(source)
        start = time.perf_counter()
        prediction = detector.predict(read_image(path), path)
        elapsed = (time.perf_counter() - start) * 1000
        if not np.isfinite(prediction.pred_score):
            msg = f"Call {call} on {path} returned a non-finite score."
            raise RuntimeError(msg)
        if call >= args.warmup:
            latencies.append(elapsed)
            if (call - args.warmup) % args.rss_every == 0 or call == args.warmup + args.predictions - 1:
                memory.append((call - args.warmup, rss_mb()))
    return latencies, memory


def summary_rows(latencies: list[float], memory: list[tuple[int, float]], window: int) -> list[list[str]]:
    first, last = latencies[:window], latencies[-window:]

    def p99(values: list[float]) -> float:
        return float(np.percentile(values, 99))

    start_rss, end_rss = memory[0][1], memory[-1][1]
    peak_rss = max(value for _, value in memory)
    return [
        [
            "median latency, ms",
            f"{statistics.median(first):.1f}",
            f"{statistics.median(last):.1f}",
            f"{statistics.median(last) / statistics.median(first):.3f}×",
        ],
        ["99th percentile latency, ms", f"{p99(first):.1f}", f"{p99(last):.1f}", f"{p99(last) / p99(first):.3f}×"],
        [
            "resident memory, MB",
            f"{start_rss:.1f}",
            f"{end_rss:.1f}",
            f"{end_rss - start_rss:+.1f} MB (peak {peak_rss:.1f})",
        ],
    ]


def draw(latencies: list[float], memory: list[tuple[int, float]], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(latencies, linewidth=0.3, color="tab:blue", alpha=0.5, label="each call")
    kernel = max(1, len(latencies) // 60)
    smooth = np.convolve(latencies, np.ones(kernel) / kernel, mode="valid")
    top.plot(np.arange(len(smooth)) + kernel // 2, smooth, color="tab:blue", label=f"mean of {kernel}")
    top.set(ylabel="latency, ms")
    top.legend(fontsize=8)
    calls, values = zip(*memory, strict=True)
    bottom.plot(calls, values, color="tab:red")
    bottom.set(xlabel="prediction", ylabel="RSS, MB")
    figure.tight_layout()
    save_figure_atomically(figure, path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        sizes = {"n_train": 8, "n_test_good": 4, "n_test_per_defect": 2, "image_size": 64} if args.quick else {}
        root = make_demo_dataset(work / "data", categories=[args.category], seed=0, progress=False, **sizes)
        xml = args.xml or train_and_export(args.model, args.train_steps, root, args.category, work / "run", args.quick)
        images = image_paths(root / args.category / "test")
        start = time.perf_counter()
        latencies, memory = soak(xml, images, args)
        minutes = (time.perf_counter() - start) / 60
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    what = (
        f"`{args.xml}`" if args.xml else f"{args.model} from configs/benchmark.yaml, trained {args.train_steps} steps"
    )
    report = "\n".join(
        [
            "# Soak test: OpenVINO predictions over time",
            "",
            f"Generated by `{command.strip()}` on {datetime.now().strftime('%Y-%m-%d')}; the soak took "
            f"{minutes:.1f} min; do not edit by hand.",
            "",
            f"{args.predictions} predictions after {args.warmup} warm-up calls, one process, model {what}, "
            f"exported to OpenVINO FP32 and run with the plain runtime; each call reads one of the "
            f"{len(images)} test images of `{args.category}` from disk.",
            "",
            markdown_table(
                ["", f"first {args.window} calls", f"last {args.window} calls", "change"],
                summary_rows(latencies, memory, args.window),
            ),
            "",
            "Memory is the process's resident set (`/proc/self/statm`) after the warm-up and at the end. The level "
            "includes torch and anomalib, which this process loaded to train and export the model; what the soak "
            "checks is the change. The footprint of a torch-free runtime process is in [benchmarks.md](../benchmarks.md).",
            "",
            "![latency and memory over the soak](../figures/soak.png)",
            "",
            machine_line(),
            "",
        ]
    )
    if not (args.quick and args.figure is None) and args.figure != "-":
        draw(latencies, memory, Path(args.figure or FIGURE))
    publish(report, args, REPORT)


if __name__ == "__main__":
    main()
