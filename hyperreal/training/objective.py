"""What every method's loss shares: noisy latents at random timesteps and the target the UNet must predict."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ..errors import HyperrealError


class DenoisingObjective:
    """The noise schedule is a DDPM copy of the base's inference scheduler config (same betas, same prediction
    type), so training teaches exactly what sampling asks. Built once per learner; an unknown prediction type is
    an error here, before any step runs, not a silently wrong target.
    """

    TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(self, scheduler_config):
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in self.TYPES:
            raise HyperrealError(f"the base's scheduler predicts '{self.prediction_type}', which training here does "
                                 f"not handle ({', '.join(self.TYPES)})")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def on_device(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, noise, timesteps, noisy latents) of a batch from :func:`sampling.noise_and_timesteps`."""
        latents, noise, t = batch["latents"].to(device), batch["noise"].to(device), batch["timesteps"].to(device)
        return latents, noise, t, self.noisy(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """In float32, whatever the latents' dtype: the loss is taken in full precision."""
        latents, noise = latents.float(), noise.float()
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        return latents if self.prediction_type == "sample" else noise

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights per example (Hang et al. 2023; diffusers' ``--snr_gamma``, kohya's
        ``min_snr_gamma``), in the parameterisation this objective trains."""
        snr = compute_snr(self.scheduler, t)
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr if self.prediction_type == "epsilon" else clipped

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error in float32; with ``weights``, each example's mean weighted (prior preservation)."""
        if weights is None:
            return F.mse_loss(pred.float(), target)
        per_example = F.mse_loss(pred.float(), target, reduction="none").mean(dim=tuple(range(1, pred.dim())))
        return (per_example * weights.to(per_example.device)).mean()
