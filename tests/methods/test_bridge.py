"""Method 1 (extra text encoder) invariants on the tiny base, CPU only: gate/alpha 0 is the exact base, gates get
gradients at 0, frozen weights stay bit-identical, files round-trip, the BART code path, jobs and the CLI."""
import json

import numpy as np
import pytest

from bench.synonyms import DEV_COLOURS, DEV_SHAPES
from hyperreal import services, training
from hyperreal.errors import HyperrealError
from hyperreal.generation import GenerationJob, job_from_dict, run_job
from hyperreal.methods import bridge as B
from hyperreal.shapes import phrasing
from tests.conftest import digest, run_cli

STEPS = 4  # sampling steps: enough to compare images, fast
CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle at the top", "an orange circle"]


@pytest.fixture(scope="module")
def base():
    from hyperreal.loading import load_base

    return load_base("tiny")


def image(base, prompt="a red circle", seed=3, bridge=None):
    job = GenerationJob(prompt, seed, steps=STEPS, bridge=bridge)
    return np.asarray(run_job(base, job)[0], dtype=np.int16)


def fresh(base, mode, tmp_path, name=None, encoder="minilm", residual=True):
    enc = B.get_encoder(base, encoder)
    spec = B.new_spec(base, enc, mode, max_length=16, width=64, layers=1, residual=residual)
    lb = B.LoadedBridge(B.Bridge.create(spec, base.pipe.unet), enc, {"base": base.name})
    return lb, B.save_bridge(lb, tmp_path / f"{name or mode}.safetensors")


def test_zero_gate_and_zero_alpha_are_the_exact_base(base, tmp_path):
    ref = image(base)
    _, fuse = fresh(base, "fuse", tmp_path)
    _, swap = fresh(base, "swap", tmp_path)
    _, plain = fresh(base, "swap", tmp_path, "plain", residual=False)
    _, pooled = fresh(base, "swap", tmp_path, "pooled", encoder="use-multilingual")
    assert np.array_equal(ref, image(base, bridge={"path": str(fuse), "scale": 1.0}))  # fresh gates are 0
    assert np.array_equal(ref, image(base, bridge={"path": str(plain), "scale": 0.0}))  # alpha 0
    assert not np.array_equal(ref, image(base, bridge={"path": str(plain), "scale": 1.0}))  # untrained translator
    # a residual swap bridge adds a zero-initialised correction to the base's condition: the base even at scale 1
    for residual in (swap, pooled):
        assert np.array_equal(ref, image(base, bridge={"path": str(residual), "scale": 1.0}))
    assert np.array_equal(ref, image(base))  # nothing left behind on the shared pipeline
    assert all(not isinstance(p, B.FuseAttnProcessor) for p in base.pipe.unet.attn_processors.values())


def test_gates_get_gradients_at_zero(base, tmp_path):
    req = B.TrainRequest(data="shapes", mode="fuse", max_length=16, width=64)
    (name, learner), = B.make_learners(base, req, tmp_path, services.bridge_data(base, req, scenes=8))
    try:
        assert float(learner.lb.bridge.gates.abs().sum()) == 0.0
        loss = learner.loss(next(learner.batches(4, 0)))
        loss.backward()
        g = learner.lb.bridge.gates.grad
        assert g is not None and float(g.abs().sum()) > 0
    finally:
        learner.close()


def test_fuse_keeps_the_base_where_the_base_reads_the_caption(base, tmp_path):
    """keep_base: where the base encoder reads the caption the target is the frozen base's own prediction, so a
    fresh fuse bridge (gates 0) has exactly zero loss there; where the base reads nothing, the usual target."""
    req = B.TrainRequest(data="shapes", mode="fuse", max_length=16, width=64, base_dropout=0.0, paraphrase=False)
    (_, learner), = B.make_learners(base, req, tmp_path, services.bridge_data(base, req, scenes=8))
    try:
        learner.uncond_dropout = 0.0
        batch = next(learner.batches(4, 0))
        assert all(batch["teach"]) and float(learner.loss(batch)) == 0.0
        learner.keep_base = False
        assert float(learner.loss(next(learner.batches(4, 0)))) > 0.0
    finally:
        learner.close()


