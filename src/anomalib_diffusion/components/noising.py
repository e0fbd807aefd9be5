"""Forward-diffusion helpers shared by the package's models.

The noise schedule is diffusers' :class:`~diffusers.DDPMScheduler`; this module only adds what
anomaly detection needs on top of it: a *fixed, seeded* noise tensor so that inference is
deterministic (and exportable: no random op ends up in the ONNX graph).
"""

import torch
from diffusers import DDPMScheduler


def make_ddpm_scheduler(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
) -> DDPMScheduler:
    """DDPM schedule of Ho et al. (2020): linear betas from 1e-4 to 0.02 over 1000 steps."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
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
