"""Run an exported model with the plain OpenVINO runtime: no torch, no anomalib.

Everything an anomalib OpenVINO export needs at inference time is inside its ``model.xml`` /
``model.bin``: resizing and normalisation (the pre-processor), the network, and the score and map
normalisation and thresholds (the post-processor). Feed it an RGB image as float32 in [0, 1],
shape ``(1, 3, H, W)``, and it returns ``pred_score``, ``pred_label``, ``anomaly_map`` and
``pred_mask``. This file imports only the standard library, NumPy, Pillow and OpenVINO (tqdm if it
is there, for a progress bar), so it can be copied on its own to an edge machine that has
``pip install openvino pillow numpy`` and nothing else.

**Precision.** OpenVINO's CPU plugin computes an f32 model in bf16 on CPUs that have bf16 (Intel Xeon
from Sapphire Rapids on, AMD Zen 4) unless told otherwise, and the scores then differ from those of
the model that was validated, enough to flip decisions near the threshold. Everything here compiles
in f32 by default (:func:`compile_config`); bf16 or f16 is an explicit opt-in (``--precision``).

Batch mode scores a file or a folder once; ``--watch`` keeps polling the folder and scores each new
image once its size has stopped changing (so a file still being copied in is not read half-way).
Unreadable or truncated images are reported and skipped; the rest are processed.

Example:
    python -m anomalib_diffusion.deploy.openvino_runtime --model export/weights/openvino/model.xml \\
        --input datasets/demo/brick/test --csv scores.csv
    python openvino_runtime.py --model model.xml --input /mnt/camera --watch --csv scores.csv
"""

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
OUTPUTS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
# Inference precisions a user may ask for; f32 gives the validated (torch) answer on every CPU.
PRECISIONS = ("f32", "bf16", "f16")
# The name OpenVINO's OPTIMIZATION_CAPABILITIES uses for each precision.
_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}


def compile_config(precision: str = "f32", **properties: str) -> dict[str, str]:
    """OpenVINO compile properties that pin the inference precision (plus any ``properties`` given).

    ``compile_config()`` is ``{"INFERENCE_PRECISION_HINT": "f32"}``: pass it as anomalib's
    ``OpenVINOInferencer(..., config=compile_config())`` or ``core.compile_model(..., config=...)``.

    Raises:
        ValueError: If ``precision`` is not one of :data:`PRECISIONS`.
    """
    _check_precision(precision)
    return {"INFERENCE_PRECISION_HINT": precision, **properties}


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        msg = f"precision must be one of {list(PRECISIONS)}, got {precision!r}; f32 gives the validated scores."
        raise ValueError(msg)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--precision`` option of the command-line tools (f32 unless the user opts in)."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="f32",
        help="inference precision (default f32: the validated scores on every CPU; bf16/f16 are faster, less exact)",
    )


def device_supports(precision: str, device: str = "CPU") -> bool:
    """Whether OpenVINO's ``device`` computes natively in ``precision`` (where not, it falls back to f32)."""
    _check_precision(precision)
    return _CAPABILITY[precision] in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")


@dataclass(frozen=True)
class Prediction:
    """One image's result: the image score and decision, and the anomaly map and mask (H x W)."""

    path: Path | None
    pred_score: float
    pred_label: bool
    anomaly_map: np.ndarray
    pred_mask: np.ndarray | None


