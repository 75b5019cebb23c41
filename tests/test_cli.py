import json
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import run_cli


def test_models_lists_tiny():
    r = run_cli("models")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    tiny = [row for row in rows if row[0] == "tiny"]
    assert tiny and tiny[0][1] == "base" and tiny[0][2].endswith("embedded/tiny")


def test_generate_jobs_file_is_deterministic(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"prompt": "a red circle", "seed": 1},
        {"prompt": "a blue square on the left", "seed": 2, "steps": 10, "negative_prompt": "green"},
        {"prompt": "a red circle", "seed": 1, "guidance": 1.0},
    ]) + "\n")
    outs = []
    for name in ("a", "b"):
        r = run_cli("generate", "--base", "tiny", "--jobs", jobs, "--out-dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
        outs.append(sorted(p.name for p in (tmp_path / name).iterdir()))
    assert outs[0] == outs[1] == ["0000.png", "0001.png", "0002.png"]
    arr = lambda d, n: np.asarray(Image.open(tmp_path / d / n))
    for n in outs[0]:
        assert np.array_equal(arr("a", n), arr("b", n))
    assert not np.array_equal(arr("a", "0000.png"), arr("a", "0002.png"))  # guidance matters
    params = Image.open(tmp_path / "a" / "0001.png").info["parameters"]
    assert params.startswith("a blue square on the left\nNegative prompt: green\nSteps: 10,")
    assert "Seed: 2" in params and "Model: tiny" in params


def test_bad_job_exits_clean_and_writes_nothing(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a red circle", "seed": 1}\n{"prompt": "a red circle", "seed": 1, "steps": -3}\n')
    r = run_cli("generate", "--base", "tiny", "--jobs", jobs, "--out-dir", tmp_path / "out")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    assert "line 2" in r.stderr and "'steps' must be between 1 and 200, got -3" in r.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_bad_base_is_one_clear_message(tmp_path):
    r = run_cli("generate", "--base", "nobody/no-such-model", "--prompt", "a red circle", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "nobody/no-such-model" in r.stderr and "--base tiny" in r.stderr
    (tmp_path / "notamodel").mkdir()
    r = run_cli("generate", "--base", tmp_path / "notamodel", "--prompt", "a red circle", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "model_index.json" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_single_prompt(tmp_path):
    r = run_cli("generate", "--base", "tiny", "--prompt", "a green triangle", "--seed", "3", "--out", tmp_path / "g.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "g.png").size == (64, 64)


def test_eval_base_json_last_line():
    r = run_cli("eval", "base", "--prompts", "8", "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("one_object_colour_shape", "two_objects_colour_shape", "one_object_position", "seconds_per_image"):
        assert k in figures
    assert figures["prompts_per_set"] == 8


def star_folder(tmp_path, n=2):
    from bench.star import star_dataset

    return star_dataset(tmp_path / "stars", n=n)


def test_zero_learning_rate_or_batch_is_refused_not_replaced(tmp_path):
    data = star_folder(tmp_path)
    for flag, value, words in (("--lr", "0", "learning rate (--lr) must be above 0"),
                               ("--batch-size", "0", "batch size (--batch-size) must be at least 1"),
                               ("--steps", "0", "(--steps) must be at least 1"),
                               ("--lr-schedule", "cosin", "--lr-schedule must be one of constant, cosine, linear")):
        out = tmp_path / f"out{flag}"
        r = run_cli("train", "adapter", "--base", "tiny", "--data", data, "--out", out, "--steps", "2", flag, value)
        assert r.returncode == 2, (flag, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr
        assert not (out / "adapter.safetensors").exists()


def test_prompt_over_the_token_limit_is_refused_and_nothing_is_written(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    long_prompt = " ".join(["a red circle on the left"] * 12)  # the tiny encoder reads 30 tokens
    jobs.write_text(json.dumps({"prompt": "a red circle", "seed": 1}) + "\n"
                    + json.dumps({"prompt": long_prompt, "seed": 2}) + "\n")
    r = run_cli("generate", "--base", "tiny", "--jobs", jobs, "--out-dir", tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "line 2" in r.stderr and "tokens long" in r.stderr and "shorten it" in r.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_a_zip_dataset_is_unpacked_once_into_the_output_folder(tmp_path):
    import shutil
    import tempfile

    data = star_folder(tmp_path)
    archive = Path(shutil.make_archive(str(tmp_path / "stars"), "zip", data.parent, data.name))
    before = set(Path(tempfile.gettempdir()).iterdir())
    out = tmp_path / "out"
    r = run_cli("train", "adapter", "--base", "tiny", "--data", archive, "--out", out, "--steps", "1",
                "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "adapter.safetensors").is_file()
    unpacked = sorted(p.name for p in (out / "data").rglob("*.png"))
    assert unpacked == sorted(p.name for p in data.glob("*.png"))
    # nothing unpacked anywhere else (the old CLI unpacked each zip twice, into temp folders it never removed)
    new = [p for p in set(Path(tempfile.gettempdir()).iterdir()) - before if "zip" in p.name or "hyperreal" in p.name]
    assert new == []
