"""How GLAD's latency grows with the number of DDIM steps and with image size, as ratios against RADAR.

GLAD reconstructs an image with several U-Net calls (one per DDIM step from the start step, plus
the feature passes of the scoring and, with ADS + SAFF, of the step search); RADAR makes one noise
prediction. This script measures both, in the same process, on the same CPU:

- for each image size (``--sizes``), RADAR with its defaults, and GLAD with each DDIM step
  spacing in ``--steps`` (``num_inference_steps``; the start and search range stay at their defaults,
  so with the defaults 5 spacing steps mean 3 U-Net calls per draw in the reconstruction and 10 mean 7), each
  with plain DDIM (the default) and with ADS + SAFF (``adaptive_steps``); plain DDIM also with each
  number of fixed noise draws in ``--draws`` above 1 (``noise_draws``: one reconstruction per draw, in one batch);
  GLAD's default once more with ``extra_features=[]`` (the own encoder's distance alone), for what the default's
  ImageNet EfficientNet-Lite0 distance costs;
- latency of one image (batch 1, median of ``--runs`` after ``--warmup`` untimed runs) in
  torch eager and in OpenVINO FP32 (``anomalib``'s ``to_openvino`` export, compiled with
  ``INFERENCE_PRECISION_HINT=f32``), each also as a multiple of RADAR's latency at that size.

Latency does not depend on what the weights are, so the models are not trained: each is built
with its default architecture and marked fitted with placeholder calibration values (every
sample runs the same, fixed graph). Quality is measured elsewhere (``glad_ablation.py``).

Rerun (writes ``docs/benchmarks/glad_latency.md``; about 40 minutes on an idle 2-core CPU: every cell exports the model)::

    python benchmarks/glad_latency.py

Smoke test (prints only)::

    python benchmarks/glad_latency.py --quick

What the default's ImageNet Lite0 distance costs, without the machine's drift between rows: ``--interleave N``
exports GLAD's default and the default with ``extra_features=[]`` once, then times them in turn, ``N`` rounds of
``--runs`` each, and prints each round and the median over rounds (OpenVINO FP32, 256x256; prints only)::

    python benchmarks/glad_latency.py --interleave 6 --runs 5
"""

import argparse
import inspect
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import openvino as ov
import torch
from lightning import seed_everything

from anomalib_diffusion.models import GLAD, RADAR

sys.path.insert(0, str(Path(__file__).parent))
from common import OPENVINO_CONFIG, generated_line, machine_line, markdown_table, publish

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "glad_latency.md"
_GLAD_DEFAULTS = inspect.signature(GLAD.__init__).parameters
START, MINIMUM = _GLAD_DEFAULTS["start_timestep"].default, _GLAD_DEFAULTS["min_timestep"].default
DEFAULTS = tuple(_GLAD_DEFAULTS[name].default for name in ("num_inference_steps", "adaptive_steps", "noise_draws"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384], help="square image sides")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20], help="GLAD num_inference_steps values")
    parser.add_argument("--draws", type=int, nargs="+", default=[1], help="GLAD noise_draws values (plain DDIM)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per cell (default 10; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--output", default=None, help=f"report path ('-' prints only; default {REPORT})")
    parser.add_argument("--quick", action="store_true", help="one small size, two step counts, 2 runs; prints only")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="time the default against extra_features=[] in turn, this many rounds (OpenVINO FP32); prints only",
    )
    return parser.parse_args(argv)


def fitted_glad(size: int, steps: int, adaptive: bool, draws: int = 1, **settings: object) -> GLAD:
    model = GLAD(
        image_size=size,
        num_inference_steps=steps,
        adaptive_steps=adaptive,
        noise_draws=draws,
        visualizer=False,
        **settings,
    ).eval()
    model.model.tau.fill_(0.5)
    model.model.ramp_high.fill_(1.0)
    model.model.fitted.fill_(True)
    return model


def fitted_radar(size: int) -> RADAR:
    model = RADAR(image_size=size, visualizer=False).eval()
    model.model.fitted.fill_(True)  # placeholder statistics: its default score needs no forest
    return model


