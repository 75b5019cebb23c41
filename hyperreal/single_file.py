"""Single-file base models: one ``.safetensors`` in the original CompVis/A1111 layout (the SD1.5-family checkpoints
people download for realism: Realistic Vision, epiCRealism, ...), loaded offline through diffusers'
``from_single_file`` with the SD1.5 configs and CLIP tokenizer this package ships (``hyperreal/configs/sd15``);
what a file that is not such a checkpoint looks like, in words; a VAE override; and the checkpoints of a models
folder.

Configs: a file ``NAME.safetensors`` loads with the diffusers pipeline configs in ``NAME.config/`` beside it when
that folder holds a ``model_index.json`` (for SD1-family models of other widths), else with SD1.5's. A
``hyperreal.json`` in that folder sets the base's defaults, as in a diffusers base folder.

Pickled files (.ckpt, .pt, .pth, .bin) are never loaded: unpickling can run code.
"""
from __future__ import annotations

import collections
import collections.abc
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open
from transformers import CLIPTokenizer

from . import sources
from .errors import HyperrealError
from .safety import as_path

SD15_CONFIGS = Path(__file__).resolve().parent / "configs" / "sd15"
PICKLED = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
CONFIG_SUFFIX = ".config"  # NAME.config/ beside NAME.safetensors
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")
CONVERT = ("convert it to .safetensors where you trust the file (torch.load(path, weights_only=True), then "
           "safetensors.torch.save_file) and pass that")
SD1_FAMILY = ("hyperreal adapts Stable Diffusion 1.x-family models (SD1.5 and its fine-tunes such as Realistic "
              "Vision or epiCRealism): pick such a checkpoint")

# --- what a file is -------------------------------------------------------------------------------------------------

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
ADAPTER_MARKS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".lora.down.", ".lora.up.", "_lora.down.",
                 "_lora.up.", "lora_linear_layer.", ".hada_w1", ".hada_w2", ".lokr_w1", ".lokr_w2", ".oft_",
                 ".lora_magnitude_vector")


@dataclass(frozen=True)
class Checkpoint:
    """What a .safetensors file holds: ``kind`` ``sd1`` is a whole SD1.x text-to-image checkpoint (UNet + text
    encoder, usually + VAE) in the original layout; any other kind is refused as a base with ``looks_like``."""

    kind: str  # sd1 | sd1-inpainting | sd2 | sdxl | sd3 | flux | lora | controlnet | vae | embedding | unet | ...
    looks_like: str
    parts: frozenset = field(default_factory=frozenset)  # of unet, vae, text_encoder (original layout)


def _adapter_arch(keys: list[str]) -> str:
    text = " ".join(keys[:4000])
    if "lora_te2_" in text or "text_encoder_2." in text or "input_blocks_4_1_transformer_blocks_9" in text:
        return "an SDXL LoRA"
    if "single_transformer_blocks" in text or "single_blocks" in text or "double_blocks" in text:
        return "a FLUX LoRA"
    if "joint_blocks" in text or "add_q_proj" in text:
        return "an SD3 LoRA"
    if any(k.startswith(("lora_te3_", "text_encoders.")) for k in keys[:4000]):
        return "an SD3 LoRA"
    kind = ("LoHa" if ".hada_w" in text else "LoKr" if ".lokr_w" in text else "OFT" if ".oft_" in text
            else "LoRA")
    return f"a {kind} (an adapter, not a whole model)"


