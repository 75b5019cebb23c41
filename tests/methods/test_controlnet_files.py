"""ControlNet single files in lllyasviel's layout: the keys A1111/ComfyUI expect, diffusers' own conversion gives back
our state dict, ``from_single_file`` loads them offline, our loader reads every layout, and files that are not SD1.5
ControlNets are named."""
import json

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load_file, save_file

from hyperreal.errors import HyperrealError
from hyperreal.generation import job_from_dict, run_job
from hyperreal.methods import controlnet
from hyperreal.methods.controlnet import files

from bench.controlnet_files import lllyasviel_keys, wb  # the key list from lllyasviel's cldm.py structure

STEPS = 3


def nonzero_zero_convs(cn, seed=1):
    """Zero convolutions start at zero: give them values, so equal outputs mean equal weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.zero_convolutions(cn).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return cn


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """An SD1.5-shaped ControlNet (SD1.5's block structure and names, narrow widths), saved."""
    from bench import sd15

    cn = nonzero_zero_convs(ControlNetModel.from_unet(sd15.build(narrow=True).unet))
    out = tmp_path_factory.mktemp("cn-narrow")
    folder, single = files.save_controlnet(cn, out, {"base": "narrow", "extractor": "canny"}, name="narrow")
    return {"cn": cn, "out": out, "folder": folder, "single": single}


@pytest.fixture(scope="module")
def small(tiny, tmp_path_factory):
    """A ControlNet of the tiny base (3 levels, 1 layer each, a 3-conv-pair embedding for its VAE factor 4), saved."""
    cn = nonzero_zero_convs(controlnet.new_controlnet(tiny.pipe), seed=2)
    out = tmp_path_factory.mktemp("cn-tiny")
    folder, single = files.save_controlnet(cn, out, {"base": "tiny", "extractor": "canny"}, name="small")
    return {"cn": cn, "out": out, "folder": folder, "single": single}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_has_lllyasviel_sd15_keys(narrow, small):
    keys = set(load_file(narrow["single"]))
    # SD1.5's list, less the one skip connection SD1.5 has where its width changes 640 -> 1280 and narrow's does not
    sd15 = lllyasviel_keys([320, 640, 1280, 1280])
    assert len(sd15) == 340 and keys == sd15 - set(wb("control_model.input_blocks.7.0.skip_connection"))
    assert keys == lllyasviel_keys([32, 64, 64, 64])
    for k in ("input_hint_block.0.weight", "zero_convs.0.0.weight", "zero_convs.11.0.bias", "middle_block_out.0.weight",
              "input_blocks.1.1.proj_in.weight", "input_blocks.3.0.op.weight", "middle_block.1.proj_out.bias"):
        assert "control_model." + k in keys
    header = files.read_header(narrow["single"])
    assert header["hyperreal_layout"] == "lllyasviel" and header["hyperreal_kind"] == "controlnet"
    assert "from_single_file" in json.loads(header["hyperreal_loads_in"])["diffusers"]
    tiny_keys = set(load_file(small["single"]))
    assert tiny_keys == lllyasviel_keys([32, 64, 128], layers=1, attention=(True, True, False), hint_inner=4)


@pytest.mark.parametrize("which", ["narrow", "small"])
@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_diffusers_conversion_gives_back_our_state_dict(narrow, small, which, prefix):
    m = {"narrow": narrow, "small": small}[which]
    ours = {k[len("control_model."):] if not prefix else k: v for k, v in load_file(m["single"]).items()}
    back = convert_controlnet_checkpoint(ours, dict(m["cn"].config))
    ref = m["cn"].state_dict()
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)


@pytest.mark.parametrize("which", ["narrow", "small"])
def test_from_single_file_loads_offline_with_the_folder_config(narrow, small, which):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py: HF_HUB_OFFLINE=1 before any import
    m = {"narrow": narrow, "small": small}[which]
    got = ControlNetModel.from_single_file(str(m["single"]), config=str(m["folder"]), local_files_only=True)
    assert same_weights(got, m["cn"])
    # the header alone is enough: its config saved as config.json (the recipe in README.md)
    cfg = m["out"] / "from-header"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.json").write_text(files.read_header(m["single"])["hyperreal_config"])
    got = ControlNetModel.from_single_file(str(m["single"]), config=str(cfg), local_files_only=True)
    assert same_weights(got, m["cn"])


def test_our_loader_reads_every_layout(narrow, small, tiny, tmp_path):
    cn, sd = narrow["cn"], narrow["cn"].state_dict()
    ours = load_file(narrow["single"])
    config = json.dumps(dict(cn.config))
    variants = {
        "old": ({k: v.contiguous() for k, v in sd.items()},  # hyperreal's single files before the lllyasviel layout
                {"format": "pt", "hyperreal_kind": "controlnet", "hyperreal_config": config, "hyperreal_info": "{}"}),
        "prefixed": (ours, None),  # someone else's control_v11p_sd15_*-style file: no header
        "bare": ({k[len("control_model."):]: v for k, v in ours.items()}, None),  # thibaud-style, no prefix
        "v10": ({**ours, "model.diffusion_model.out.2.weight": torch.zeros(1)}, None),  # ControlNet 1.0: UNet too
    }
    for name, (tensors, meta) in variants.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        assert same_weights(controlnet.load_controlnet(str(tmp_path / f"{name}.safetensors")), cn), name
    raw = narrow["folder"] / "diffusion_pytorch_model.safetensors"  # a diffusers folder's weights, named directly
    for src in (narrow["single"], narrow["folder"], narrow["out"], raw):
        assert same_weights(controlnet.load_controlnet(str(src)), cn), src
    # a headerless file of the tiny base reads with the base's config (heads, norms: not in the weights)
    tcn, tours = small["cn"], load_file(small["single"])
    save_file(tours, str(tmp_path / "tiny.safetensors"))
    got = controlnet.load_controlnet(str(tmp_path / "tiny.safetensors"), unet_config=tiny.pipe.unet.config)
    assert same_weights(got, tcn) and got.config.attention_head_dim == tcn.config.attention_head_dim
    # a short embedding numbered as a Sequential (conv_out right after its last conv, as ComfyUI converts it)
    seq = {k.replace("input_hint_block.14.", "input_hint_block.10."): v for k, v in tours.items()}
    save_file(seq, str(tmp_path / "seq.safetensors"))
    assert same_weights(controlnet.load_controlnet(str(tmp_path / "seq.safetensors"),
                                                   unet_config=tiny.pipe.unet.config), tcn)
    with pytest.raises(HyperrealError, match="made for another base"):  # narrow's weights, the tiny base's config
        controlnet.load_controlnet(str(tmp_path / "prefixed.safetensors"), unet_config=tiny.pipe.unet.config)


