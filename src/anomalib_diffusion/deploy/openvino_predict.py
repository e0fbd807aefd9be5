"""Score images with an exported OpenVINO model and write anomaly overlays.

Runs anomalib's :class:`~anomalib.deploy.OpenVINOInferencer` on one image or a folder of
images, prints one line per image (path, image score, decision) and writes a PNG per image that
shows the input, the anomaly heat map over it, and the predicted mask's contour. It compiles in f32
(the validated scores on every CPU; OpenVINO would otherwise use bf16 where the CPU has it) unless
``--precision`` asks for bf16 or f16.

Example:
    anomalib-diffusion-predict --model results/weights/openvino/model.xml \\
        --input datasets/demo/brick/test/scratch --output predictions
"""

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from anomalib.data import NumpyImageBatch
from anomalib.deploy import OpenVINOInferencer
from anomalib.visualization.image.item_visualizer import visualize_image_item
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from anomalib_diffusion.components.files import atomic_write
from anomalib_diffusion.deploy.openvino_runtime import add_precision_argument, compile_config

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def image_paths(source: Path) -> list[Path]:
    """The image files of ``source`` (itself, if it is a file), sorted."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        msg = f"Input {source} does not exist; pass an image file or a folder of images."
        raise FileNotFoundError(msg)
    paths = sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        msg = f"Folder {source} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}."
        raise FileNotFoundError(msg)
    return paths


def overlay(prediction: NumpyImageBatch) -> Image.Image:
    """Input | heat map over the input | predicted mask contour over the input."""
    item = next(iter(prediction))
    visual = visualize_image_item(
        item,
        fields=["image"],
        overlay_fields=[("image", ["anomaly_map"]), ("image", ["pred_mask"])],
    )
    if visual is None:
        msg = "The model returned neither an anomaly map nor a mask to draw."
        raise ValueError(msg)
    return visual


def save_atomically(image: Image.Image, path: Path) -> None:
    """Write ``path`` whole or not at all (a crash never leaves a truncated PNG)."""
    with atomic_write(path) as temporary:
        image.save(temporary, format="PNG")


def predict(
    model: Path, source: Path, output: Path, device: str = "CPU", precision: str = "f32"
) -> list[tuple[Path, float, bool]]:
    """Score every image under ``source`` in ``precision``; unreadable files are reported and skipped."""
    inferencer = OpenVINOInferencer(model, device=device, config=compile_config(precision))
    results = []
    paths = image_paths(source)
    for path in tqdm(paths, desc="OpenVINO inference", disable=len(paths) == 1):
        try:
            prediction = inferencer.predict(path)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            logger.warning("Skipped %s: not a readable image (%s).", path, error)
            continue
        score, label = float(prediction.pred_score.reshape(-1)[0]), bool(prediction.pred_label.reshape(-1)[0])
        save_atomically(overlay(prediction), output / f"{path.stem}_overlay.png")
        results.append((path, score, label))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Exported model.xml (or .onnx).")
    parser.add_argument("--input", type=Path, required=True, help="An image file or a folder of images.")
    parser.add_argument("--output", type=Path, default=Path("predictions"), help="Folder for the overlay PNGs.")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU, AUTO).")
    add_precision_argument(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(
            f"model file {args.model} does not exist; export one with `anomalib export ... --export_type openvino`."
        )
    results = predict(args.model, args.input, args.output, args.device, args.precision)
    for path, score, label in results:
        print(f"{path}\tscore={score:.4f}\t{'ANOMALOUS' if label else 'normal'}")  # noqa: T201
    print(f"Wrote {len(results)} overlay(s) to {args.output}")  # noqa: T201


if __name__ == "__main__":
    main()
