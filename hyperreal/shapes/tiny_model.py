"""Architecture of the embedded tiny base: the SD1.5 family (CLIP text encoder + tokenizer, AutoencoderKL,
UNet2DConditionModel, a diffusers scheduler), scaled down to 64x64 images and 16x16x4 latents."""
from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import ALL_SHAPES, COLOURS, POSITION_PHRASE

MAX_TOKENS = 32  # SD uses 77; the longest template caption is 15 tokens
TEXT_WIDTH = 128  # the UNet's cross-attention width
EXTRA_WORDS = ("a an one and the on at in of with".split()
               + "left right top bottom center shape object image picture".split())


def vocabulary() -> list[str]:
    words = list(COLOURS) + list(ALL_SHAPES) + list(EXTRA_WORDS)
    for phrase in POSITION_PHRASE.values():
        words += phrase.split()
    return sorted(set(words))


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-to-character table (openai/CLIP simple_tokenizer.py), so the files are a real CLIP BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE whose merges make every world word one token; other words fall back to characters."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []

    def make() -> CLIPTokenizer:
        full = dict(vocab)
        for special in ("<|startoftext|>", "<|endoftext|>"):
            full[special] = len(full)
        return CLIPTokenizer(vocab=full, merges=list(merges))

    # BPE applies merges by rank across the whole word, so add merges for whatever pieces a word still
    # splits into until every world word is a single token (converges in a few rounds)
    pending = vocabulary()
    for _ in range(20):
        tok = make()
        split = [(w, tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids)) for w in pending]
        pending = [w for w, parts in split if len(parts) > 1]
        if not pending:
            break
        for w, parts in split:
            while len(parts) > 1:
                a, b = parts[0], parts[1]
                if (a, b) not in merges:
                    merges.append((a, b))
                vocab.setdefault(a + b, len(vocab))
                parts = [a + b] + parts[2:]
    else:
        raise RuntimeError(f"tokenizer merges did not converge for {pending}")
    tok.model_max_length = MAX_TOKENS
    return tok


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    # three levels = two downsamplings: 64x64x3 -> 16x16x4 (SD's VAE has four levels, factor 8)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def build_unet(cross_attention_dim: int = TEXT_WIDTH) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=32,
    )


# SD1.5's beta schedule, rescaled to zero terminal SNR with v-prediction and trailing timesteps (Lin et al.,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023). With SD's own schedule the last step
# still carries ~7% signal; on 16x16 latents that is enough for a model to read the layout off the starting
# noise and ignore "left"/"top" in the prompt (measured on the first tiny model: 16% position accuracy).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                steps_offset=1)


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def build_inference_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