def test_image_with_the_file_equals_the_image_with_the_folder(tiny, small, tmp_path):
    from hyperreal.shapes.world import render_caption

    edges = tmp_path / "edges.png"
    controlnet.condition_map("canny", render_caption("a red square on the left", seed=3), 64, 64).save(edges)
    job = {"prompt": "a red square on the left", "seed": 5, "steps": STEPS}
    images = {}
    for name, path in (("folder", small["folder"]), ("file", small["single"])):
        images[name], params = run_job(tiny, job_from_dict({**job, "controlnet": [{"path": str(path),
                                                                                   "image": str(edges)}]}))
    plain, _ = run_job(tiny, job_from_dict(job))
    px = {k: np.asarray(v.convert("RGB"), dtype=np.int16) for k, v in {**images, "plain": plain}.items()}
    assert np.array_equal(px["file"], px["folder"])
    assert np.abs(px["file"] - px["plain"]).max() > 0  # the ControlNet did something


def fake(tmp_path, name, shapes, meta=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=meta)
    return str(path)


@pytest.mark.parametrize("name,shapes,meta,words", [
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 320],
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": [320, 4]}, None, "a LoRA"),
    ("ours-lora", {"x.weight": [1]}, {"hyperreal_kind": "lora"}, "a hyperreal lora file"),
    ("full", {"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
              "first_stage_model.encoder.conv_in.weight": [128, 3, 3, 3]}, None, "full Stable Diffusion checkpoint"),
    ("unet", {"conv_in.weight": [320, 4, 3, 3], "up_blocks.0.resnets.0.conv1.weight": [1, 1, 3, 3]}, None,
     "a diffusers UNet"),
    ("sdxl", {"control_model.input_hint_block.0.weight": [16, 3, 3, 3], "control_model.zero_convs.0.0.weight": [1],
              "control_model.label_emb.0.0.weight": [1280, 2816]}, None, "SDXL ControlNet"),
    ("sdxl-diffusers", {"controlnet_cond_embedding.conv_in.weight": [16, 3, 3, 3],
                        "add_embedding.linear_1.weight": [1280, 2816]}, None, "SDXL ControlNet"),
    ("sd21", {"control_model.input_hint_block.0.weight": [16, 3, 3, 3], "control_model.zero_convs.0.0.weight": [1],
              "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024]}, None,
     "an SD2.x ControlNet"),
    ("junk", {"a.b": [2]}, None, "an unknown model"),
])
def test_files_that_are_not_sd15_controlnets_are_named(tmp_path, name, shapes, meta, words):
    path = fake(tmp_path, name, shapes, meta)
    with pytest.raises(HyperrealError) as e:
        controlnet.load_controlnet(path)
    assert words in str(e.value) and name in str(e.value)


def test_model_card_says_how_to_load_it(narrow):
    card = (narrow["out"] / "README.md").read_text()
    assert 'ControlNetModel.from_single_file("narrow.safetensors", config="controlnet", local_files_only=True)' in card
    assert "Not meant for them" in card  # narrow widths: not for A1111/ComfyUI
    meta = json.loads((narrow["out"] / "controlnet.json").read_text())
    assert meta["layout"] == "lllyasviel" and "narrow.safetensors" in meta["loads_in"]
    line = files.loads_in_line(narrow["single"])  # "wrote PATH (loads in: ...)"
    assert "from_single_file" in line and "AUTOMATIC1111" not in line
    assert "from_pretrained" in files.loads_in_line(narrow["folder"])
    from hyperreal.loading import SD15_CONFIGS

    sd = json.loads((SD15_CONFIGS / "unet" / "config.json").read_text())
    sd_cn = files._cn_config(sd) | {"conditioning_embedding_out_channels": [16, 32, 96, 256]}
    assert files.fits_a1111_comfyui(sd_cn) and not files.fits_a1111_comfyui(dict(narrow["cn"].config))
    for extractor, params, a1111, comfy in (("canny", {}, "`canny`", "'Canny'"),
                                            ("softedge", {"model": "pidinet"}, "softedge_pidinet", "PiDiNet"),
                                            ("pose", {}, "openpose", "OpenPose")):
        card = files.model_card("mine.safetensors", sd_cn, "lllyasviel",
                                {"extractor": extractor, "extractor_params": params})
        assert "models/ControlNet" in card and "models/controlnet" in card and "Load ControlNet Model" in card
        assert a1111 in card and comfy in card