def read_image(path: Path) -> np.ndarray:
    """An RGB image as float32 in [0, 1], shape (H, W, 3); OSError or ValueError if unreadable."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return pixels / 255.0


def _compiled_precision(compiled: ov.CompiledModel, requested: str) -> str:
    """The precision a compiled model computes in (``AUTO`` does not tell: then the one requested)."""
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except RuntimeError:
        return requested


class OpenVINODetector:
    """A compiled anomalib OpenVINO export.

    Args:
        model: Path of the exported ``model.xml`` (or ``.onnx``).
        device: OpenVINO device name (``CPU``, ``GPU``).
        config: More OpenVINO compile properties (they override the defaults: ``PERFORMANCE_HINT=LATENCY``
            and the precision below).
        precision: Inference precision, one of :data:`PRECISIONS`. ``f32`` (default) gives the scores
            of the validated torch model on every CPU; ``bf16`` / ``f16`` are faster where the device has
            them, at a cost in accuracy that ``benchmarks/report.py`` measures per model. On a device
            without them OpenVINO computes in f32; :attr:`precision` tells what it really runs.

    Raises:
        FileNotFoundError: If ``model`` does not exist.
        ValueError: If the model lacks the ``pred_score`` and ``anomaly_map`` outputs of an anomalib export,
            or ``precision`` is unknown.
    """

    def __init__(
        self,
        model: Path | str,
        device: str = "CPU",
        config: dict[str, str] | None = None,
        precision: str = "f32",
    ) -> None:
        model = Path(model)
        if not model.is_file():
            msg = f"Model file {model} does not exist; export one with `anomalib export ... --export_type openvino`."
            raise FileNotFoundError(msg)
        properties = compile_config(precision, PERFORMANCE_HINT="LATENCY") | (config or {})
        self.compiled = ov.Core().compile_model(model, device, properties)
        self.precision = _compiled_precision(self.compiled, properties["INFERENCE_PRECISION_HINT"])
        if self.precision != properties["INFERENCE_PRECISION_HINT"]:
            logger.warning(
                "%s cannot compute in %s; OpenVINO runs %s in %s.",
                device,
                properties["INFERENCE_PRECISION_HINT"],
                model,
                self.precision,
            )
        self.request = self.compiled.create_infer_request()
        self.outputs = {name: port for port in self.compiled.outputs for name in port.names if name in OUTPUTS}
        missing = {"pred_score", "anomaly_map"} - set(self.outputs)
        if missing:
            msg = f"{model} has no output(s) {sorted(missing)}: it is not an anomalib model export."
            raise ValueError(msg)

    def predict(self, image: np.ndarray, path: Path | None = None) -> Prediction:
        """Score one RGB image (H, W, 3): uint8, or float in [0, 1]."""
        if image.ndim != 3 or image.shape[-1] != 3:  # noqa: PLR2004
            msg = f"Expected an RGB image of shape (H, W, 3), got shape {image.shape}."
            raise ValueError(msg)
        pixels = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        self.request.infer({0: np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])})
        result = {name: self.request.get_tensor(port).data.copy() for name, port in self.outputs.items()}
        score = float(result["pred_score"].reshape(-1)[0])
        label = bool(result["pred_label"].reshape(-1)[0]) if "pred_label" in result else score >= 0.5  # noqa: PLR2004
        anomaly_map = result["anomaly_map"].reshape(result["anomaly_map"].shape[-2:])
        mask = result["pred_mask"].reshape(result["pred_mask"].shape[-2:]) if "pred_mask" in result else None
        return Prediction(path, score, label, anomaly_map, mask)

    def predict_file(self, path: Path) -> Prediction:
        return self.predict(read_image(path), path)


def image_paths(source: Path) -> list[Path]:
    """The image files of ``source`` (itself, if it is a file), sorted."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        msg = f"Input {source} does not exist; pass an image file or a folder of images."
        raise FileNotFoundError(msg)
    return sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def _progress(items: Sequence[Path], description: str) -> Iterable[Path]:
    try:
        from tqdm import tqdm  # optional on an edge machine
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="img", disable=None if len(items) > 1 else True)


def score_files(detector: OpenVINODetector, paths: Sequence[Path]) -> Iterator[Prediction]:
    """Predictions for the readable files of ``paths``; unreadable ones are logged and skipped."""
    for path in _progress(paths, "OpenVINO inference"):
        try:
            image = read_image(path)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            logger.warning("Skipped %s: not a readable image (%s).", path, error)
            continue
        yield detector.predict(image, path)


