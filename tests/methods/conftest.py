"""Fixtures the method tests share."""
import pytest
import torch

from bench.star import star_dataset
from hyperreal.loading import load_base


@pytest.fixture()
def base():
    """A fresh base per test: adapters attached here never reach the session-wide ``tiny`` fixture."""
    return load_base("tiny")


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    """Four rendered stars captioned "a <colour> sks star"."""
    return star_dataset(tmp_path_factory.mktemp("stars"), n=4)


@pytest.fixture(scope="session")
def bart_folder(tmp_path_factory):
    """A BART with the real facebook/bart-base config (random weights, built here: no download) in the folder
    layout AutoTokenizer/AutoModel read, as a hub snapshot would be."""
    from transformers import AutoTokenizer, BartConfig, BartModel

    from hyperreal.methods.bridge import resolve_encoder

    cfg = BartConfig(vocab_size=50265, max_position_embeddings=1024, d_model=768, encoder_layers=6,
                     decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
                     encoder_ffn_dim=3072, decoder_ffn_dim=3072, activation_function="gelu", dropout=0.1,
                     attention_dropout=0.0, activation_dropout=0.0, init_std=0.02, scale_embedding=False,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                     forced_eos_token_id=2, normalize_before=False, add_final_layer_norm=False)
    folder = tmp_path_factory.mktemp("bart") / "bart-base-random"
    torch.manual_seed(0)
    BartModel(cfg).save_pretrained(folder, safe_serialization=True)
    # bart-base's BPE tokenizer cannot be downloaded here; any tokenizer whose ids fit BART's vocabulary does
    AutoTokenizer.from_pretrained(resolve_encoder("minilm")).save_pretrained(folder)
    return folder