def median_ms(call: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(model: GLAD | RADAR, size: int, work: Path, name: str, warmup: int, runs: int) -> dict[str, float]:
    image = torch.rand(1, 3, size, size)
    with torch.inference_mode():
        eager = median_ms(lambda: model(image), warmup, runs)
    xml = model.to_openvino(work / name)
    request = ov.Core().compile_model(xml, "CPU", OPENVINO_CONFIG).create_infer_request()
    array = image.numpy()
    openvino = median_ms(lambda: request.infer(array), warmup, runs)
    return {"torch": eager, "openvino": openvino}


def interleaved(rounds: int, runs: int, warmup: int, size: int = 256) -> None:
    """Time GLAD's default and its ``extra_features=[]`` variant in turn, so that both see the same machine."""
    image = torch.rand(1, 3, size, size).numpy()
    requests = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, settings in (("default", {}), ("extra_features=[]", {"extra_features": []})):
            xml = fitted_glad(size, *DEFAULTS, **settings).to_openvino(Path(scratch) / name.replace("=[]", ""))
            requests[name] = ov.Core().compile_model(xml, "CPU", OPENVINO_CONFIG).create_infer_request()
        times: dict[str, list[float]] = {name: [] for name in requests}
        for round_index in range(rounds):
            for name, request in requests.items():
                times[name].append(median_ms(lambda request=request: request.infer(image), warmup, runs))
            print(f"round {round_index}: " + ", ".join(f"{name} {values[-1]:.0f} ms" for name, values in times.items()))
    print(
        f"median over {rounds} rounds (each the median of {runs} runs), OpenVINO FP32 {size}x{size}: "
        + ", ".join(f"{name} {statistics.median(values):.0f} ms" for name, values in times.items())
    )
    print(machine_line())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.interleave:
        seed_everything(0)
        interleaved(args.interleave, args.runs or 5, args.warmup)
        return
    sizes = args.sizes[:1] if args.quick else args.sizes
    step_values = args.steps[:2] if args.quick else args.steps
    runs = args.runs or (2 if args.quick else 10)
    seed_everything(0)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for size in sizes:
            radar = measure(fitted_radar(size), size, work, f"radar{size}", args.warmup, runs)
            print(f"RADAR {size}: {radar}", flush=True)
            rows.append(
                [
                    f"{size}x{size}",
                    "RADAR",
                    "1",
                    f"{radar['torch']:.0f}",
                    "1.0",
                    f"{radar['openvino']:.0f}",
                    "1.0",
                ]
            )
            cells = [
                (steps, adaptive, draws, {})
                for steps, adaptive, draws in itertools.product(step_values, (False, True), sorted({1, *args.draws}))
                if not (adaptive and draws > 1)
            ]
            cells.append((*DEFAULTS, {"extra_features": []}))
            for index, (steps, adaptive, draws, settings) in enumerate(cells):
                model = fitted_glad(size, steps, adaptive, draws, **settings)
                calls = len(model.model.timesteps) * draws
                variant = ("ADS + SAFF" if adaptive else "plain DDIM") + (f", noise_draws={draws}" if draws > 1 else "")
                if settings:
                    variant += ", extra_features=[] (own distance only)"
                elif (steps, adaptive, draws) == DEFAULTS:
                    variant += ", the default"
                name = f"glad{size}_{index}"
                glad = measure(model, size, work, name, args.warmup, runs)
                print(f"GLAD {size} steps={steps} {variant} ({calls} U-Net calls): {glad}", flush=True)
                rows.append(
                    [
                        f"{size}x{size}",
                        f"GLAD num_inference_steps={steps}, {variant}",
                        str(calls),
                        f"{glad['torch']:.0f}",
                        f"{glad['torch'] / radar['torch']:.1f}",
                        f"{glad['openvino']:.0f}",
                        f"{glad['openvino'] / radar['openvino']:.1f}",
                    ]
                )
    minutes = (time.perf_counter() - start) / 60
    table = markdown_table(
        ["image", "model", "U-Net calls in the reconstruction", "torch ms", "x RADAR", "OpenVINO FP32 ms", "x RADAR"],
        rows,
    )
    report = "\n".join(
        [
            "# GLAD latency vs DDIM steps and image size, against RADAR",
            "",
            generated_line("glad_latency.py", argv, minutes),
            "",
            table,
            "",
            f"- One image per call (batch 1), median of {runs} runs after {args.warmup} warm-up runs; the whole "
            "exported graph (resize, model, scoring, post-processing).",
            "- Untrained models with default architectures (latency does not depend on the weights); GLAD noises to "
            f"the largest DDIM step not above start_timestep={START} (with ADS + SAFF it searches down to "
            f"min_timestep={MINIMUM}; its defaults), with one U-Net call per DDIM step from there. Every GLAD row but "
            "the one marked extra_features=[] also compares in ImageNet EfficientNet-Lite0 features (the default).",
            machine_line(),
            "",
        ]
    )
    publish(report, args, REPORT)


if __name__ == "__main__":
    main()
