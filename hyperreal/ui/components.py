"""Gradio inputs that put a visitor's file through our checks before anything decodes it.

Gradio's own image inputs open the file while preprocessing, before an event's function runs, so a damaged or
oversized upload fails there with a message-less error; these hand over the path only after
:func:`hyperreal.images.open_image` has accepted it, and turn its refusal into a message naming the file."""
from __future__ import annotations

import gradio as gr

from ..errors import HyperrealError
from ..images import open_image


class CheckedImage(gr.Image):
    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            try:
                open_image(payload.path, payload.orig_name or "the picture")
            except HyperrealError as e:
                raise gr.Error(str(e)) from None
        return super().preprocess(payload)


class CheckedSketchpad(gr.Sketchpad):
    def preprocess(self, payload):
        for layer in [getattr(payload, "background", None), getattr(payload, "composite", None),
                      *(getattr(payload, "layers", None) or [])]:
            path = getattr(layer, "path", None)
            if path:
                try:
                    open_image(path, "the scribble")
                except HyperrealError as e:
                    raise gr.Error(str(e)) from None
        return super().preprocess(payload)
