"""One way to call a text-to-image pipeline with seeds, which every method and benchmark uses.

A :class:`PipelineCall` is a pipeline and the keyword arguments it will be called with. A method changes a call
(swaps the pipeline, adds arguments, installs attention processors) inside a context manager that undoes its change
on exit, so one shared base pipeline serves every job. Noise comes from CPU generators, one per image, so a seed
gives the same image on any device and in any batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch


@dataclass
class PipelineCall:
    """What one generation calls: a pipeline and its keyword arguments; methods edit both."""

    pipe: object
    kwargs: dict

    def run(self) -> list:
        with torch.inference_mode():
            return self.pipe(**self.kwargs).images

    @contextlib.contextmanager
    def changed(self, pipe=None, drop: tuple[str, ...] = (), **kwargs):
        """This call with another pipeline, arguments taken out (``drop``) or set, until the block ends."""
        old_pipe, old = self.pipe, dict(self.kwargs)
        self.pipe = old_pipe if pipe is None else pipe
        for k in drop:
            self.kwargs.pop(k, None)
        self.kwargs.update(kwargs)
        try:
            yield self
        finally:
            self.pipe = old_pipe
            self.kwargs.clear()
            self.kwargs.update(old)


def seeded(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


# edit(call, first, last) -> a context manager that changes ``call`` for the images first..last-1
Edit = Callable[[PipelineCall, int, int], ContextManager]


@torch.no_grad()
def generate_images(pipe, pairs: list[tuple[str, int]], steps: int, guidance: float, batch: int = 16,
                    negative_prompt: str | None = None, edit: Edit | None = None, **extra) -> list:
    """PIL images for (prompt, seed) pairs, ``batch`` at a time; ``edit`` lets a method change each call."""
    images = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        call = PipelineCall(pipe, dict(prompt=[p for p, _ in chunk], num_inference_steps=steps,
                                       guidance_scale=guidance, generator=seeded([s for _, s in chunk]),
                                       negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                                       output_type="pil", **extra))
        with edit(call, i, i + len(chunk)) if edit else contextlib.nullcontext():
            images.extend(call.pipe(**call.kwargs).images)
    return images


@dataclass(frozen=True)
class JobKey:
    """A method's key in generation jobs (``"adapters"``, ``"bridge"``, ``"controlnet"``).

    ``check(value, where)`` returns the value normalised or raises a HyperrealError saying what is wrong;
    ``apply(base, value, call)`` is a context manager that changes ``call`` for one job and undoes it on exit.
    ``always``: applied even to jobs without the key (adapters: to switch off what an earlier job left loaded).
    ``prepare(base, value)``: what can happen before the job takes the base's lock (fetching and loading files, with
    a deadline), returning the value ``apply`` then gets; a slow hub then holds up no other job.
    """

    name: str
    check: Callable[[object, str], object]
    apply: Callable[[object, object, PipelineCall], ContextManager]
    always: bool = False
    prepare: Callable[[object, object], object] = lambda base, value: value  # noqa: E731 (nothing to prepare)
