"""Forward-diffusion helpers shared by the package's models.

The noise schedule is diffusers' :class:`~diffusers.DDPMScheduler`; this module only adds what
anomaly detection needs on top of it: a *fixed, seeded* noise tensor so that inference is
deterministic (and exportable: no random op ends up in the ONNX graph).
"""

import math

import torch
from diffusers import DDPMScheduler
from torch import nn

# Side of the seeded noise tile. Larger images reuse it periodically, so the noise at a pixel
# never depends on which image sizes were seen before (inference stays deterministic).
NOISE_TILE = 256


def make_ddpm_scheduler(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """DDPM schedule of Ho et al. (2020): linear betas from 1e-4 to 0.02 over 1000 steps.

    ``prediction_type`` is what the network predicts (diffusers: ``epsilon``, ``sample`` or ``v_prediction``).
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
    )


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise that depends only on ``shape`` and ``seed`` (generated on CPU)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator)


def noise_at_timestep(
    scheduler: DDPMScheduler,
    samples: torch.Tensor,
    noise: torch.Tensor,
    timestep: int,
) -> torch.Tensor:
    """``x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps`` for one fixed timestep."""
    timesteps = torch.full((samples.shape[0],), timestep, dtype=torch.long, device=samples.device)
    return scheduler.add_noise(samples, noise, timesteps)


class FixedNoise(nn.Module):
    """The fixed inference noise ``eps`` of a model: one seeded tile, repeated to any image size.

    A non-persistent buffer: it is rebuilt from the seed, so checkpoints do not carry it, and an
    exported graph holds it as a constant (no random op in ONNX / OpenVINO).
    """

    def __init__(self, channels: int, seed: int, tile: int = NOISE_TILE) -> None:
        super().__init__()
        self.register_buffer("tile", seeded_noise((1, channels, tile, tile), seed), persistent=False)
        self.tile: torch.Tensor

    def forward(self, height: int, width: int) -> torch.Tensor:
        """``(1, C, height, width)`` noise; equal to the tile wherever both are defined."""
        side = self.tile.shape[-1]
        repeats = (1, 1, math.ceil(height / side), math.ceil(width / side))
        return self.tile.repeat(repeats)[..., :height, :width]


class FixedNoiseDraws(nn.ModuleList):
    """Several fixed noise draws (seeds ``seed``, ``seed + 1``, ...) whose results a model averages.

    One draw of the fixed noise decides where a single reconstruction or noise map happens to deviate on a normal
    image; averaging the maps of several draws lowers that variance, at one more U-Net pass per draw. The draws run
    as one batch, draw-major: :meth:`batch` repeats the samples and stacks the noise, :meth:`average` folds the
    results back.
    """

    def __init__(self, channels: int, seed: int, draws: int = 1) -> None:
        if problem := noise_draws_problem(draws):
            raise ValueError(problem)
        super().__init__(FixedNoise(channels, seed + draw) for draw in range(draws))

    def batch(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> ``(draws * B, C, H, W)`` samples repeated draw-major, and each copy's noise."""
        batch, _, height, width = samples.shape
        noise = torch.cat([draw(height, width).expand(batch, -1, -1, -1) for draw in self])
        return samples.repeat(len(self), 1, 1, 1), noise

    def average(self, results: torch.Tensor) -> torch.Tensor:
        """``(draws * B, ...)`` draw-major -> ``(B, ...)``: the mean over the draws."""
        return results.reshape(len(self), -1, *results.shape[1:]).mean(dim=0)


def noise_draws_problem(noise_draws: object) -> str | None:
    """Why ``noise_draws`` is not a valid number of fixed noise draws, or ``None``."""
    if isinstance(noise_draws, bool) or not isinstance(noise_draws, int) or noise_draws < 1:
        return f"noise_draws={noise_draws!r} must be an integer of at least 1"
    return None
