"""Method 2 (adapters) invariants on the tiny base, CPU only: identity at step 0, a frozen base, moving adapters,
files other tools read, the stalled-training error, generate jobs that do not leak, and the CLI."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperreal import training
from hyperreal.loading import plain
from hyperreal.methods import adapters as A
from hyperreal.pipelines import generate_images
from hyperreal.errors import HyperrealError
from hyperreal.generation import GenerationJob, job_from_dict, parse_parameters, run_job

from tests.conftest import run_cli

PAIRS = [("a red circle", 1), ("a blue square on the left", 2)]
STEPS = 4  # sampling steps: enough to compare images, fast


def unet_out(pipe) -> torch.Tensor:
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = torch.randn(2, pipe.tokenizer.model_max_length, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([999, 400]), cond).sample


def images(pipe) -> np.ndarray:
    return A.images_array(generate_images(pipe, PAIRS, STEPS, 5.0))


def perturb(params, seed=0, size=0.05):
    """Stand-in for training: every adapter weight non-zero, so a wrong key or scale shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * size)


def base_weights_hash(pipe) -> str:
    """Hash of every base weight, with PEFT's wrapping (``.base_layer``) and the adapter tensors taken out."""
    h = hashlib.sha256()
    for comp in ("unet", "text_encoder", "vae"):
        sd = getattr(pipe, comp).state_dict()
        for k in sorted(sd):
            if any(t in k for t in ("lora_", "hada_", "lokr_", "oft_")):
                continue
            h.update(k.replace(".base_layer", "").encode())
            h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --- building ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", A.KINDS)
def test_fresh_adapter_is_the_base(base, kind):
    pipe = base.pipe
    ref_out, ref_img = unet_out(pipe), images(pipe)
    placement = "attention+ff" if kind == "oft" else "all"  # OFT refuses 3x3 convs (see AdapterSpec.check)
    params = A.attach(pipe, A.AdapterSpec(kind=kind, rank=4, placement=placement), "fresh")
    assert params and all(p.dtype == torch.float32 for p in params)
    assert torch.allclose(unet_out(pipe), ref_out, atol=1e-5)
    img = images(pipe)
    if kind in ("lora", "loha", "lokr"):  # the update is an exact zero
        assert np.array_equal(img, ref_img)
    else:  # DoRA renormalises, OFT multiplies by an identity: equal up to float rounding
        assert np.abs(img - ref_img).max() <= 1


def test_scale_reported_per_preset():
    assert A.AdapterSpec(rank=8, preset="kohya-like").scale == pytest.approx(1 / 8)
    assert A.AdapterSpec(rank=8, preset="diffusers-like").scale == pytest.approx(1.0)
    assert A.AdapterSpec(rank=16, alpha=8, rslora=True).scale == pytest.approx(8 / 4)
    assert A.AdapterSpec(kind="oft").scale is None
    with pytest.raises(HyperrealError, match="OFT cannot adapt the ResNet 3x3"):
        A.AdapterSpec(kind="oft", placement="all").check()
    with pytest.raises(HyperrealError, match="--rslora applies to lora and dora"):
        A.AdapterSpec(kind="loha", rslora=True).check()


def test_placements_count_modules(base):
    unet = base.pipe.unet
    att, ff, every = (len(A.target_modules(unet, A.UNET_PLACEMENTS[p])) for p in ("attention", "attention+ff", "all"))
    assert 0 < att < ff < every


# --- training -----------------------------------------------------------------------------------------------

def learner_for(base, stars, tmp_path, kind="lora", **kw):
    """The adapter alone: no trigger token and no prior (test_adapter_defaults.py covers those defaults)."""
    kw = {"trigger": "", "class_images": 0, **kw}
    req = A.TrainRequest(data=str(stars), kind=kind, rank=4, **kw)
    return A.make_learner(base, req, tmp_path, info={"steps": 4})


def test_training_moves_adapter_only(base, stars, tmp_path):
    before = base_weights_hash(base.pipe)
    learner = learner_for(base, stars, tmp_path)
    start = {k: v.detach().clone() for k, v in learner.state().items()}
    paths = training.train(learner, training.TrainConfig(steps=4, batch_size=2, lr=1e-3, log_every=2), tmp_path / "out")
    assert base_weights_hash(base.pipe) == before  # the frozen base, bit for bit
    moved = [k for k, v in learner.state().items() if not torch.equal(v, start[k])]
    assert len(moved) == len(start)
    assert paths[0].name == "adapter.safetensors" and paths[0].is_file()


