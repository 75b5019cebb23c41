"""How every method draws its training batches: shuffled epochs, caption dropout, noise and timesteps.

All draws come from one ``torch.Generator`` per run, in a fixed order, so a run is reproducible from its seed.
"""
from __future__ import annotations

import torch


class EpochQueue:
    """Indices in shuffled epochs, ``batch_size`` at a time; an epoch may list an index several times
    (kohya's repeats)."""

    def __init__(self, epoch: list[int], generator: torch.Generator):
        self.epoch, self.g = list(epoch), generator
        self.queue: list[int] = []

    def take(self, n: int) -> torch.Tensor:
        while len(self.queue) < n:
            self.queue += [self.epoch[i] for i in torch.randperm(len(self.epoch), generator=self.g).tolist()]
        idx, self.queue = self.queue[:n], self.queue[n:]
        return torch.tensor(idx)


def drop_captions(text: torch.Tensor, p: float, empty: int, g: torch.Generator,
                  among: torch.Tensor | None = None) -> None:
    """Replace caption indices by the empty caption's with probability ``p`` (only where ``among``), in place."""
    if not p:
        return
    hit = torch.rand(len(text), generator=g) < p
    text[hit if among is None else among & hit] = empty


def noise_and_timesteps(latents: torch.Tensor, num_train_timesteps: int, g: torch.Generator) -> dict:
    """The noise and the timesteps of a batch (what :meth:`DenoisingObjective.on_device` reads)."""
    return {"latents": latents, "noise": torch.randn(latents.shape, generator=g),
            "timesteps": torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=g)}
