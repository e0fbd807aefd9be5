"""Diffusion U-Net factory shared by the package's models.

All models use diffusers' :class:`~diffusers.UNet2DModel` (a DDPM noise-prediction U-Net with
sinusoidal timestep embeddings). :class:`UNetConfig` names the few choices that matter on a
CPU budget; attention is placed by feature-map resolution, as in the DDPM paper, rather than
by listing diffusers block names.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import UNet2DModel
from diffusers.models.upsampling import Upsample2D


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a diffusion U-Net.

    Attributes:
        sample_size: Side length of the training inputs (the patch size).
        block_out_channels: Channel width of each resolution level, from the finest.
        attention_resolutions: Feature-map side lengths (at ``sample_size`` input) that get
            self-attention blocks.
        mid_attention: Whether the middle block has self-attention. Its cost grows with the square of
            the number of positions, so a full-image pass over a large image pays most for it.
        layers_per_block: Residual blocks per level.
        in_channels: Channels of the input image.
        out_channels: Channels of the prediction (the noise, for epsilon prediction).
        norm_num_groups: Groups of the GroupNorm layers; must divide every width.
        num_class_embeds: Size of a learned class-embedding table added to the timestep embedding
            (``class_labels`` in the forward call), or ``None`` for an unconditional U-Net.
    """

    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_resolutions: tuple[int, ...] = field(default=(16,))
    layers_per_block: int = 1
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 8
    num_class_embeds: int | None = None
    mid_attention: bool = True

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            msg = "block_out_channels is empty; give one channel width per U-Net level, e.g. [32, 64, 64]."
            raise ValueError(msg)
        bad = [width for width in self.block_out_channels if width % self.norm_num_groups]
        if bad:
            msg = (
                f"U-Net widths {bad} are not divisible by norm_num_groups={self.norm_num_groups}; use multiples of it."
            )
            raise ValueError(msg)

    @property
    def downsampling_factor(self) -> int:
        """How many times the U-Net halves its input; inputs must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)

    def level_resolutions(self) -> list[int]:
        return [self.sample_size // 2**level for level in range(len(self.block_out_channels))]


class ExportableUpsample2D(Upsample2D):
    """diffusers' nearest-neighbour ``Upsample2D`` without its batch-size branches.

    diffusers calls ``.contiguous()`` only when ``batch >= 64`` or the output is huge (a CUDA
    work-around). Under torch.export those Python ``if``s on a dynamic batch size become guards
    that make a dynamic-batch export fail; calling ``.contiguous()`` always computes the same.
    """

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        if self.norm is not None or self.use_conv_transpose or not self.interpolate or self.name != "conv":
            return super().forward(hidden_states, output_size, *args, **kwargs)
        if output_size is None:
            hidden_states = F.interpolate(hidden_states.contiguous(), scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states.contiguous(), size=output_size, mode="nearest")
        return self.conv(hidden_states) if self.use_conv else hidden_states


def build_unet(config: UNetConfig) -> UNet2DModel:
    """Build a diffusers ``UNet2DModel`` from a :class:`UNetConfig` (exportable with a dynamic batch)."""
    attention_levels = [resolution in config.attention_resolutions for resolution in config.level_resolutions()]
    down_blocks = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention_levels)
    up_blocks = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention_levels))
    unet = UNet2DModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=down_blocks,
        up_block_types=up_blocks,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=min(32, config.block_out_channels[-1]),
        num_class_embeds=config.num_class_embeds,
        add_attention=config.mid_attention,
    )
    for module in unet.modules():
        if type(module) is Upsample2D:
            module.__class__ = ExportableUpsample2D
    return unet


def as_int_tuple(values: Sequence[int] | int) -> tuple[int, ...]:
    """Normalise a config value that may come from YAML as an int or a list."""
    if isinstance(values, int):
        return (values,)
    return tuple(int(value) for value in values)
