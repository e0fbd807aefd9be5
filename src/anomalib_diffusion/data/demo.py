"""A small offline demo data set in the MVTec AD folder layout, with planted defects.

The normal images are random crops of the CC0 textures that ship inside the scikit-image wheel
(``brick``, ``grass`` and ``gravel``), tinted into genuine RGB. Each defect type paints a change
into a clean crop and its ground-truth mask is computed from that change: a mask pixel is set
exactly where the saved defective image differs from the clean crop it was made from.

The result is read unchanged by anomalib's own readers::

    root/<category>/train/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/<defect_type>/000.png
    root/<category>/ground_truth/<defect_type>/000_mask.png

This generator only makes evaluation data. It deliberately shares nothing with the training-time
anomaly synthesis in :mod:`anomalib_diffusion.components`, so that a model is never scored on
defects drawn by the same code that it was trained against.

Example:
    >>> from anomalib.data import MVTecAD  # doctest: +SKIP
    >>> root = make_demo_dataset("datasets/demo", categories=("brick",))  # doctest: +SKIP
    >>> datamodule = MVTecAD(root=root, category="brick")  # doctest: +SKIP

Or from a shell: ``python -m anomalib_diffusion.data.demo --root datasets/demo``.

The same defects can be planted on any folder of texture photographs (``textures=`` or
``--textures DIR``): each image becomes a category named after its file, its crops are the
normal images, and a grey photograph is tinted with a fixed colour ramp chosen from the
category's name, so that colour defects (stains, contamination) mean something. This is how
the development benchmark of ``benchmarks/report.py --textures`` measures models on surfaces
that no default was tuned on.
"""

import argparse
import hashlib
import inspect
import json
import numbers
import shutil
import uuid
import zlib
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import skimage.data
from PIL import Image
from tqdm import tqdm

__all__ = [
    "DEMO_CATEGORIES",
    "DEMO_DEFECT_TYPES",
    "TEXTURE_SUFFIXES",
    "main",
    "make_demo_dataset",
    "texture_categories",
]

DEMO_CATEGORIES: MappingProxyType[str, Callable[[], np.ndarray]] = MappingProxyType(
    {
        "brick": skimage.data.brick,
        "grass": skimage.data.grass,
        "gravel": skimage.data.gravel,
    },
)
"""Category name -> loader of its 512x512 grayscale source texture (bundled with scikit-image)."""

DEMO_DEFECT_TYPES = ("contamination", "hole", "scratch", "stain")
"""Planted defect types; every category's test split has one folder per type."""

# Dark and light end of the colour ramp each texture's gray levels are mapped onto. Distinct hues
# make every image a real 3-channel image and let `contamination` be seen as foreign material.
_TINTS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "brick": ((0.22, 0.07, 0.04), (0.93, 0.62, 0.48)),
    "grass": ((0.04, 0.12, 0.02), (0.70, 0.88, 0.40)),
    "gravel": ((0.16, 0.13, 0.10), (0.95, 0.88, 0.74)),
}

# Colour ramps for grey photographs from a texture folder; a category keeps the one its name picks.
_TEXTURE_TINTS = (
    ((0.20, 0.10, 0.05), (0.95, 0.80, 0.62)),  # tan
    ((0.05, 0.10, 0.20), (0.70, 0.82, 0.95)),  # steel blue
    ((0.08, 0.16, 0.06), (0.78, 0.92, 0.62)),  # sage
    ((0.18, 0.06, 0.12), (0.95, 0.72, 0.80)),  # rose
    ((0.12, 0.12, 0.12), (0.92, 0.90, 0.84)),  # warm grey
    ((0.16, 0.10, 0.20), (0.84, 0.76, 0.95)),  # lavender
)

TEXTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Image files that :func:`texture_categories` reads from a texture folder."""

# Candidate stain colours (oil, rust, ink, bleach); a stain takes one far from the local colour.
_STAIN_COLOURS = np.array(
    [(0.12, 0.08, 0.04), (0.62, 0.32, 0.08), (0.16, 0.22, 0.55), (0.86, 0.86, 0.80)],
    dtype=np.float32,
)

# Visible but not trivially large: fraction of the image area a defect mask may cover.
_MIN_DEFECT_AREA = 0.003
_MAX_DEFECT_AREA = 0.05
_MAX_DEFECT_ATTEMPTS = 50

# Crops are at least this wide in source pixels, so that even a 32-64 px image shows several
# bricks or stones instead of a magnified fraction of one.
_MIN_CROP = 224
_MAX_CROP_ZOOM = 1.25

_MIN_IMAGE_SIZE = 32
_MAX_IMAGE_SIZE = 512

_MARKER_NAME = ".demo_dataset.json"
# Bump when the images a given set of arguments produces change, so old sets are not reused.
_FORMAT_VERSION = 1


# A category is a demo name (a scikit-image texture) or, for a texture folder, the absolute path of
# its photograph: the key of everything below that draws from a source texture.


def _category_name(source: str) -> str:
    """Folder name of a category: the demo name, or the photograph's file stem."""
    return Path(source).stem if source not in DEMO_CATEGORIES else source


@cache
def _texture(source: str) -> np.ndarray:
    """Source texture stretched to [0, 1]: HxW if grey (to be tinted), HxWx3 if in colour.

    The stretch maps the 0.5 and 99.5 percentiles to 0 and 1 (the raw brick only spans grey levels 63-207).
    """
    if source in DEMO_CATEGORIES:
        pixels = DEMO_CATEGORIES[source]().astype(np.float32)
    else:
        with Image.open(source) as picture:
            pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
        if np.ptp(pixels, axis=-1).max() <= 2:  # noqa: PLR2004 - grey up to JPEG noise
            pixels = pixels.mean(axis=-1)
    low, high = np.percentile(pixels, (0.5, 99.5))
    texture = np.clip((pixels - low) / max(high - low, 1e-6), 0.0, 1.0)
    texture.setflags(write=False)
    return texture


def _tint(gray: np.ndarray, source: str) -> np.ndarray:
    if gray.ndim == 3:  # noqa: PLR2004 - a colour photograph keeps its colours
        return gray
    if source in _TINTS:
        ramp = _TINTS[source]
    else:
        ramp = _TEXTURE_TINTS[zlib.crc32(_category_name(source).encode()) % len(_TEXTURE_TINTS)]
    dark, light = (np.array(colour, dtype=np.float32) for colour in ramp)
    return dark + gray[..., None] * (light - dark)


def _foreign_sources(source: str) -> list[str]:
    """Textures a ``contamination`` defect on ``source`` may be cut from: its folder's other photographs."""
    if source in DEMO_CATEGORIES:
        return sorted(set(DEMO_CATEGORIES) - {source})
    siblings = [str(path) for path in texture_categories(Path(source).parent).values() if str(path) != source]
    return siblings or sorted(DEMO_CATEGORIES)