def write_csv(predictions: Iterable[Prediction], destination: Path) -> int:
    """Write ``path,pred_score,pred_label`` rows whole or not at all; returns the row count."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(handle, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "pred_score", "pred_label"])
            for prediction in predictions:
                writer.writerow([prediction.path, f"{prediction.pred_score:.6f}", int(prediction.pred_label)])
                count += 1
        Path(temporary).replace(destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count


def watch(
    detector: OpenVINODetector,
    folder: Path,
    on_prediction: Callable[[Prediction], None],
    interval: float = 2.0,
    max_images: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Score each new image in ``folder`` once its size is unchanged over one poll; returns the count.

    Runs until interrupted (Ctrl-C) or, if ``max_images`` is given, until that many files were handled.
    Files present when watching starts are scored too. ``sleep`` waits between polls.
    """
    if not folder.is_dir():
        msg = f"Folder {folder} does not exist; --watch needs a folder to poll."
        raise FileNotFoundError(msg)
    done: set[Path] = set()
    sizes: dict[Path, int] = {}
    handled = 0
    while max_images is None or handled < max_images:
        for path in image_paths(folder):
            if path in done:
                continue
            size = path.stat().st_size
            if sizes.get(path) != size:  # new, or still growing: look again at the next poll
                sizes[path] = size
                continue
            done.add(path)
            handled += 1
            for prediction in score_files(detector, [path]):
                on_prediction(prediction)
            if max_images is not None and handled >= max_images:
                break
        else:
            sleep(interval)
    return handled


def main(argv: Sequence[str] | None = None) -> None:  # noqa: C901, PLR0915 - one flat CLI
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Exported model.xml (or .onnx).")
    parser.add_argument("--input", type=Path, required=True, help="An image file or a folder of images.")
    parser.add_argument("--csv", type=Path, default=None, help="Also write path,pred_score,pred_label rows here.")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU).")
    add_precision_argument(parser)
    parser.add_argument("--watch", action="store_true", help="Keep polling the --input folder for new images.")
    parser.add_argument("--interval", type=float, default=2.0, help="Seconds between polls with --watch.")
    parser.add_argument("--max-images", type=int, default=None, help="With --watch: stop after this many files.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        detector = OpenVINODetector(args.model, args.device, precision=args.precision)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))

    def show(prediction: Prediction) -> None:
        decision = "ANOMALOUS" if prediction.pred_label else "normal"
        print(f"{prediction.path}\tscore={prediction.pred_score:.4f}\t{decision}", flush=True)  # noqa: T201

    if args.watch:
        csv_file = None
        if args.csv is not None:
            new = not args.csv.exists()
            csv_file = args.csv.open("a", newline="")
            if new:
                csv_file.write("path,pred_score,pred_label\n")

        def record(prediction: Prediction) -> None:
            show(prediction)
            if csv_file is not None:  # one whole line per image, flushed: a reader never sees half a row
                csv_file.write(f"{prediction.path},{prediction.pred_score:.6f},{int(prediction.pred_label)}\n")
                csv_file.flush()

        try:
            watch(detector, args.input, record, args.interval, args.max_images)
        except FileNotFoundError as error:
            parser.error(str(error))
        except KeyboardInterrupt:
            pass
        finally:
            if csv_file is not None:
                csv_file.close()
        return
    try:
        paths = image_paths(args.input)
    except FileNotFoundError as error:
        parser.error(str(error))
    predictions = []
    for prediction in score_files(detector, paths):
        show(prediction)
        predictions.append(prediction)
    if args.csv is not None:
        write_csv(predictions, args.csv)
    print(f"Scored {len(predictions)} of {len(paths)} file(s).", file=sys.stderr)  # noqa: T201


if __name__ == "__main__":
    main()
