"""One pass over a model's normal training images, outside the optimisation loop.

Models that fit something on top of their network at the end of training (RADAR's Isolation
Forest, GLAD's calibration) need every training image once, in order, pre-processed exactly as
during inference and without the training-time augmentation.
"""

from collections.abc import Callable, Sequence

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .validation import check_image_batch


def training_images_loader(module: LightningModule, indices: Sequence[int] | None = None) -> DataLoader:
    """An unshuffled loader over the training split of the module's datamodule (or the images at ``indices``)."""
    datamodule = getattr(module.trainer, "datamodule", None)
    dataset = getattr(datamodule, "train_data", None)
    if dataset is None:
        return module.trainer.train_dataloader
    if len(dataset) == 0:
        msg = (
            f"{type(module).__name__} found no training images: the datamodule's training split is empty. "
            "Point it at a folder of normal images (Folder: normal_dir; MVTecAD: <root>/<category>/train/good)."
        )
        raise ValueError(msg)
    collate_fn = getattr(dataset, "collate_fn", None)
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    return DataLoader(
        dataset,
        batch_size=getattr(datamodule, "eval_batch_size", 8),
        shuffle=False,
        num_workers=0,
        collate_fn=collate_fn,
    )


@torch.no_grad()
def collect_training_features(
    module: LightningModule,
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    description: str,
    min_size: int = 1,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Concatenate ``feature_fn(pre_processed_images)`` over every training image (or those at ``indices``)."""
    loader = training_images_loader(module, indices)
    was_training = module.training
    module.eval()
    features = []
    try:
        for batch in tqdm(loader, desc=description, leave=False):
            images = batch.image.to(module.device)
            if module.pre_processor is not None:
                images = module.pre_processor(images)
            check_image_batch(images, type(module).__name__, min_size)
            features.append(feature_fn(images).cpu())
    finally:
        module.train(was_training)
    if not features:
        msg = f"{type(module).__name__} found no training images to fit on; check the datamodule's training split."
        raise ValueError(msg)
    return torch.cat(features)