def _clean_crop(category: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A random RGB crop, float32 in [0, 1], resized to ``image_size`` and randomly flipped/rotated."""
    texture = _texture(category)
    side = min(texture.shape[:2])
    base = min(max(image_size, _MIN_CROP), side)
    crop = int(rng.integers(base, min(side, round(base * _MAX_CROP_ZOOM)) + 1))
    height, width = texture.shape[:2]
    # One draw of both corners (square sources: the same stream as before non-square sources were allowed).
    highs = height - crop + 1 if height == width else np.array([height, width]) - crop + 1
    top, left = rng.integers(0, highs, size=2)
    gray = texture[top : top + crop, left : left + crop]
    if crop != image_size:
        gray = cv2.resize(gray, (image_size, image_size), interpolation=cv2.INTER_AREA)
    gray = np.rot90(gray, k=int(rng.integers(4)))
    if rng.random() < 0.5:  # noqa: PLR2004 - a coin flip
        gray = gray[:, ::-1]
    return _tint(np.ascontiguousarray(gray), category)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-scale noise that varies over about ``size / cells`` pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _blob(rng: np.random.Generator, size: int, area: tuple[float, float], roughness: float) -> np.ndarray:
    """Normalised distance to the centre of a random irregular ellipse: the blob is where it is < 1."""
    target = rng.uniform(*area) * size * size
    aspect = rng.uniform(0.45, 1.0)
    major = np.sqrt(target / (np.pi * aspect))
    minor = aspect * major
    angle = rng.uniform(0.0, np.pi)
    centre_y, centre_x = rng.uniform(major, size - major, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xx - centre_x) * np.cos(angle) + (yy - centre_y) * np.sin(angle)
    v = -(xx - centre_x) * np.sin(angle) + (yy - centre_y) * np.cos(angle)
    return np.sqrt((u / major) ** 2 + (v / minor) ** 2) + roughness * _smooth_noise(rng, size, cells=10)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _scratch(image: np.ndarray, rng: np.random.Generator, _category: str) -> np.ndarray:
    """A thin bright or dark curve (quadratic Bezier) that contrasts with what it crosses."""
    size = image.shape[0]
    length = rng.uniform(0.3, 0.6) * size
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(0.3 * size, 0.7 * size, size=2)
    start, end = centre - direction * length / 2, centre + direction * length / 2
    control = centre + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0.0, 1.0, 64)[:, None]
    curve = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * end
    # 2-4 px from 64 to 256 px images; thinner below and wider above, so that a scratch keeps its
    # look and its share of the image area.
    scale = size / 256 if size > 256 else min(1.0, size / 64)  # noqa: PLR2004
    thickness = max(1, round(int(rng.integers(2, 5)) * scale))
    canvas = np.zeros((size, size), dtype=np.uint8)
    # LINE_8 rather than anti-aliased: a scratch has a hard edge, and so has its mask.
    cv2.polylines(canvas, [np.round(curve).astype(np.int32)], isClosed=False, color=1, thickness=thickness)
    region = canvas.astype(bool)
    colour = np.array((0.94, 0.93, 0.90) if _luminance(image[region]).mean() < 0.5 else (0.05, 0.05, 0.06))  # noqa: PLR2004
    # Per-pixel jitter keeps the scratch from looking like a flat vector drawing.
    jitter = rng.normal(0.0, 0.03, size=(int(region.sum()), 1))
    result = image.copy()
    result[region] = np.clip(0.15 * image[region] + 0.85 * (colour + jitter), 0.0, 1.0)
    return result


def _stain(image: np.ndarray, rng: np.random.Generator, _category: str) -> np.ndarray:
    """A blotch of a foreign colour, strongest in its middle, through which the texture still shows."""
    distance = _blob(rng, image.shape[0], area=(0.01, 0.035), roughness=0.35)
    region = distance < 1.0
    local = image[region].mean(axis=0)
    farthest = np.argsort(-np.linalg.norm(_STAIN_COLOURS - local, axis=1))[:2]
    colour = _STAIN_COLOURS[rng.choice(farthest)]
    # Opacity at least 0.6 even at the rim, so the stain's edge (and its mask) is a visible one.
    alpha = np.clip(0.6 + 0.4 * (1.0 - distance[region]), 0.6, 0.9)[:, None]
    shading = 0.6 + 0.8 * _luminance(image[region])[:, None]
    result = image.copy()
    result[region] = np.clip((1 - alpha) * image[region] + alpha * colour * shading, 0.0, 1.0)
    return result


def _hole(image: np.ndarray, rng: np.random.Generator, _category: str) -> np.ndarray:
    """A dark cavity, deepest in its middle, that replaces the texture completely."""
    distance = _blob(rng, image.shape[0], area=(0.006, 0.025), roughness=0.2)
    region = distance < 1.0
    depth = np.clip(1.0 - distance[region], 0.0, 1.0)[:, None]
    rim = rng.uniform(0.08, 0.14)
    shade = rim * (1.0 - 0.6 * depth) + rng.normal(0.0, 0.008, size=depth.shape)
    result = image.copy()
    result[region] = np.clip(shade * np.array([1.0, 0.95, 0.9]), 0.0, 1.0)
    return result


def _contamination(image: np.ndarray, rng: np.random.Generator, category: str) -> np.ndarray:
    """A patch of another category's texture, like a foreign object lying on the surface."""
    foreign = str(rng.choice(_foreign_sources(category)))
    patch = _clean_crop(foreign, rng, image.shape[0])
    region = _blob(rng, image.shape[0], area=(0.01, 0.035), roughness=0.45) < 1.0
    result = image.copy()
    result[region] = patch[region]
    return result


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator, str], np.ndarray]] = {
    "contamination": _contamination,
    "hole": _hole,
    "scratch": _scratch,
    "stain": _stain,
}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _render_sample(
    category: str,
    split: str,
    label: str,
    index: int,
    image_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample as ``(clean, image, mask)``.

    ``clean`` and ``image`` are uint8 HxWx3 arrays, ``mask`` a bool HxW array that is True exactly
    where ``image`` differs from ``clean`` (all False for ``label == "good"``, where the two are
    equal). Every sample has its own random stream, derived from the seed and the sample's place
    in the data set, so a sample does not change when the number of other samples does.
    """
    # The category's name, not its path: a texture folder gives the same images wherever it lies.
    keys = (seed, zlib.crc32(_category_name(category).encode()), zlib.crc32(f"{split}/{label}".encode()), index)
    rng = np.random.default_rng(np.random.SeedSequence(keys))
    clean_float = _clean_crop(category, rng, image_size)
    clean = _to_uint8(clean_float)
    if label == "good":
        return clean, clean.copy(), np.zeros(clean.shape[:2], dtype=bool)
    # A random draw can land almost entirely outside the image or on pixels it barely changes;
    # redraw (from the same stream, so still deterministic) until the defect has a sensible size.
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        image = _to_uint8(_DEFECTS[label](clean_float, rng, category))
        mask = (image != clean).any(axis=-1)
        if _MIN_DEFECT_AREA <= mask.mean() <= _MAX_DEFECT_AREA:
            return clean, image, mask
    msg = f"Could not draw a '{label}' defect covering {_MIN_DEFECT_AREA:.1%}-{_MAX_DEFECT_AREA:.0%} of the image."
    raise RuntimeError(msg)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def texture_categories(folder: str | Path) -> dict[str, Path]:
    """Category name -> photograph for every image in a texture folder (sorted by name).

    Raises:
        ValueError: If ``folder`` is not a folder, holds no image, or two images share a name.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        msg = f"textures={str(folder)!r} is not a folder; pass a folder of texture photographs ({', '.join(TEXTURE_SUFFIXES)})."
        raise ValueError(msg)
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in TEXTURE_SUFFIXES and path.is_file())
    if not images:
        msg = f"{folder} holds no texture image; put {', '.join(TEXTURE_SUFFIXES)} files in it."
        raise ValueError(msg)
    categories: dict[str, Path] = {}
    for path in images:
        if path.stem in categories:
            msg = f"{categories[path.stem].name} and {path.name} would both be category {path.stem!r}; rename one."
            raise ValueError(msg)
        categories[path.stem] = path
    return categories