def test_text_encoder_is_adapted_by_default_except_for_full(base, stars, tmp_path):
    from safetensors import safe_open

    learner = learner_for(base, stars, tmp_path / "lora")
    assert learner.spec.text_encoder and not learner.data.cache_text  # the text encoder learns: nothing cached
    paths = training.train(learner, training.TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=3), tmp_path / "o")
    with safe_open(str(paths[0]), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    from hyperreal.loading import load_base

    off = learner_for(load_base("tiny"), stars, tmp_path / "off", train_text_encoder=False)
    assert not off.spec.text_encoder and off.data.cache_text
    full = learner_for(base, stars, tmp_path / "full", kind="full")  # None resolves to off for the UNet fine-tune
    assert full.data.cache_text
    with pytest.raises(HyperrealError, match="fine-tunes the UNet only"):
        learner_for(base, stars, tmp_path / "full2", kind="full", train_text_encoder=True)


def test_full_fine_tune_leaves_the_shared_base_alone(base, stars, tmp_path):
    before = base_weights_hash(base.pipe)
    learner = learner_for(base, stars, tmp_path, kind="full")
    training.train(learner, training.TrainConfig(steps=2, batch_size=2, lr=1e-4, log_every=1), tmp_path / "out")
    assert base_weights_hash(base.pipe) == before
    assert learner.sample_pipe.unet is not base.pipe.unet


def test_weights_that_do_not_move_stop_training(base, stars, tmp_path):
    from hyperreal.loading import load_base

    learner = learner_for(base, stars, tmp_path)
    perturb(learner.params)  # no exact zeros left: an update of 1e-30 is then below every weight's float step
    with pytest.raises(HyperrealError, match="did not change in 3 steps"):
        training.train(learner, training.TrainConfig(steps=10, batch_size=2, lr=1e-30), tmp_path / "out")
    frozen = learner_for(load_base("tiny"), stars, tmp_path)
    for p in frozen.params:  # a frozen adapter: the optimizer holds it but it never gets a gradient
        p.requires_grad_(False)
    with pytest.raises(HyperrealError, match="no adapter weight receives a gradient"):
        training.train(frozen, training.TrainConfig(steps=10, batch_size=2, lr=1e-3), tmp_path / "out2")
    with pytest.raises(HyperrealError, match=r"learning rate \(--lr\) must be above 0"):
        training.TrainConfig(lr=0.0).check()


def test_batches_are_deterministic_and_use_prior_and_dropout(base, stars, tmp_path):
    req = A.TrainRequest(data=str(stars), class_prompts=["a red circle", "a blue square"], class_images=2,
                         repeats=2, flip=True, caption_dropout=0.5, prior_weight=0.5)
    learner = A.make_learner(base, req, tmp_path)
    data = learner.data
    assert len(data) == 6 and data.flipped is not None
    assert (Path(learner.info["class_folder"]) / "metadata.jsonl").is_file()
    a, b = next(data.batches(6, 3, 1000)), next(data.batches(6, 3, 1000))
    assert all(torch.equal(a[k], b[k]) for k in a)
    seen = torch.cat([next(data.batches(8, s, 1000))["weights"] for s in range(20)])
    assert set(seen.tolist()) == {1.0, 0.5}


def test_class_prompts_and_repeats_default_from_the_captions(base, stars, tmp_path, monkeypatch):
    """A base that lists no prompts it draws well: class images are the captions minus the trigger (DreamBooth's
    class prompt); repeats balance them per epoch."""
    monkeypatch.setitem(base.defaults, "prior_prompts", [])
    req = A.TrainRequest(data=str(stars), trigger="sks", class_images=8, rank=4)
    learner = A.make_learner(base, req, tmp_path)
    folder = Path(learner.info["class_folder"])
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    captions = learner.data.captions  # "a <colour> sks star"
    expected = [c.replace(" sks", "") for c in captions]
    assert [r["text"] for r in rows] == [expected[i % len(expected)] for i in range(8)]
    assert len(captions) == 4 and learner.data.repeats == 2 and learner.info["repeats"] == learner.data.repeats
    alone = A.make_learner(base, A.TrainRequest(data=str(stars), rank=4, name="alone", class_images=0),
                           tmp_path / "alone")
    assert alone.data.repeats == 1 and alone.data.n_instances == len(alone.data)


def test_prior_target_is_the_frozen_base(base, stars, tmp_path):
    """With the "base" target, class examples are scored against the frozen base's own prediction: a fresh adapter
    is the base, so their loss is zero (up to float rounding between batch sizes) while instances still have one."""
    req = A.TrainRequest(data=str(stars), class_prompts=["a red circle", "a blue square"], class_images=2, rank=4)
    learner = A.make_learner(base, req, tmp_path)
    batch = next(learner.batches(6, 0))
    assert batch["is_class"].any() and not batch["is_class"].all()
    only_class = {**batch, "weights": batch["is_class"].float()}
    only_instances = {**batch, "weights": (~batch["is_class"]).float()}
    assert learner.loss(only_class).item() < 1e-10
    assert learner.loss(only_instances).item() > 1e-3
    learner.prior_target = "noise"  # classic DreamBooth: the class images' noise is the target
    assert learner.loss(only_class).item() > 1e-3


# --- files --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, which", [("lora", 0), ("lora", 1), ("dora", 0), ("dora", 1)])
def test_export_round_trip(base, tmp_path, kind, which):
    """kohya file (0) and diffusers folder (1) -> a fresh pipeline -> the in-memory adapted model's outputs."""
    from hyperreal.loading import load_base

    spec = A.AdapterSpec(kind=kind, rank=4, preset="kohya-like", placement="all")
    perturb(A.attach(base.pipe, spec, "mine"))
    want_out, want_img = unet_out(base.pipe), images(base.pipe)
    paths = A.save_adapter(base.pipe, "mine", spec, tmp_path, {"base": "tiny", "steps": 0})
    assert [p.name for p in paths] == ["adapter.safetensors", "pytorch_lora_weights.safetensors"]
    fresh = load_base("tiny").pipe
    if which == 1:  # diffusers reads its own form directly
        fresh.load_lora_weights(str(paths[1].parent), adapter_name="x")
    else:
        name = A.load_adapter(fresh, str(paths[0]))
        A.activate(fresh, {name: 1.0})
    assert torch.allclose(unet_out(fresh), want_out, atol=1e-5)
    assert np.abs(images(fresh) - want_img).max() <= 1


def test_kohya_lora_loads_through_diffusers_without_our_header(base, tmp_path):
    """A kohya file from another tool (no hyperreal metadata) goes through diffusers' kohya-key conversion."""
    from safetensors.torch import load_file, save_file

    from hyperreal.loading import load_base

    spec = A.AdapterSpec(kind="lora", rank=4, alpha=1.0, placement="attention+ff")
    perturb(A.attach(base.pipe, spec, "mine"))
    want = unet_out(base.pipe)
    path = A.save_adapter(base.pipe, "mine", spec, tmp_path)[0]
    tensors = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {1.0}  # as trained, not rank
    save_file(tensors, tmp_path / "external.safetensors")
    fresh = load_base("tiny").pipe
    name = A.load_adapter(fresh, str(tmp_path / "external.safetensors"))
    A.activate(fresh, {name: 1.0})
    assert torch.allclose(unet_out(fresh), want, atol=1e-5)


def test_header_metadata_and_keys(base, tmp_path):
    from safetensors import safe_open

    for kind, key in (("dora", "dora_scale"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1"), ("oft", "oft_")):
        pipe = base.pipe
        A.remove_all(pipe)
        spec = A.AdapterSpec(kind=kind, rank=4, alpha=2.0 if kind != "oft" else None)
        A.attach(pipe, spec, kind)
        path = A.save_adapter(pipe, kind, spec, tmp_path / kind, {"base": "tiny", "steps": 7, "lr": 1e-3})[0]
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert any(key in k for k in keys), (kind, keys[:3])
        assert meta["hyperreal_kind"] == kind and meta["ss_network_dim"] == "4" and meta["ss_max_train_steps"] == "7"
        assert meta["ss_sd_model_name"] == "tiny" and meta["hyperreal_loads_in"] == A.LOADS_IN[kind]
        if kind != "oft":
            assert meta["ss_network_alpha"] == "2" and all(k.startswith("lora_unet_") for k in keys)
        assert A.describe_file(path)["loads_in"] == A.LOADS_IN[kind]


def _lycoris_delta(t: dict, key: str) -> torch.Tensor:
    """What a LyCORIS reader (webui, ComfyUI) computes from the file for one linear module, written from the
    LyCORIS formulas independently of PEFT."""
    alpha = float(t[f"{key}.alpha"])
    if f"{key}.hada_w1_a" in t:
        rank = t[f"{key}.hada_w1_b"].shape[0]
        return (t[f"{key}.hada_w1_a"] @ t[f"{key}.hada_w1_b"]) * (t[f"{key}.hada_w2_a"] @ t[f"{key}.hada_w2_b"]) * alpha / rank
    w1 = t[f"{key}.lokr_w1"] if f"{key}.lokr_w1" in t else t[f"{key}.lokr_w1_a"] @ t[f"{key}.lokr_w1_b"]
    w2 = t[f"{key}.lokr_w2"] if f"{key}.lokr_w2" in t else t[f"{key}.lokr_w2_a"] @ t[f"{key}.lokr_w2_b"]
    rank = (t[f"{key}.lokr_w2_b"].shape[0] if f"{key}.lokr_w2_b" in t
            else t[f"{key}.lokr_w1_b"].shape[0] if f"{key}.lokr_w1_b" in t else None)
    return torch.kron(w1, w2) * (alpha / rank if rank else 1.0)


@pytest.mark.parametrize("kind, rank", [("loha", 4), ("lokr", 8), ("lokr", 2)])
def test_lycoris_files_give_the_trained_update(base, tmp_path, kind, rank):
    """LoKr at rank 8 keeps full factors on the tiny UNet (readers apply no scale: ours is folded into w1),
    at rank 2 it decomposes w2 (readers apply alpha/rank)."""
    from safetensors.torch import load_file

    pipe = base.pipe
    spec = A.AdapterSpec(kind=kind, rank=rank, alpha=1.5, placement="attention")
    perturb(A.attach(pipe, spec, "ly"))
    path = A.save_adapter(pipe, "ly", spec, tmp_path)[0]
    tensors = load_file(str(path))
    checked = 0
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "get_delta_weight") and "ly" in getattr(module, "scaling", {}):
            key = "lora_unet_" + name.replace(".", "_")
            assert torch.allclose(_lycoris_delta(tensors, key), module.get_delta_weight("ly"), atol=1e-6), name
            checked += 1
    assert checked == len(A.target_modules(pipe.unet, A.UNET_PLACEMENTS["attention"]))


@pytest.mark.parametrize("kind", ["loha", "lokr", "oft"])
def test_other_kinds_round_trip_through_hyperreal(base, tmp_path, kind):
    from hyperreal.loading import load_base

    spec = A.AdapterSpec(kind=kind, rank=4, placement="attention+ff" if kind == "oft" else "all", text_encoder=True)
    perturb(A.attach(base.pipe, spec, "k"), size=0.02)
    want = images(base.pipe)
    path = A.save_adapter(base.pipe, "k", spec, tmp_path)[0]
    fresh = load_base("tiny").pipe
    name = A.load_adapter(fresh, str(tmp_path))  # a folder we wrote resolves to its shareable file
    A.activate(fresh, {name: 1.0})
    assert np.abs(images(fresh) - want).max() <= 1
    assert path.is_file()


# --- trigger tokens (pivotal tuning) -------------------------------------------------------------------------

def text_states(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_split_trigger_gets_a_token_that_trains_and_leaves_other_prompts_alone(base, stars, tmp_path):
    """"sks" is s, k, s to the tiny tokenizer: it becomes one new token whose vector trains; prompts without it
    encode exactly as the base's; removing the adapter restores the base's tokenizer and weights bit for bit."""
    tok = base.pipe.tokenizer
    assert A.split_trigger_words(tok, "a sks star") == ["sks"] and A.split_trigger_words(tok, "x") == []
    before, plain_states = base_weights_hash(base.pipe), text_states(base.pipe, "a red circle, tasks")
    base_split = tok.tokenize("a red sks star, tasks")
    learner = learner_for(base, stars, tmp_path, trigger="sks")
    # the token teaches the text side, so by default the text encoder gets no LoRA (its weights stay the base's)
    assert list(learner.tokens) == ["sks"] and not learner.spec.text_encoder and not learner.data.cache_text
    assert tok.tokenize("a red sks star, tasks") == ["a</w>", "red</w>", "sks", "star</w>", ",</w>", "t", "a", "s",
                                                       "k", "s</w>"]  # whole words only: "tasks" is untouched
    start = learner.tokens["sks"].detach().clone()
    paths = training.train(learner, training.TrainConfig(steps=4, batch_size=2, lr=1e-3, log_every=2), tmp_path / "o")
    assert not torch.equal(learner.tokens["sks"].detach(), start)
    assert torch.equal(text_states(base.pipe, "a red circle, tasks"), plain_states)
    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as f:
        meta, vec = f.metadata(), f.get_tensor("bundle_emb.sks.string_to_param.*")
    assert json.loads(meta["hyperreal_trigger_tokens"]) == ["sks"] and torch.equal(vec[0], learner.tokens["sks"].detach())
    assert A.describe_file(paths[0])["trigger_tokens"] == ["sks"]
    A.remove_adapter(base.pipe, learner.name)
    assert tok.tokenize("a red sks star, tasks") == base_split and base_weights_hash(base.pipe) == before
    assert learner_for(base, stars, tmp_path / "off", trigger="sks", trigger_token=False).tokens == {}


@pytest.mark.parametrize("which", ["ours", "diffusers", "external"])
def test_trigger_token_round_trip(base, stars, tmp_path, which):
    """The token travels with the file: ours through load_adapter, diffusers' LoRA + textual inversion files,
    and a kohya file from another tool with the embedding bundled (no hyperreal header)."""
    from safetensors.torch import load_file, save_file

    from hyperreal.loading import load_base

    learner = learner_for(base, stars, tmp_path, trigger="sks", train_text_encoder=False)
    perturb(learner.params, size=0.05)  # the token and every LoRA weight away from their start
    prompts = [("a red sks star", 1), ("a blue sks star on the left", 2)]
    want = A.images_array(generate_images(base.pipe, prompts, STEPS, 5.0))
    paths = learner.save(tmp_path / "files")
    assert [p.name for p in paths] == ["adapter.safetensors", "pytorch_lora_weights.safetensors", "sks_emb.safetensors"]
    fresh = load_base("tiny").pipe
    if which == "diffusers":
        fresh.load_lora_weights(str(paths[1].parent), adapter_name="x")
        fresh.load_textual_inversion(load_file(str(paths[2]))["clip_l"], token="sks")
    else:
        path = paths[0]
        if which == "external":
            path = tmp_path / "external.safetensors"
            save_file(load_file(str(paths[0])), path)  # the tensors alone: no hyperreal header
        A.activate(fresh, {A.load_adapter(fresh, str(path)): 1.0})
    got = A.images_array(generate_images(fresh, prompts, STEPS, 5.0))
    assert np.abs(got - want).max() <= 1


def test_jobs_with_a_trigger_token_do_not_leak(base, stars, tmp_path):
    """A job with the adapter reads "sks" as its token; the next job without adapters reads s, k, s as the base."""
    learner = learner_for(base, stars, tmp_path, trigger="sks", train_text_encoder=False)
    perturb(list(learner.tokens.values()), size=0.5)
    path = learner.save(tmp_path / "files")[0]
    A.remove_adapter(base.pipe, learner.name)
    plain = GenerationJob("a red sks star", 3, steps=STEPS)
    ref, _ = run_job(base, plain)
    adapted, _ = run_job(base, GenerationJob("a red sks star", 3, steps=STEPS, adapters=[{"path": str(path), "weight": 1.0}]))
    assert adapted.tobytes() != ref.tobytes()
    again, _ = run_job(base, plain)
    assert again.tobytes() == ref.tobytes()
    zero, _ = run_job(base, GenerationJob("a red sks star", 3, steps=STEPS, adapters=[{"path": str(path), "weight": 0.0}]))
    assert zero.tobytes() == ref.tobytes()  # weight 0 is off, token and all
    other = tmp_path / "other.safetensors"
    import shutil

    shutil.copy(path, other)
    with pytest.raises(HyperrealError, match="both bring a token for 'sks'"):
        run_job(base, GenerationJob("a red sks star", 3, steps=STEPS, adapters=[{"path": str(path), "weight": 1.0},
                                                                                  {"path": str(other), "weight": 1.0}]))
    again, _ = run_job(base, plain)
    assert again.tobytes() == ref.tobytes()


# --- inference ----------------------------------------------------------------------------------------------

def _lora_file(pipe, folder, seed, name):
    spec = A.AdapterSpec(kind="lora", rank=4, placement="attention+ff")
    perturb(A.attach(pipe, spec, name), seed=seed)
    path = A.save_adapter(pipe, name, spec, folder, file_name=name)[0]
    A.remove_adapter(pipe, name)
    return path


def test_generate_jobs_apply_adapters_without_leaking(base, tmp_path):
    first = _lora_file(base.pipe, tmp_path / "a", 1, "first")
    plain = GenerationJob("a red circle", 3, steps=STEPS)
    ref, _ = run_job(base, plain)
    job = job_from_dict({"prompt": "a red circle", "seed": 3, "steps": STEPS,
                         "adapters": [{"path": str(first), "weight": 1.0}]})
    adapted, params = run_job(base, job)
    # the PNG's parameters carry the adapters, so "send to form" restores them
    assert parse_parameters(params)["adapters"] == [{"path": str(first), "weight": 1.0}]
    # with an adapter on and no guidance set, the base's guidance for adapters; a job's own guidance stays
    assert base.defaults["adapter_guidance"] != base.defaults["guidance"]
    assert parse_parameters(params)["guidance"] == base.defaults["adapter_guidance"]
    assert parse_parameters(run_job(base, plain)[1])["guidance"] == base.defaults["guidance"]
    own = job_from_dict({"prompt": "a red circle", "seed": 3, "steps": STEPS, "guidance": base.defaults["guidance"],
                         "adapters": [{"path": str(first), "weight": 1.0}]})
    assert parse_parameters(run_job(base, own)[1])["guidance"] == base.defaults["guidance"]
    assert adapted.tobytes() != ref.tobytes()
    again, _ = run_job(base, plain)  # the shared pipeline is the base again
    assert again.tobytes() == ref.tobytes()
    zero, _ = run_job(base, GenerationJob("a red circle", 3, steps=STEPS, adapters=[{"path": str(first), "weight": 0.0}]))
    assert zero.tobytes() == ref.tobytes()
    same, _ = run_job(base, job)  # reloaded from the cache: same result
    assert same.tobytes() == adapted.tobytes()


def test_copies_of_the_base_leave_loaded_adapters_behind(base, tmp_path):
    """The shared base keeps job adapters loaded; a ControlNet built from it, or a full fine-tune's copy, must hold
    the base weights alone (the app trains a ControlNet after an adapter job; this failed before)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from hyperreal.methods.controlnet import new_controlnet

    pipe = base.pipe
    clean = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    torch.manual_seed(0)  # the conditioning embedding's first convolutions start random
    ref = new_controlnet(pipe).state_dict()
    run_job(base, job_from_dict({"prompt": "a red circle", "seed": 3, "steps": 2,
                                 "adapters": [{"path": str(_lora_file(pipe, tmp_path, 1, "a")), "weight": 1.0}]}))
    assert any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())  # kept loaded for the next job
    torch.manual_seed(0)
    cn = new_controlnet(pipe).state_dict()
    assert cn.keys() == ref.keys() and all(torch.equal(cn[k], ref[k]) for k in ref)
    copy_ = plain(pipe.unet).state_dict()
    assert copy_.keys() == clean.keys() and all(torch.equal(copy_[k], clean[k]) for k in clean)
    for name in list(A.loaded(pipe)):
        A.remove_adapter(pipe, name)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())  # plain modules again
    assert pipe.unet.state_dict().keys() == clean.keys()


def test_several_adapters_weights_and_fuse(base, tmp_path):
    pipe = base.pipe
    a = A.load_adapter(pipe, str(_lora_file(pipe, tmp_path / "a", 1, "a")))
    b = A.load_adapter(pipe, str(_lora_file(pipe, tmp_path / "b", 2, "b")))
    A.activate(pipe, {a: 1.0})
    only_a = unet_out(pipe)
    A.activate(pipe, {a: 1.0, b: 0.0})
    assert torch.allclose(unet_out(pipe), only_a, atol=1e-6)
    A.activate(pipe, {a: 0.7, b: 0.5})
    mixed = unet_out(pipe)
    assert not torch.allclose(mixed, only_a, atol=1e-4)
    A.fuse(pipe)
    assert torch.allclose(unet_out(pipe), mixed, atol=1e-4)
    A.unfuse(pipe)
    with A.adapters_disabled(pipe):
        off = unet_out(pipe)
    A.remove_all(pipe)
    assert torch.allclose(unet_out(pipe), off, atol=0)


@pytest.mark.parametrize("adapters, words", [
    ("x.safetensors", "'adapters' must be a list"),
    ([{"weight": 1}], "adapters[0] needs a \"path\""),
    ([{"path": "x", "weight": "strong"}], "'weight' must be a number"),
    ([{"path": "x", "scale": 1}], "unknown key(s) 'scale'"),
])
def test_bad_job_adapters(adapters, words):
    with pytest.raises(HyperrealError) as e:
        job_from_dict({"prompt": "a red circle", "seed": 1, "adapters": adapters}, "jobs.jsonl line 2")
    assert str(e.value).startswith("jobs.jsonl line 2: ") and words in str(e.value)


def test_missing_adapter_file_is_a_clear_error(base):
    with pytest.raises(HyperrealError, match="is not a file, a folder, an embedded adapter or a hub id"):
        run_job(base, GenerationJob("a red circle", 1, steps=2, adapters=[{"path": "./nope.safetensors", "weight": 1.0}]))


# --- the CLI ------------------------------------------------------------------------------------------------

def test_cli_train_adapter_writes_its_files(tmp_path, stars):
    out = tmp_path / "out"
    r = run_cli("train", "adapter", "--base", "tiny", "--data", stars, "--out", out, "--steps", 4, "--batch-size", 2,
                "--rank", 4, "--preset", "kohya-like", "--trigger", "sks", "--sample-every", 2,
                "--drift-samples", 2, "--log-every", 2, "--class-images", 8, "--snr-gamma", 5, "--json")
    assert r.returncode == 0, r.stderr
    # prior preservation from the captions without the trigger, balanced by repeats; kohya's header records both
    assert "+ 8 class images (repeats 2)" in r.stdout
    from safetensors import safe_open

    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_reg_images"], meta["ss_num_repeats"], meta["ss_prior_loss_weight"]) == ("8", "2", "15.0")
    assert meta["ss_min_snr_gamma"] == "5.0"
    # no --lr-schedule: the base's recipe (tiny's cosine), in kohya's keys and the summary
    assert (meta["ss_lr_scheduler"], meta["ss_lr_warmup_steps"]) == ("cosine", "0")
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["lr_schedule"] == "cosine"
    assert figures["kind"] == "lora" and figures["scale"] == pytest.approx(0.25) and figures["drift"] >= 0
    assert (out / "adapter.safetensors").is_file() and (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert "loads in:" in r.stdout and "effective scale 0.25" in r.stdout
    # the guidance jobs with it get (the tiny base's for adapters), in the summary and in words
    assert figures["guidance"] == 2.0 and "start at guidance 2 (this base's own is 5)" in r.stdout
    # "sks" is three tokens to the tiny tokenizer: a token of its own, in the file and beside the diffusers LoRA
    assert "trigger word 'sks' is several tokens" in r.stdout and json.loads(meta["hyperreal_trigger_tokens"]) == ["sks"]
    assert "load_textual_inversion" in r.stdout and (out / "diffusers" / "sks_emb.safetensors").is_file()
    assert list((out / "samples").glob("step-000002-*.png"))


def test_cli_bad_dataset_is_one_line(tmp_path):
    r = run_cli("train", "adapter", "--base", "tiny", "--data", tmp_path / "nope", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().count("\n") == 0 and "is not a folder or a .zip" in r.stderr
    (tmp_path / "bare").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(tmp_path / "bare" / "a.png")
    r = run_cli("train", "adapter", "--base", "tiny", "--data", tmp_path / "bare", "--out", tmp_path / "out")
    assert r.returncode == 2 and "--trigger" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "adapter", "--data", tmp_path / "bare", "--out", tmp_path / "out", "--kind", "lorra")
    assert r.returncode == 2 and "--kind must be one of" in r.stderr
