"""App settings from the command line and environment variables (for Hugging Face Spaces)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Settings:
    base: str | None = None  # None: HYPERREAL_BASE or auto
    vae: str | None = None  # a VAE used instead of the base's (file, diffusers folder or hub id); every base gets it
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    outputs: Path = Path("outputs")
    # the only local folder a person may name models from (besides outputs); its SD1.5 .safetensors checkpoints are
    # the bases the page can switch to
    models: Path = Path("models")
    max_file_size: str = "50mb"

    @classmethod
    def from_env(cls) -> "Settings":
        on_spaces = bool(os.environ.get("SPACE_ID") or os.environ.get("SYSTEM") == "spaces")
        return cls(
            base=os.environ.get("HYPERREAL_BASE") or None,
            vae=os.environ.get("HYPERREAL_VAE") or None,
            host=os.environ.get("HYPERREAL_HOST") or os.environ.get("GRADIO_SERVER_NAME")
            or ("0.0.0.0" if on_spaces else "127.0.0.1"),
            port=int(os.environ.get("HYPERREAL_PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860),
            share=os.environ.get("HYPERREAL_SHARE", "") in ("1", "true", "yes"),
            outputs=Path(os.environ.get("HYPERREAL_OUTPUTS") or "outputs").resolve(),
            models=Path(os.environ.get("HYPERREAL_MODELS") or "models").resolve(),
            max_file_size=os.environ.get("HYPERREAL_MAX_FILE_SIZE") or "50mb",
        )
