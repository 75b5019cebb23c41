"""Adapter files in other tools' conventions, on an SD1.5-shaped model (SD1.5's real configs and CLIP vocabulary,
narrow random weights: the same module names and layer counts): kohya's own key list, diffusers' own loader
injecting every layer, DoRA in LyCORIS' convention, other tools' files at the right scale, files for other
architectures refused, and every pair of kinds stacking."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.sd15 import build
from hyperreal.errors import HyperrealError
from hyperreal.generation import GenerationJob, run_job
from hyperreal.methods import adapters as A
from hyperreal.pipelines import generate_images

from .test_adapters import perturb

KOHYA_MODULES = [line for line in (Path(__file__).parent / "data" / "kohya_sd15_lora_modules.txt").read_text()
                 .splitlines() if line and not line.startswith("#")]
PROMPTS = [("a photo of a red car", 1)]


@pytest.fixture()
def sd15():
    return build(narrow=True)  # the same seed every time: two calls give the same base weights


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's states for a prompt and the UNet's prediction on them."""
    ids = pipe.tokenizer(["a photo of a red car"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        return states, pipe.unet(x, torch.tensor([500]), states).sample


def pixels(pipe) -> np.ndarray:
    return A.images_array(generate_images(pipe, PROMPTS, 3, 5.0, height=64, width=64))


def counted(pipe, name: str) -> dict[str, int]:
    """Layers of each component that hold the adapter ``name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {comp: sum(1 for m in getattr(pipe, comp).modules()
                      if isinstance(m, BaseTunerLayer) and name in m._all_available_adapter_names())
            for comp in ("unet", "text_encoder")}


def trained(pipe, kind="lora", **kw):
    spec = A.AdapterSpec(kind=kind, rank=4, alpha=2.0, placement="attention+ff", text_encoder=True, **kw)
    perturb(A.attach(pipe, spec, "mine"), size=0.02)
    return spec


# --- what we write ------------------------------------------------------------------------------------------

def test_kohya_file_has_kohyas_own_keys(sd15, tmp_path):
    """Exactly the 264 modules kohya sd-scripts writes for SD1.5 (text encoder as lora_te_text_model_...)."""
    spec = trained(sd15)
    tensors = load_file(str(A.save_adapter(sd15, "mine", spec, tmp_path)[0]))
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    assert modules == sorted(KOHYA_MODULES)
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(tensors)
        assert tensors[f"{m}.alpha"].dim() == 0 and float(tensors[f"{m}.alpha"]) == 2.0
    # SD1.5's proj_in/proj_out are 1x1 convolutions: 4-D like kohya's
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dim() == 4


@pytest.mark.parametrize("which", ["kohya", "diffusers"])
def test_diffusers_loader_injects_every_layer_and_reproduces_ours(sd15, tmp_path, which):
    """Each file through diffusers' own load_lora_weights (not ours) on a fresh pipeline: every layer injected,
    the text encoder and UNet give our in-memory outputs, and the images match."""
    spec = trained(sd15)
    want_states, want_unet = outputs(sd15)
    want_pixels = pixels(sd15)
    kohya, diffusers_file = A.save_adapter(sd15, "mine", spec, tmp_path)[:2]
    path = kohya if which == "kohya" else diffusers_file
    fresh = build(narrow=True)
    fresh.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    assert counted(fresh, "x") == {"unet": 192, "text_encoder": 72}
    states, unet = outputs(fresh)
    assert torch.allclose(states, want_states, atol=1e-5) and torch.allclose(unet, want_unet, atol=1e-5)
    assert np.abs(pixels(fresh) - want_pixels).max() <= 1


def test_diffusers_file_uses_the_text_encoder_keys_every_release_reads(sd15, tmp_path):
    spec = trained(sd15, kind="dora")
    keys = list(load_file(str(A.save_adapter(sd15, "mine", spec, tmp_path)[1])))
    te = [k for k in keys if k.startswith("text_encoder.")]
    assert te and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te)
    # DoRA magnitudes with ".weight": transformers 5's adapter loading skips them silently otherwise
    assert all(k.endswith("lora_magnitude_vector.weight") for k in te if "magnitude" in k)


def test_dora_file_gives_the_trained_weights_in_lycoris_convention_and_in_diffusers(sd15, tmp_path):
    """dora_scale is PEFT's magnitude along the output axis, shaped (out, 1[, 1, 1]): LyCORIS' formula
    (wd_on_out, written here from its source, not from PEFT) applied to the file gives the trained layers;
    diffusers loads the diffusers file with the text encoder's magnitudes too."""
    spec = trained(sd15, kind="dora")
    want_states, want_unet = outputs(sd15)
    kohya, diffusers_file = A.save_adapter(sd15, "mine", spec, tmp_path)[:2]
    t = load_file(str(kohya))
    checked = 0
    for comp in ("unet", "text_encoder"):
        for name, module in getattr(sd15, comp).named_modules():
            if not hasattr(module, "lora_magnitude_vector") or "mine" not in module.lora_magnitude_vector:
                continue
            key = A.files._kohya_name(A.files.KOHYA_PREFIX[comp], name)
            w = module.get_base_layer().weight.detach()
            up, down, scale = t[f"{key}.lora_up.weight"], t[f"{key}.lora_down.weight"], t[f"{key}.dora_scale"]
            assert scale.shape == (w.shape[0], *[1] * (w.dim() - 1))
            v = w + (float(t[f"{key}.alpha"]) / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            merged = v * (scale / v.reshape(v.shape[0], -1).norm(dim=1).reshape(scale.shape))  # LyCORIS wd_on_out
            x = torch.randn(2, w.shape[1], *([3, 3] if w.dim() == 4 else []))
            with torch.no_grad():
                want = module(x)
            got = (F.conv2d(x, merged, module.get_base_layer().bias) if w.dim() == 4
                   else F.linear(x, merged, module.get_base_layer().bias))
            assert torch.allclose(got, want, atol=1e-5), name
            checked += 1
    assert checked == 264
    fresh = build(narrow=True)
    fresh.load_lora_weights(str(diffusers_file.parent), weight_name=diffusers_file.name, adapter_name="x")
    states, unet = outputs(fresh)
    assert torch.allclose(states, want_states, atol=1e-5) and torch.allclose(unet, want_unet, atol=1e-5)
    assert "AUTOMATIC1111 applies DoRA along the input axis only" in A.describe_file(kohya)["loads_in"]


def test_a_bundled_token_is_named_in_the_header_and_the_diffusers_files_load(sd15, tmp_path):
    spec = trained(sd15)
    A.loaded(sd15)["mine"]["tokens"] = {"sks": torch.randn(64)}
    paths = A.save_adapter(sd15, "mine", spec, tmp_path)
    assert "bundle_emb.sks.string_to_param.*" in load_file(str(paths[0]))
    assert "diffusers' load_lora_weights refuses" in A.describe_file(paths[0])["loads_in"]
    fresh = build(narrow=True)
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):  # as the header says
        fresh.load_lora_weights(str(paths[0].parent), weight_name=paths[0].name)
    fresh.load_lora_weights(str(paths[1].parent), weight_name=paths[1].name, adapter_name="x")
    fresh.load_textual_inversion(load_file(str(paths[2]))["clip_l"], token="sks")
    assert counted(fresh, "x") == {"unet": 192, "text_encoder": 72}


# --- what we read -------------------------------------------------------------------------------------------

def _reference_delta(pipe, module: str, comp: str, up, down, scale) -> torch.Tensor:
    w = getattr(pipe, comp).get_submodule(module).weight
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)


@pytest.mark.parametrize("layout", ["kohya", "kohya-no-text-model", "diffusers-peft", "diffusers-legacy"])
def test_other_tools_loras_load_at_their_scale(sd15, tmp_path, layout):
    """Files as kohya sd-scripts / OneTrainer (kohya keys, alpha != rank), older exporters (no text_model_),
    diffusers' and ai-toolkit's PEFT keys and diffusers' old attention-processor keys write them: the weight
    change each tool means (alpha/rank, or 1 without alpha) is what the loaded model applies."""
    g = torch.Generator().manual_seed(1)
    rank, alpha = 4, 1.0
    targets = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
               ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"),
               ("text_encoder", "encoder.layers.5.self_attn.q_proj"),
               ("text_encoder", "encoder.layers.5.self_attn.k_proj"),
               ("text_encoder", "encoder.layers.5.self_attn.v_proj"),
               ("text_encoder", "encoder.layers.5.self_attn.out_proj")]
    tensors, expected = {}, {}
    for comp, module in targets:
        w = getattr(sd15, comp).get_submodule(module).weight
        down, up = torch.randn(rank, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], rank, generator=g) * 0.1
        if layout.startswith("kohya"):
            name = module if comp == "unet" or layout == "kohya-no-text-model" else "text_model." + module
            key = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)})
            scale = alpha / rank
        elif layout == "diffusers-peft":
            prefix = "unet." if comp == "unet" else "text_encoder.text_model."
            tensors.update({f"{prefix}{module}.lora_A.weight": down, f"{prefix}{module}.lora_B.weight": up})
            scale = 1.0  # no alpha in the file: PEFT's default lora_alpha = rank
        else:  # diffusers' attention processors (before PEFT): unet.<block>.processor.to_q_lora.down.weight
            block, proj = module.rsplit(".", 1)
            key = (f"unet.{block}.processor.{proj}_lora" if comp == "unet"
                   else f"text_encoder.text_model.{module}.lora_linear_layer")  # the patched projections' form
            tensors.update({f"{key}.down.weight": down, f"{key}.up.weight": up})
            scale = 1.0
        expected[(comp, module)] = _reference_delta(sd15, module, comp, up, down, scale)
    path = tmp_path / f"{layout}.safetensors"
    save_file(tensors, path)
    name = A.load_adapter(sd15, str(path))
    A.activate(sd15, {name: 1.0})
    for (comp, module), delta in expected.items():
        layer = getattr(sd15, comp).get_submodule(module)
        x = torch.randn(3, layer.get_base_layer().weight.shape[1])
        with torch.no_grad():
            got = layer(x) - layer.get_base_layer()(x)
        assert torch.allclose(got, F.linear(x, delta), atol=1e-5), (layout, module)


