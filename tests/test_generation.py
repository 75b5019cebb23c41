
import pytest
from PIL import Image

from hyperreal.errors import HyperrealError
from hyperreal.generation import (GenerationJob, guidance_on_switch, job_from_dict, parameters_text,
                                  parse_parameters, read_jobs, run_job, save_png)
from hyperreal.loading import base_defaults


def test_good_job():
    j = job_from_dict({"prompt": "a red circle", "seed": 3, "steps": 12, "guidance": 4})
    assert j == GenerationJob("a red circle", 3, steps=12, guidance=4.0)


@pytest.mark.parametrize("job, words", [
    ({"seed": 1}, "'prompt' is missing"),
    ({"prompt": "x"}, "'seed' is missing"),
    ({"prompt": "x", "seed": 1, "steps": -3}, "'steps' must be between 1 and"),
    ({"prompt": "x", "seed": 1, "steps": "ten"}, "'steps' must be an integer"),
    ({"prompt": "x", "seed": 1, "guidance": 99}, "'guidance' must be between 0 and 30"),
    ({"prompt": "x", "seed": 1, "width": 65}, "'width' must be a multiple of 8"),
    ({"prompt": "x", "seed": -1}, "'seed' must be between 0"),
    ({"prompt": "x", "seed": True}, "'seed' must be an integer"),
    ({"prompt": "  ", "seed": 1}, "'prompt' is empty"),
    ({"prompt": "x", "seed": 1, "stpes": 3}, "unknown key(s) 'stpes'"),
])
def test_bad_jobs_say_what_is_wrong(job, words):
    with pytest.raises(HyperrealError) as e:
        job_from_dict(job, "jobs.jsonl line 4")
    assert str(e.value).startswith("jobs.jsonl line 4: ") and words in str(e.value)


def test_guidance_with_an_adapter_on():
    tiny = {"guidance": 5.0, "adapter_guidance": 2.0, "steps": 20, "width": 64, "height": 64}
    on = GenerationJob("a sks star", 1, adapters=[{"path": "a.safetensors", "weight": 1.0}])
    assert on.resolved(tiny).guidance == 2.0 and GenerationJob("a star", 1).resolved(tiny).guidance == 5.0
    assert GenerationJob("a", 1, guidance=7.0, adapters=on.adapters).resolved(tiny).guidance == 7.0
    zero = GenerationJob("a", 1, adapters=[{"path": "a.safetensors", "weight": 0.0}])  # at weight 0: off
    assert zero.resolved(tiny).guidance == 5.0
    # the Generate tab follows the switch while the person has left the guidance alone, and keeps their own
    assert guidance_on_switch(tiny, True, 5.0) == 2.0 and guidance_on_switch(tiny, False, 2.0) == 5.0
    assert guidance_on_switch(tiny, True, 6.5) == 6.5 and guidance_on_switch(tiny, False, 6.5) == 6.5
    # a base that names none (SD1.5 from the hub) keeps its one guidance with adapters too
    hub = base_defaults(None)
    assert hub["adapter_guidance"] == hub["guidance"] == 7.5 and guidance_on_switch(hub, True, 7.5) == 7.5


def test_read_jobs_names_the_line(tmp_path):
    f = tmp_path / "jobs.jsonl"
    f.write_text('{"prompt": "a", "seed": 1}\n\n# comment\n{"prompt": "b", "seed": 2\n')
    with pytest.raises(HyperrealError, match="jobs.jsonl line 4: not valid JSON"):
        read_jobs(f)
    f.write_text('{"prompt": "a", "seed": 1}\n\n{"prompt": "b", "seed": 2, "steps": 5}\n')
    assert [j.prompt for j in read_jobs(f)] == ["a", "b"]


def test_parameters_round_trip():
    j = GenerationJob("a red circle\non two lines", 42, "blurry, ugly", 20, 5.5, 64, 64)
    text = parameters_text(j, "tiny", "DPMSolverMultistep")
    assert text.splitlines()[-1].startswith("Steps: 20, Sampler: DPMSolverMultistep, CFG scale: 5.5, Seed: 42, Size: 64x64, Model: tiny")
    d = parse_parameters(text)
    assert d == {"prompt": j.prompt, "negative_prompt": "blurry, ugly", "steps": 20, "guidance": 5.5, "seed": 42,
                 "width": 64, "height": 64, "model": "tiny"}


def test_same_seed_same_image_and_png_chunk(tiny, tmp_path):
    job = GenerationJob("a blue square on the left", 5, steps=8)
    a, params = run_job(tiny, job)
    b, _ = run_job(tiny, job)
    c, _ = run_job(tiny, GenerationJob("a blue square on the left", 6, steps=8))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert a.size == (tiny.defaults["width"], tiny.defaults["height"])
    p = save_png(a, tmp_path / "sub" / "x.png", params)
    with Image.open(p) as im:
        assert im.info["parameters"] == params
    assert [x.name for x in p.parent.iterdir()] == ["x.png"]  # no temp file left


def test_parameters_round_trip_keeps_control_characters():
    # str.splitlines() also splits on these; "Use these settings" must give the prompt back as it was
    odd = "a red\x0bcircle\x0c on\x1cthe\x1dleft\x1e\x85 and\u2028a\u2029square"
    j = GenerationJob(odd, 7, "not\x0bthis", 20, 5.0, 64, 64)
    d = parse_parameters(parameters_text(j, "tiny", "DPMSolverMultistep"))
    assert d["prompt"] == odd and d["negative_prompt"] == "not\x0bthis" and d["seed"] == 7


def test_prompt_over_the_token_limit_is_refused(tiny):
    from hyperreal.errors import HyperrealError

    with pytest.raises(HyperrealError, match="tokens long; this model reads at most 30"):
        run_job(tiny, GenerationJob(" ".join(["a red circle on the left"] * 12), 1, steps=2))
    run_job(tiny, GenerationJob(" ".join(["a red circle"] * 8), 1, steps=2))  # 24 tokens: fine
    # with a bridge on, the extra encoder reads the prompt: a Russian one costs the base's tokenizer 2 tokens a letter
    russian = "фиолетовый круг слева"
    with pytest.raises(HyperrealError, match="tokens long"):
        run_job(tiny, GenerationJob(russian, 1, steps=2))
    image, params = run_job(tiny, GenerationJob(russian, 1, steps=2, bridge={"path": "tiny-bridge", "scale": 1.0}))
    assert image.size == (64, 64) and russian in params
