"""Split one MVTec AD-layout category into N site folders, as if N factories each held part of it.

Each site gets a disjoint share of the normal training and test images and a disjoint subset of the
defect types (its own ``test/<type>`` and ``ground_truth/<type>`` folders), so a site never sees the
defect types of another. Used by the federated simulation and its benchmark; real sites simply
point their client at their own folder.
"""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Site:
    """One site's data folder (MVTec AD layout, same category name) and the defect types it holds."""

    name: str
    root: Path
    defect_types: tuple[str, ...]


def defect_types_in(category_root: Path) -> list[str]:
    """Defect type folders of an MVTec AD-layout category (``test/*`` except ``good``)."""
    test = category_root / "test"
    if not test.is_dir():
        msg = f"{category_root} has no test/ folder; expected the MVTec AD layout (<category>/train/good, <category>/test/<type>)."
        raise FileNotFoundError(msg)
    return sorted(path.name for path in test.iterdir() if path.is_dir() and path.name != "good")


def split_into_sites(
    root: Path | str, category: str, sites: int, output: Path | str, seed: int = 0, detector_site: bool = False
) -> list[Site]:
    """Write ``sites`` site folders under ``output`` (``site_0``, ...) and describe them.

    Defect types are dealt round-robin (site ``i`` gets types ``i, i + sites, ...``); normal images
    are shuffled with ``seed`` and dealt the same way. With ``detector_site``, one more folder
    (``site_<sites>``, last) gets a share of the normal images and no defect at all: the site of the
    dislocated set-up that trains the detector. The folders are built in a temporary folder and moved
    into place, so an interrupted split leaves nothing half-written.
    """
    category_root = Path(root) / category
    if not (category_root / "train" / "good").is_dir():
        msg = f"{category_root / 'train' / 'good'} does not exist; point root/category at an MVTec AD-layout data set."
        raise FileNotFoundError(msg)
    types = defect_types_in(category_root)
    if sites < 1 or sites > len(types):
        msg = (
            f"Cannot give {sites} sites disjoint defect types: {category} has {len(types)} ({', '.join(types)}). "
            f"Use 1 to {len(types)} sites."
        )
        raise ValueError(msg)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        msg = f"{output} already exists and is not empty; choose a new folder for the site data."
        raise FileExistsError(msg)
    rng = np.random.default_rng(seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sites-", dir=output.parent))
    try:
        described = []
        for index in range(sites):
            site_types = tuple(types[index::sites])
            described.append(Site(f"site_{index}", output / f"site_{index}", site_types))
        if detector_site:
            described.append(Site(f"site_{sites}", output / f"site_{sites}", ()))
        for split in ("train/good", "test/good"):
            images = _images(category_root / split)
            order = rng.permutation(len(images))
            for index, site in enumerate(described):
                _copy([images[i] for i in order[index :: len(described)]], staging / site.name / category / split)
        for site in described:
            for defect_type in site.defect_types:
                _copy(
                    _images(category_root / "test" / defect_type), staging / site.name / category / "test" / defect_type
                )
                masks = category_root / "ground_truth" / defect_type
                if masks.is_dir():
                    _copy(_images(masks), staging / site.name / category / "ground_truth" / defect_type)
        output.mkdir(exist_ok=True)
        for site in described:
            (staging / site.name).replace(site.root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return described


def _images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def _copy(paths: list[Path], destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy2(path, destination / path.name)