def _sources(categories: Sequence[str] | str | None, textures: str | Path | None) -> dict[str, str]:
    """Category name -> source key (demo name or photograph path), checked, in the order asked for."""
    available = (
        {name: name for name in DEMO_CATEGORIES}
        if textures is None
        else {name: str(path) for name, path in texture_categories(textures).items()}
    )
    if categories is None:
        return available
    names = list(dict.fromkeys((categories,) if isinstance(categories, str) else categories))
    where = "demo category" if textures is None else f"texture in {textures}"
    if not names:
        msg = f"categories is empty; pass at least one of {', '.join(available)}."
        raise ValueError(msg)
    for name in names:
        if name not in available:
            msg = f"Unknown {where} {name!r}; choose from {', '.join(available)}."
            raise ValueError(msg)
    return {name: available[name] for name in names}


def _source_settings(source: str) -> dict:
    """What the marker records of a category's source: a photograph by name and content hash."""
    if source in DEMO_CATEGORIES:
        return {}
    return {"texture": Path(source).name, "texture_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest()}


def _checked_int(name: str, value: object, low: int, high: int | None, fix: str) -> int:
    """``value`` as a plain int (NumPy integers welcome, bools not), or a ValueError that says how to fix it."""
    is_integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if is_integer and value >= low and (high is None or value <= high):
        return int(value)
    bounds = f">= {low}" if high is None else f"from {low} to {high}"
    msg = f"{name} must be an integer {bounds}, got {value!r}; {fix}."
    raise ValueError(msg)


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _fresh_sibling(root: Path, prefix: str) -> Path:
    """A new hidden folder in ``root``; unlike tempfile.mkdtemp's 0700, it gets the umask's permissions."""
    path = root / f"{prefix}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _build_category(directory: Path, settings: dict, source: str, progress_bar: tqdm) -> None:
    category = source
    folders = [("train", "good", settings["n_train"]), ("test", "good", settings["n_test_good"])]
    folders += [("test", defect, settings["n_test_per_defect"]) for defect in DEMO_DEFECT_TYPES]
    for split, label, count in folders:
        # Zero-padded to a common width so that anomalib's sorted image and mask lists line up.
        width = max(3, len(str(count - 1)))
        for index in range(count):
            _, image, mask = _render_sample(category, split, label, index, settings["image_size"], settings["seed"])
            _save_png(image, directory / split / label / f"{index:0{width}d}.png")
            if label != "good":
                mask_path = directory / "ground_truth" / label / f"{index:0{width}d}_mask.png"
                _save_png(mask.astype(np.uint8) * 255, mask_path)
            progress_bar.update()
    # Written last: its presence is what marks the category as complete.
    (directory / _MARKER_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def make_demo_dataset(
    root: str | Path,
    categories: Sequence[str] | str | None = None,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 8,
    image_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    textures: str | Path | None = None,
) -> Path:
    """Build the demo data set under ``root`` (one MVTec AD style folder per category).

    Each category is built in a hidden temporary folder next to its final place and renamed into
    place only once complete, so an interrupted or failed build never leaves a partial category
    behind. A category that already holds a complete demo set built with the same arguments is
    kept as it is, which makes repeated calls cheap.

    Args:
        root: Folder that receives one sub-folder per category; created if missing.
        categories: Names from :data:`DEMO_CATEGORIES`, or of images in ``textures`` (file stems); a single
            name may be passed as a string. ``None`` (default): all of them.
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_per_defect: Test images per category and per type in :data:`DEMO_DEFECT_TYPES`.
        image_size: Side of the square images in pixels, from 32 to 512.
        seed: Seed of all random choices; the same arguments give byte-identical files.
        overwrite: Replace ``root/<category>`` folders that already exist, whatever they hold.
        progress: Show a tqdm progress bar.
        textures: A folder of texture photographs to use instead of the scikit-image textures: every
            image (see :data:`TEXTURE_SUFFIXES`) is a category named after its file stem. Photographs must
            be at least ``image_size`` pixels on their shorter side; grey ones are tinted (see module docs).

    Returns:
        The absolute path of ``root``, ready for ``anomalib.data.MVTecAD(root=..., category=...)``.

    Raises:
        ValueError: If an argument is out of range or names an unknown category.
        FileExistsError: If ``overwrite`` is False and ``root/<category>`` exists but is not a
            complete demo set built with the same arguments.
    """
    sources = _sources(categories, textures)
    n_train = _checked_int("n_train", n_train, 1, None, "pass at least one training image")
    n_test_good = _checked_int("n_test_good", n_test_good, 0, None, "pass 0 or more")
    n_test_per_defect = _checked_int("n_test_per_defect", n_test_per_defect, 0, None, "pass 0 or more")
    if textures is None:
        largest, fix = _MAX_IMAGE_SIZE, f"the source textures are {_MAX_IMAGE_SIZE} px, so pick a size in that range"
    else:
        largest = min(min(_texture(source).shape[:2]) for source in sources.values())
        fix = f"the smallest photograph in {textures} is {largest} px on its shorter side"
    image_size = _checked_int("image_size", image_size, _MIN_IMAGE_SIZE, largest, fix)
    seed = _checked_int("seed", seed, 0, None, "pass a non-negative seed such as 0")
    root = Path(root).resolve()

    # Decide everything before building anything, so that a conflict found for the last category
    # does not surface only after the first ones took their time to build.
    pending: list[dict] = []
    for category, source in sources.items():
        settings = {
            "generator": "anomalib_diffusion.data.demo",
            "format_version": _FORMAT_VERSION,
            "category": category,
            "defect_types": list(DEMO_DEFECT_TYPES),
            "n_train": n_train,
            "n_test_good": n_test_good,
            "n_test_per_defect": n_test_per_defect,
            "image_size": image_size,
            "seed": seed,
            **_source_settings(source),
        }
        target = root / category
        if target.exists() and not overwrite:
            existing = _read_marker(target)
            if existing == settings:
                continue
            reason = (
                "is not a complete demo data set" if existing is None else "holds a demo set built with other arguments"
            )
            msg = f"{target} already exists and {reason}; pass overwrite=True to replace it."
            raise FileExistsError(msg)
        pending.append(settings)
    if not pending:
        return root

    root.mkdir(parents=True, exist_ok=True)
    images_per_category = n_train + n_test_good + n_test_per_defect * len(DEMO_DEFECT_TYPES)
    with tqdm(total=images_per_category * len(pending), desc="demo data", unit="img", disable=not progress) as bar:
        for settings in pending:
            category = settings["category"]
            bar.set_postfix_str(category)
            staging = _fresh_sibling(root, f".{category}.partial")
            try:
                _build_category(staging, settings, sources[category], bar)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            target = root / category
            if target.exists() or target.is_symlink():
                # A directory cannot be renamed over a non-empty one: move the old one aside first
                # so that the target path never shows a mix of old and new files.
                retired = _fresh_sibling(root, f".{category}.old")
                target.rename(retired / category)
                staging.rename(target)
                shutil.rmtree(retired)
            else:
                staging.rename(target)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: build the demo data set and print its path."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(make_demo_dataset).parameters.items()}
    integer_options = {
        "n_train": "normal training images per category",
        "n_test_good": "normal test images per category",
        "n_test_per_defect": "test images per category and defect type",
        "image_size": "image side in pixels",
        "seed": "seed of all random choices",
    }
    parser = argparse.ArgumentParser(
        prog="anomalib-diffusion-demo-data",
        description=(
            "Build a small MVTec AD style data set with planted defects, from the textures bundled in "
            "scikit-image or from a folder of texture photographs (--textures)."
        ),
    )
    parser.add_argument("--root", type=Path, default=Path("datasets/demo"), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--textures",
        type=Path,
        default=None,
        help="folder of texture photographs; each image becomes a category named after its file (default: "
        "the scikit-image textures " + ", ".join(DEMO_CATEGORIES) + ")",
    )
    parser.add_argument(
        "--categories",
        nargs="+",
        default=None,
        help="categories to build: demo names, or file stems with --textures (default: all)",
    )
    for name, description in integer_options.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=defaults[name], help=f"{description} (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace category folders that already exist")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        path = make_demo_dataset(
            args.root,
            categories=args.categories,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            textures=args.textures,
            **{name: getattr(args, name) for name in integer_options},
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(path)


if __name__ == "__main__":
    main()