def classify(keys: list[str], meta: dict | None = None, shape=lambda key: None) -> Checkpoint:
    """Names what a checkpoint's tensor names (and a few shapes, through ``shape(key)``) say it is."""
    meta = meta or {}
    ks = set(keys)
    arch = meta.get("modelspec.architecture", "")
    if not keys:
        return Checkpoint("empty", "an empty file (no tensors)")
    if all(k in ("emb_params", "clip_l", "clip_g", "<*>") or k.startswith("string_to_param") for k in keys):
        return Checkpoint("embedding", "a textual-inversion embedding")
    if arch.endswith("/lora") or any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) for k in keys) \
            or any(m in k for k in keys for m in ADAPTER_MARKS):
        return Checkpoint("lora", _adapter_arch(keys))
    if any(k.startswith(("control_model.", "controlnet_", "input_hint_block.", "zero_convs.")) for k in keys):
        xl = "label_emb.0.0.weight" in " ".join(keys) or "add_embedding.linear_1.weight" in ks
        return Checkpoint("controlnet", f"{'an SDXL' if xl else 'a'} ControlNet (it steers a base; it is not one)")
    if any(k.startswith("conditioner.embedders.") for k in keys) or UNET + "label_emb.0.0.weight" in ks:
        refiner = not any(k.startswith("conditioner.embedders.1.") for k in keys) \
            and any(k.startswith("conditioner.embedders.0.model.") for k in keys)
        return Checkpoint("sdxl", f"an SDXL {'refiner' if refiner else 'base'} checkpoint")
    if any(k.startswith((UNET + "joint_blocks.", "joint_blocks.", "text_encoders.")) for k in keys):
        return Checkpoint("sd3", "a Stable Diffusion 3 model")
    if any(k.startswith((UNET + "double_blocks.", "double_blocks.")) for k in keys) \
            or any(k.startswith("single_transformer_blocks.") for k in keys):
        return Checkpoint("flux", "a FLUX model")
    if arch and not arch.startswith("stable-diffusion-v1"):
        return Checkpoint("other", f"a '{arch}' model (its modelspec.architecture)")
    if any(k.startswith(UNET + "input_blocks.") for k in keys):
        to_k = shape(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if any(k.startswith("cond_stage_model.model.") for k in keys) or (to_k and to_k[-1] == 1024):
            return Checkpoint("sd2", "a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder, 1024 wide)")
        parts = {"unet"}
        if any(k.startswith(VAE) for k in keys):
            parts.add("vae")
        if any(k.startswith(CLIP) for k in keys):
            parts.add("text_encoder")
        conv_in = shape(UNET + "input_blocks.0.0.weight")
        channels = conv_in[1] if conv_in and len(conv_in) > 1 else 4
        if channels == 9:
            return Checkpoint("sd1-inpainting", "an SD1.x inpainting checkpoint (9 input channels: it needs a "
                              "masked image)", frozenset(parts))
        if channels == 8:
            return Checkpoint("instruct-pix2pix", "an InstructPix2Pix checkpoint (8 input channels)", frozenset(parts))
        if channels != 4:
            return Checkpoint("other", f"a UNet with {channels} input channels (SD1.x text-to-image has 4)")
        if "text_encoder" not in parts:
            if any(k.startswith("cond_stage_model.transformer.") for k in keys):
                return Checkpoint("sd1-flat-te", "an SD1.x checkpoint whose text-encoder keys lack `text_model.` "
                                  "(written from transformers 5 without the original layout)", frozenset(parts))
            return Checkpoint("unet", "an SD1.x UNet alone (no text encoder: cond_stage_model.* is missing)",
                              frozenset(parts))
        return Checkpoint("sd1", "an SD1.x checkpoint", frozenset(parts))
    if any(k.startswith(VAE) for k in keys) or ("encoder.conv_in.weight" in ks and "decoder.conv_in.weight" in ks):
        return Checkpoint("vae", "a VAE alone")
    if "conv_in.weight" in ks and "time_embedding.linear_1.weight" in ks:
        xl = "add_embedding.linear_1.weight" in ks
        return Checkpoint("unet", f"{'an SDXL' if xl else 'a'} UNet in the diffusers layout (one part of a pipeline "
                          "folder: pass the folder that holds model_index.json)")
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in keys):
        return Checkpoint("text_encoder", "a CLIP text encoder alone")
    named = _diffusers_name(keys, shape)
    return Checkpoint("other", f"a '{named}' model (as diffusers names it)" if named else
                      "none of the model layouts hyperreal knows (no model.diffusion_model.* keys)")


def _diffusers_name(keys, shape) -> str | None:
    """diffusers' own guess (single_file_utils.infer_diffusers_model_type), when it guesses something other than
    its fallback 'v1'."""
    class Shapes(collections.abc.Mapping):
        def __init__(self):
            self.keys_ = set(keys)

        def __getitem__(self, k):
            if k not in self.keys_:
                raise KeyError(k)
            return SimpleNamespace(shape=torch.Size(shape(k) or ()))

        def __iter__(self):
            return iter(self.keys_)

        def __len__(self):
            return len(self.keys_)

    try:
        name = infer_diffusers_model_type(Shapes())
    except Exception:  # its checks index shapes freely; an odd file is just "unknown" here
        return None
    return None if name in (None, "v1") else name