def test_fuse_leaves_an_empty_negative_prompt_to_the_base(base, tmp_path):
    """Guidance multiplies any change to the unconditional branch, so with an empty negative prompt fuse's extra path
    adds exactly nothing there (zero tokens); a negative prompt that says something is read like the prompt."""
    from hyperreal.methods.bridge.runtime import conditioning

    lb, _ = fresh(base, "fuse", tmp_path)
    for negative, empty in (("", True), ("a blue square", False)):
        with conditioning(base.pipe, lb, ["a red circle"], [negative]):
            st = next(p.state for p in base.pipe.unet.attn_processors.values() if isinstance(p, B.FuseAttnProcessor))
            assert float(st.tokens.abs().sum()) > 0
            assert (float(st.uncond_tokens.abs().sum()) == 0) == empty
    assert all(not isinstance(p, B.FuseAttnProcessor) for p in base.pipe.unet.attn_processors.values())


@pytest.mark.parametrize("mode", ["fuse", "swap"])
def test_training_moves_only_the_bridge_and_round_trips(base, tmp_path, mode):
    pipe = base.pipe
    enc = B.get_encoder(base, "minilm")
    frozen = digest(pipe.unet, pipe.vae, pipe.text_encoder, enc.model)
    req = B.TrainRequest(data="shapes", mode=mode, encoder="minilm", max_length=16, width=64, layers=1,
                         diffusion_steps=2 if mode == "swap" else 0, name=f"t_{mode}")
    cfg = training.TrainConfig(steps=3, batch_size=4, lr=1e-2, log_every=1)
    events = []
    paths = services.train_bridge(base, req, cfg, tmp_path / mode, on_event=events.append, scenes=16).paths
    assert digest(pipe.unet, pipe.vae, pipe.text_encoder, enc.model) == frozen  # bit-identical
    assert all(not isinstance(p, B.FuseAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert [e.kind for e in events].count("done") == (2 if mode == "swap" else 1)
    path = paths[0]
    meta = B.read_header(path)
    assert meta["spec"]["mode"] == mode and meta["spec"]["encoder"] == "minilm" and meta["spec"]["max_length"] == 16
    assert meta["info"]["base"] == "tiny" and meta["info"]["train_seconds"] > 0
    lb = B.load_bridge(str(path))
    if mode == "fuse":
        assert float(lb.bridge.gates.abs().sum()) > 0  # the gates moved off 0
    # reloading gives the same images as the trained bridge (a new key in the cache: a fresh load)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    a = image(base, "a purple square", 5, {"path": str(path), "scale": 1.0})
    b = image(base, "a purple square", 5, {"path": str(copy), "scale": 1.0})
    assert np.array_equal(a, b)
    assert not np.array_equal(a, image(base, "a purple square", 5))


def test_development_words_never_in_training_phrasings():
    """The benchmark's synonyms/phrasings are never trained on, and neither are the held-out captions."""
    import random

    from hyperreal.shapes.benchmark import held_out_prompts

    rng = random.Random(0)
    texts = " ".join(phrasing.phrase(c, rng) for c in phrasing.shapes_captions() for _ in range(5))
    words = set(texts.replace(",", " ").replace(".", " ").split())
    dev = {w for v in list(DEV_COLOURS.values()) + list(DEV_SHAPES.values()) for s in v for w in s.split()}
    train = {w for v in list(phrasing.TRAIN_COLOURS.values()) + list(phrasing.TRAIN_SHAPES.values())
             for s in v for w in s.split()}
    assert not dev & words and not dev & train
    assert all("please" not in t and "would" not in t
               for t in phrasing.TRAIN_TEMPLATES_ONE + phrasing.TRAIN_TEMPLATES_TWO)
    one, two = held_out_prompts(64, 64)
    assert not {p for p, _ in one + two} & set(phrasing.shapes_captions())


@pytest.mark.parametrize("mode", ["swap", "fuse"])
def test_pooled_sentence_encoder_bridge_trains_round_trips_and_keeps_the_base(base, tmp_path, mode):
    """USE multilingual (one vector per text, numpy) projected to a few tokens: trains, saves, reloads the same."""
    pipe = base.pipe
    frozen = digest(pipe.unet, pipe.vae, pipe.text_encoder)
    req = B.TrainRequest(data="shapes", mode=mode, encoder="use-multilingual", width=64, layers=1, name=mode)
    cfg = training.TrainConfig(steps=3, batch_size=4, lr=1e-2, log_every=1)
    path = services.train_bridge(base, req, cfg, tmp_path, scenes=8).paths[0]
    assert digest(pipe.unet, pipe.vae, pipe.text_encoder) == frozen
    spec = B.read_header(path)["spec"]
    assert (spec["encoder"], spec["encoder_width"], spec["pooled_tokens"]) == ("use-multilingual", 512, 4)
    assert spec["residual"] == (mode == "swap")
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    prompt = "un círculo rojo a la izquierda"
    a = image(base, prompt, 5, {"path": str(path), "scale": 1.0})
    assert np.array_equal(a, image(base, prompt, 5, {"path": str(copy), "scale": 1.0}))
    assert not np.array_equal(a, image(base, prompt, 5))
    with pytest.raises(HyperrealError, match="pooled sentence encoder"):
        lora = B.TrainRequest(data="shapes", mode="swap", encoder="use-multilingual", lora_rank=2)
        B.make_learners(base, lora, tmp_path / "lora", services.bridge_data(base, lora))


def test_residual_swap_learns_to_leave_what_the_base_reads(base):
    """Distillation's batches: the target is always the canonical caption's condition; the base side reads the
    same text, nothing, or letters it cannot read (as for another language)."""
    req = B.TrainRequest(data="shapes", mode="swap", encoder="use-multilingual", width=64, layers=1)
    (_, learner), = B.make_learners(base, req, "/tmp/unused", services.bridge_data(base, req))
    texts, base_texts, target = next(learner.batches(256, 0))
    same = sum(t == b for t, b in zip(texts, base_texts))
    assert 0.35 < same / 256 < 0.65 and "" in base_texts
    odd = [b for t, b in zip(texts, base_texts) if b and b != t]
    assert odd and all(len(b.split()) == len(t.split()) for t, b in zip(texts, base_texts) if b and b != t)
    assert target.shape == (256, 32, 128)


def test_language_prompts_are_never_trained_on():
    """The benchmark's other-language and held-out English prompts share no word with the training phrasings."""
    import random

    from bench import languages as L
    from bench.synonyms import prompt_sets

    rng = random.Random(0)
    train = {w.strip(",.") for c in phrasing.shapes_captions() for _ in range(5)
             for w in phrasing.phrase(c, rng).split()}
    held = {w for v in list(L.HELD_OUT_COLOURS.values()) + list(L.HELD_OUT_SHAPES.values()) for s in v
            for w in s.split()}
    dev = {w for v in list(DEV_COLOURS.values()) + list(DEV_SHAPES.values()) for s in v for w in s.split()}
    assert not held & (train | dev)
    for split in L.SPLITS:
        sets = prompt_sets(split, 16, 16)
        assert set(sets) == {"en", *L.TARGET_LANGUAGES, *L.REPORTED_LANGUAGES}
        for lang in L.LANGUAGES:
            words = {w.strip(",.") for p, _, _ in sets[lang] for w in p.lower().split()}
            # only words spelt the same in English may repeat (French "a", "image", "orange", "triangle"; German "in")
            assert words & train <= {"a", "image", "orange", "triangle", "in"}, (lang, words & train)
    dev = {p for lang in L.LANGUAGES for p, _, _ in L.language_prompts(lang, "dev", 32)}
    held_out = {p for lang in L.LANGUAGES for p, _, _ in L.language_prompts(lang, "held-out", 32)}
    assert not dev & held_out


def test_bart_config_path_builds_trains_saves_reloads(base, tmp_path, bart_folder):
    """A BART with the real facebook/bart-base config (random weights) through the same AutoTokenizer/AutoModel
    folder path, attached to the tiny base by a projection, with LoRA on its attention."""
    folder = bart_folder
    req = B.TrainRequest(data="shapes", mode="fuse", encoder=str(folder), max_length=12, width=64, lora_rank=2,
                         name="bart")
    cfg = training.TrainConfig(steps=1, batch_size=2, lr=1e-2, log_every=1)
    paths = services.train_bridge(base, req, cfg, tmp_path / "o", scenes=4).paths
    meta = B.read_header(paths[0])
    assert meta["spec"]["encoder"] == str(folder) and meta["spec"]["encoder_width"] == 768
    assert meta["spec"]["encoder_states"] == 7  # embeddings + 6 encoder layers, all mixed
    lb = B.load_bridge(str(paths[0]))
    assert B.encoder_lora_state(lb.encoder)  # the encoder LoRA came back
    img = image(base, "a red circle", 1, {"path": str(paths[0]), "scale": 1.0})
    assert img.shape == (64, 64, 3)


def test_job_checks():
    with pytest.raises(HyperrealError, match="not a file"):
        job_from_dict({"prompt": "a red circle", "seed": 1, "bridge": {"path": "nope.safetensors"}}, "jobs line 1")
    with pytest.raises(HyperrealError, match="scale"):
        B.check_job_bridge({"path": "x", "scale": 9}, "job")
    with pytest.raises(HyperrealError, match="unknown key"):
        B.check_job_bridge({"path": "x", "weight": 1}, "job")


def test_cli_train_and_generate_jobs(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "run"
    r = run_cli("train", "bridge", "--base", "tiny", "--mode", "swap", "--data", caps, "--out", out, "--steps", 2,
                "--batch-size", 4, "--width", 64, "--layers", 1, "--max-length", 16, "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    path = out / "bridge.safetensors"
    assert path.is_file() and figures["files"] == [str(path)] and figures["mode"] == "swap"
    assert (out / "summary.json").is_file()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a crimson ball", "seed": 1, "steps": 2,
                                "bridge": {"path": str(path), "scale": 0.5}}) + "\n")
    r = run_cli("generate", "--base", "tiny", "--jobs", jobs, "--out-dir", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img" / "0000.png").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a red circle", "seed": 1, "steps": 2}) + "\n"
                   + json.dumps({"prompt": "a red circle", "seed": 1, "bridge": {"path": str(caps)}}) + "\n")
    r = run_cli("generate", "--base", "tiny", "--jobs", bad, "--out-dir", tmp_path / "bad")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "bad.jsonl line 2" in r.stderr and "bridge" in r.stderr
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.png"))


def test_eval_bridge_reports_each_language_beside_the_base():
    """``eval bridge --json``: per split, English with unseen words and each language, base alone and each
    bridge, the original captions, and the targets judged on held-out."""
    r = run_cli("eval", "bridge", "--base", "tiny", "--bridge", "swap=tiny-bridge", "--synonym-prompts", 2,
                "--language-prompts", 2, "--original-prompts", 2, "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout.strip().splitlines()[-1])
    sets = {"en", "es", "fr", "de", "ru", "ar", "zh", "he"}
    assert f["splits"] == ["dev", "held-out"] and f["judged_on"] == "held-out"
    assert all(set(f["base_accuracy"][s]) == sets and set(f["modes"]["swap"]["accuracy"][s]) == sets
               for s in f["splits"])
    row = f["modes"]["swap"]
    assert row["encoder"] == "use-multilingual" and row["mode"] == "swap" and row["train_seconds"] > 0
    assert set(row["targets_met"]) == {"english_unseen_words>=0.75", "es>=0.60", "fr>=0.60", "de>=0.60",
                                       "ru>=0.60", "original_within_2_points", "train_seconds<=1200"}
