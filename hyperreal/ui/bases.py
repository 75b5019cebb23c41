"""The base model the app serves, and switching it from the page: the base it started with, or one of the whole
SD1.5 ``.safetensors`` checkpoints in the models folder (HYPERREAL_MODELS; the webui's models/Stable-diffusion).
LoRAs, ControlNets and VAEs in that folder are told apart by their keys and left out."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import gradio as gr

from ..errors import HyperrealError
from ..loading import BaseModel, load_base
from ..safety import within
from ..settings import Settings
from ..single_file import find_checkpoints


class CurrentBase:
    """The app's base, switchable from the page. What runs on the base (Generate, the Train panels, the recipes)
    reads :attr:`base` when it runs, so after a switch everything uses the new one; a generation already running
    ends on the base it began with. A switch is refused while a training run holds the base
    (:meth:`training_run`); a run started during a switch waits for the switch to end."""

    def __init__(self, base: BaseModel, settings: Settings, load: Callable[..., BaseModel] = load_base):
        self.base, self.settings, self._load = base, settings, load
        self.startup = base  # what the app was started with; loaded again when switched back to
        self.value = base.name  # the picker's value for the current base
        self._lock = threading.Lock()
        self._runs = 0
        self.listeners: list[Callable[[BaseModel], None]] = []

    def choices(self) -> list[tuple[str, str]]:
        """(label, value): the startup base, then the models folder's checkpoints by their path in it."""
        out = [(f"{self.startup.name} (started with)", self.startup.name)]
        models = self.settings.models.expanduser()
        for path in find_checkpoints(models):
            rel = path.relative_to(models).as_posix()
            if str(path.resolve()) != self.startup.source and rel != self.startup.name:
                out.append((rel, rel))
        return out

    def _resolve(self, value: str) -> tuple[str, str | None]:
        """(source, config folder) of a picker value; a path must stay inside the models folder."""
        if value == self.startup.name:
            return self.startup.source, self.startup.config
        models = self.settings.models.expanduser()
        try:
            path = within(models / value, models, what="base model")
        except HyperrealError:
            raise HyperrealError(f"base model '{value}' is not allowed: pick one of the list (the checkpoints in "
                                 f"the models folder {models}, HYPERREAL_MODELS)") from None
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise HyperrealError(f"base model '{value}' is not a .safetensors checkpoint in the models folder; "
                                 "refresh the list and pick one of it")
        return str(path), None

    @contextlib.contextmanager
    def training_run(self):
        """The base a training run uses, held (no switching) until the run ends."""
        with self._lock:
            self._runs += 1
            base = self.base
        try:
            yield base
        finally:
            with self._lock:
                self._runs -= 1

    def switch(self, value: str) -> BaseModel:
        """Load ``value`` (a :meth:`choices` value) and make it the app's base; the old one is let go."""
        value = (value or "").strip()
        if not value:
            raise HyperrealError("choose a base model first")
        with self._lock:  # one switch at a time; training runs register under this lock
            if self._runs or self.base.training.is_set():
                raise HyperrealError("A training run is using the base model: switch bases when it has finished "
                                     "(or after Stop).")
            if value == self.value:
                return self.base
            source, config = self._resolve(value)
            # the new base loads before the old one goes: a file that fails to load leaves the app as it was
            try:
                new = self._load(source, config=config, vae=self.settings.vae)
            except HyperrealError as e:  # named as the list names it, not by its path on the server
                raise HyperrealError(str(e).replace(source, value)) from None
            if value == self.startup.name:
                new.name = self.startup.name  # "tiny", not the embedded folder it loads from
            self.base, self.value = new, value
        for listener in self.listeners:
            listener(new)
        return new


def holding(current):
    """``current.training_run()`` for a :class:`CurrentBase`; a plain BaseModel is held as it is."""
    return current.training_run() if isinstance(current, CurrentBase) else contextlib.nullcontext(current)


def build_base_picker(current: CurrentBase) -> dict:
    """The row at the top of the page: the base dropdown and its refresh button. ``connect(outputs, values)``
    wires the switch once the tabs exist: ``values(base) -> [value per output]`` after a switch, and returns the
    switch's event (for steps that follow a successful switch)."""
    with gr.Row():
        picker = gr.Dropdown(choices=current.choices(), value=current.value, label="Base model",
                             allow_custom_value=True, scale=4, elem_id="base-model",
                             info="the base it started with, or an SD1.5 .safetensors checkpoint from the models "
                                  "folder (HYPERREAL_MODELS); Generate and training use the one chosen")
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=90)
    refresh.click(lambda: gr.update(choices=current.choices(), value=current.value), None, picker,
                  api_name="list_bases", queue=False)

    def connect(outputs: list, values: Callable[[BaseModel], list]):
        def switch(value):
            try:
                new = current.switch(value)
            except HyperrealError as e:
                raise gr.Error(str(e)) from e
            return [current.value, *values(new)]

        event = picker.input(switch, picker, [picker, *outputs], api_name="switch_base",
                             concurrency_id="switch_base", concurrency_limit=1)
        # a refused or failed switch puts the picker back on the base in use
        event.failure(lambda: gr.update(value=current.value), None, picker, queue=False, api_visibility="private")
        return event

    return {"picker": picker, "refresh": refresh, "connect": connect}