@pytest.mark.parametrize("family, keys", [
    ("FLUX", ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
              "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]),
    ("FLUX", ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
              "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight"]),
    ("SDXL", ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]),
    ("SD3", ["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight",
             "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"]),
    (None, ["unet.no_such_block.to_q.lora_A.weight", "unet.no_such_block.to_q.lora_B.weight"]),
])
def test_a_lora_for_another_model_is_refused_naming_it(sd15, tmp_path, family, keys):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(4, 8) if "down" in k or "lora_A" in k else torch.zeros(8, 4) for k in keys}, path)
    with pytest.raises(HyperrealError, match=f"looks made for {family}" if family else "name no layer of this base"):
        A.load_adapter(sd15, str(path))
    assert not A.loaded(sd15) and not any(counted(sd15, n)["unet"] for n in ("other",))


# --- stacking -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kind_files(tmp_path_factory):
    """One file of each kind (and the diffusers form of a LoRA), each trained in a fresh tiny base."""
    from hyperreal.loading import load_base

    out = {}
    for i, kind in enumerate(A.KINDS):
        base = load_base("tiny")
        spec = A.AdapterSpec(kind=kind, rank=4, placement="attention+ff" if kind == "oft" else "all",
                             text_encoder=kind in ("lora", "loha"))
        perturb(A.attach(base.pipe, spec, kind), seed=i, size=0.02)
        paths = A.save_adapter(base.pipe, kind, spec, tmp_path_factory.mktemp(kind))
        out[kind] = str(paths[0])
        if kind == "lora":
            out["lora-diffusers"] = str(paths[1])
    return out


def test_every_pair_of_kinds_stacks_and_jobs_leave_nothing_behind(kind_files):
    """Any two kinds in one job, in either order, give the same image; a job after another gives what it gives
    on a fresh base; a job without adapters is the base bit for bit (PEFT cannot wrap a LoHa/LoKr/OFT layer in a
    LoRA: jobs put them on in one order)."""
    from hyperreal.loading import load_base

    def image(base, *names):
        job = GenerationJob("a red circle", 3, steps=3, adapters=[{"path": kind_files[n],
                                                                   "weight": 1.0 if n == "oft" else 0.8}
                                                                  for n in names])
        return np.asarray(run_job(base, job)[0], dtype=np.int16)

    base = load_base("tiny")
    plain = image(base)
    alone = {n: image(load_base("tiny"), n) for n in kind_files}
    for a, b in itertools.combinations(kind_files, 2):
        together = image(base, a, b)
        assert np.array_equal(together, image(base, b, a)), (a, b)
        assert all(np.abs(together - other).max() > 1 for other in (alone[a], alone[b], plain)), (a, b)
    for a, b in itertools.permutations(kind_files, 2):
        image(base, a)
        assert np.array_equal(image(base, b), alone[b]), (a, b)
    assert np.array_equal(image(base), plain)