def inspect(path: str | Path) -> Checkpoint:
    """Reads the header only (names, a few shapes), never the tensors."""
    meta, keys = sources.read_header(path)

    def shape(key: str):
        if key not in keys:
            return None
        with safe_open(str(path), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    return classify(keys, meta, shape)


FIXES = {
    "lora": "use it as an adapter on an SD1.5 base (the Adapters tab, or an `adapters` entry of a --jobs line)",
    "controlnet": "use it as a ControlNet with an SD1.5 base (the ControlNet tab, or a job's `controlnet` entry)",
    "vae": "pass it with --vae (HYPERREAL_VAE) and give --base a whole SD1.5 checkpoint",
    "embedding": "give --base a whole SD1.5 checkpoint",
    "sd1-inpainting": "pick the text-to-image version of the checkpoint",
    "sd1-flat-te": "write it again with `cond_stage_model.transformer.text_model.` keys (bench/to_single_file.py "
                   "does), or pass the diffusers folder",
    "unet": "give --base a whole checkpoint (UNet, text encoder and VAE in one file), or a diffusers folder",
}


def refusal(name: str, ck: Checkpoint) -> HyperrealError:
    fix = FIXES.get(ck.kind, SD1_FAMILY)
    return HyperrealError(f"Could not load base model '{name}': it is not a Stable Diffusion 1.x checkpoint, it looks "
                          f"like {ck.looks_like}. Fix: {fix}; or use the embedded model with `--base tiny`.")


def is_checkpoint(path: Path) -> bool:
    try:
        return inspect(path).kind == "sd1"
    except HyperrealError:
        return False


# --- configs --------------------------------------------------------------------------------------------------------

def beside_config(path: str | Path) -> Path | None:
    """``NAME.config/`` beside ``NAME.safetensors`` when it holds a model_index.json."""
    folder = Path(path).with_suffix(CONFIG_SUFFIX)
    return folder if (folder / "model_index.json").is_file() else None


def config_folder(path: str | Path, config: str | Path | None = None) -> Path:
    """The configs a file loads with: ``config`` when given, else ``NAME.config/`` beside it, else SD1.5's."""
    if config is not None:
        folder = as_path(config, "config folder")
    else:
        folder = beside_config(path) or SD15_CONFIGS
    missing = [f for f in CONFIG_FILES if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        raise HyperrealError(f"config folder '{folder}' is not a diffusers pipeline config folder (missing "
                             f"{', '.join(missing) if folder.is_dir() else 'the folder'}): it needs "
                             f"{', '.join(CONFIG_FILES)} and tokenizer/ (vocab.json + merges.txt, or tokenizer.json)")
    return folder


def load_tokenizer(folder: Path):
    """The CLIP tokenizer of a config folder, refused when it would come out empty: transformers 5 builds a
    tokenizer of 2 tokens, without a word, from a folder that lacks its files."""
    tok = folder / "tokenizer"
    has_files = (tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())
    tokenizer = CLIPTokenizer.from_pretrained(str(tok), local_files_only=True) if has_files else None
    vocab = _json(folder / "text_encoder" / "config.json").get("vocab_size", 49408)
    if tokenizer is None or len(tokenizer) < vocab or tokenizer.model_max_length > 10_000:
        raise HyperrealError(f"config folder '{folder}': tokenizer/ holds no usable CLIP tokenizer "
                             f"({len(tokenizer) if tokenizer is not None else 0} tokens, the text encoder has {vocab}); "
                             f"copy vocab.json and merges.txt from {SD15_CONFIGS / 'tokenizer'}")
    return tokenizer


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- loading --------------------------------------------------------------------------------------------------------

def _failure(what: str, name: str, err: Exception, config: Path) -> HyperrealError:
    text = f"{type(err).__name__}: {err}"
    if "size mismatch" in text or "shape" in text.lower():
        cause = f"its tensors do not fit the configs in {config} ({' '.join(str(err).split())[:160]})"
        fix = (f"a model of other widths needs the diffusers configs it was made with, in a folder "
               f"'{Path(name).stem}{CONFIG_SUFFIX}/' beside the file")
    else:
        cause, fix = sources.load_error(what, name, err, hub=False)
        fix = fix or "check that it is a whole SD1.5-family checkpoint in the original (CompVis/A1111) layout"
    return HyperrealError(f"Could not load {what} '{name}': {cause}. Fix: {fix}.")


def check_file(path: Path, shown: str, what: str = "base model") -> None:
    """A path meant as a single file: refused when pickled, missing, or not .safetensors."""
    tiny = "; or use the embedded model with `--base tiny`" if what == "base model" else ""
    if path.suffix.lower() in PICKLED:
        raise HyperrealError(f"Could not load {what} '{shown}': pickled {path.suffix} files are never loaded here "
                             f"(unpickling can run code). Fix: {CONVERT}{tiny}.")
    if not path.is_file():
        raise HyperrealError(f"Could not load {what} '{shown}': no such file. Fix: check the path{tiny}.")
    if path.suffix.lower() != ".safetensors":
        raise HyperrealError(f"Could not load {what} '{shown}': only .safetensors single files are read{tiny}.")


def load_pipeline(path: str | Path, config: str | Path | None = None, vae=None, dtype: torch.dtype = torch.float32,
                  shown: str | None = None):
    """A StableDiffusionPipeline from one SD1.x checkpoint in the original layout, offline. ``config``: the diffusers
    config folder (default :func:`config_folder`); ``vae``: an AutoencoderKL to use instead of the file's."""
    path = Path(path)
    shown = shown or str(path)
    check_file(path, shown)
    ck = inspect(path)
    if ck.kind != "sd1":
        raise refusal(shown, ck)
    folder = config_folder(path, config)
    if vae is None and "vae" not in ck.parts:
        raise HyperrealError(f"Could not load base model '{shown}': the file holds no VAE (first_stage_model.*). "
                             "Fix: pass one with --vae (HYPERREAL_VAE).")
    extra = {"vae": vae} if vae is not None else {}
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, dtype=dtype, tokenizer=load_tokenizer(folder),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra)
    except HyperrealError:
        raise
    except Exception as err:  # every loading failure becomes one actionable sentence
        raise _failure("base model", shown, err, folder) from err


def load_vae(source: str, config_root: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """An AutoencoderKL from a single VAE file in the original layout (``vae-ft-mse-840000-ema-pruned.safetensors``;
    with its config from ``config_root/vae``, SD1.5's by default), a diffusers VAE folder (or a pipeline folder's
    ``vae/``), or a hub id."""
    path = as_path(source, "VAE")
    root = Path(config_root) if config_root and (Path(config_root) / "vae" / "config.json").is_file() else SD15_CONFIGS
    try:
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise HyperrealError(f"Could not load VAE '{source}': the folder has no config.json, so it is not a "
                                     "diffusers VAE folder. Fix: pass a VAE .safetensors file or a diffusers VAE folder.")
            return AutoencoderKL.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, local_files_only=True)
        if not path.exists() and sources.is_hub_id(source) and not source.endswith(PICKLED + (".safetensors",)):
            return sources.with_deadline(lambda: AutoencoderKL.from_pretrained(source, dtype=dtype,
                                                                               use_safetensors=True), "the VAE")
        check_file(path, source, "VAE")
        ck = inspect(path)
        if ck.kind != "vae":
            raise HyperrealError(f"Could not load VAE '{source}': it looks like {ck.looks_like}, not a VAE. Fix: pass "
                                 "a VAE file (encoder.*/decoder.* or first_stage_model.* keys) or folder.")
        return AutoencoderKL.from_single_file(str(path), config=str(root), subfolder="vae", local_files_only=True,
                                              dtype=dtype)
    except HyperrealError:
        raise
    except Exception as err:
        raise _failure("VAE", source, err, root / "vae") from err


# --- the models folder ----------------------------------------------------------------------------------------------

MAX_LISTED = 2000  # files looked at in a models folder
_KNOWN: "collections.OrderedDict[str, bool]" = collections.OrderedDict()  # identity -> is an SD1 checkpoint


def find_checkpoints(folder: str | Path) -> list[Path]:
    """The whole SD1.x checkpoints under ``folder`` (any depth; LoRAs, ControlNets, VAEs and diffusers folders'
    parts are left out by their keys), resolved and inside it. Headers are read once per file version."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    root = folder.resolve()
    out = []
    for i, p in enumerate(sorted(folder.rglob("*.safetensors"))):
        if i >= MAX_LISTED:
            break
        try:
            real = p.resolve()
            if root not in real.parents or not real.is_file():
                continue  # a link out of the models folder
            key = sources.identity(real)
        except OSError:
            continue
        if key not in _KNOWN:
            _KNOWN[key] = is_checkpoint(real)
            while len(_KNOWN) > 4 * MAX_LISTED:
                _KNOWN.popitem(last=False)
        if _KNOWN[key]:
            out.append(p)
    return out
