"""What both front ends get from the service layer: per-base recipes fitted to the card, and what a visitor may pick."""
import pytest

from hyperreal import services
from hyperreal.errors import HyperrealError
from hyperreal.loading import HUB_DEFAULTS, BaseModel, base_defaults
from hyperreal.settings import Settings
from hyperreal.training import memory
from hyperreal.ui.library import Library


def sd15_like():
    return BaseModel(name="stable-diffusion-v1-5/stable-diffusion-v1-5", source="hub", pipe=None,
                     defaults=base_defaults(None))


def test_recipes_come_from_the_base(tiny):
    t = services.train_settings(tiny, "adapter", "lora")
    assert ((t["steps"], t["batch_size"], t["lr"], t["lr_schedule"], t["prior_weight"])  # tiny's hyperreal.json
            == (1200, 8, 4e-3, "cosine", 15.0))
    assert services.train_settings(tiny, "adapter", "full")["lr"] == 1e-4
    assert services.train_settings(tiny, "bridge", "swap")["batch_size"] == 64
    sd = HUB_DEFAULTS["adapter_train"]
    assert (sd["lr"], sd["prior_weight"]) == (1e-4, 1.0)  # diffusers' SD1.5 DreamBooth-LoRA recipe
    assert not t["gradient_checkpointing"] and t["vram"] is None  # the CPU gets no preset


def test_vram_presets_fit_the_card(monkeypatch):
    base = sd15_like()
    monkeypatch.setattr(type(base), "device", property(lambda self: "cuda"))
    small = services.train_settings(base, "controlnet", None, vram="8")
    assert small["batch_size"] == 1 and small["gradient_checkpointing"] and small["use_8bit_adam"]
    big = services.train_settings(base, "controlnet", None, vram="24")
    assert big["batch_size"] == 4 and not big["use_8bit_adam"]  # never above the recipe's batch
    monkeypatch.setattr(memory, "card_gb", lambda device=None: 11.6)  # what a 12 GB card reports
    assert services.train_settings(base, "adapter", "lora", vram="auto")["vram"] == 12
    with pytest.raises(HyperrealError, match="--vram must be"):
        services.train_settings(base, "adapter", "lora", vram="10")


def test_out_of_memory_names_the_next_smaller_preset(monkeypatch):
    monkeypatch.setattr(memory, "card_gb", lambda device=None: 15.8)
    text = str(memory.out_of_memory("controlnet", 2, True))
    assert "--vram 12" in text and "batch 1" in text and "8-bit Adam" in text and "16 GB card" in text


def test_pickers_offer_only_what_was_made_for_this_base(tmp_path):
    settings = Settings(outputs=tmp_path / "out", models=tmp_path / "models")
    on_tiny = [v for _, v in Library(settings, "tiny").choices("controlnet")]
    on_sd = [v for _, v in Library(settings, "stable-diffusion-v1-5/stable-diffusion-v1-5").choices("controlnet")]
    assert "tiny-canny" in on_tiny and "tiny-canny" not in on_sd
    assert not [v for _, v in Library(settings, "my-sd").choices("bridge")]
