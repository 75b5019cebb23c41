"""Trigger tokens: a trigger word the tokenizer cuts into pieces gets one new token (pivotal tuning).

"sks" is s, k, s to a tokenizer that never saw it, so "a red sks star on the left" is ten tokens and its last
words sit where the base only ever read a second object's (README: Adapters). A new token for the word, whose
embedding trains beside the adapter (diffusers' advanced DreamBooth ``--train_text_encoder_ti``, A1111's and
OneTrainer's bundled embeddings), makes the trigger one word again, and prompts without it encode exactly as the
base encodes them. The tokens are in the tokenizer only while an adapter that defines them is active; which
adapter owns which word is the caller's business (``spec.sync_tokens``).
"""
from __future__ import annotations

import re
import weakref

import torch
from transformers import AddedToken

_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # text encoder -> TriggerTokens


def split_trigger_words(tokenizer, trigger: str | None) -> list[str]:
    """The words of the trigger that the tokenizer cuts into several tokens (each would get a token of its own)."""
    words = dict.fromkeys(re.findall(r"\w+", (trigger or "").lower()))
    return [w for w in words if len(tokenizer.tokenize(w)) > 1]


# words no one means as a trigger (they are in every caption of many datasets)
_COMMON = {"a", "an", "the", "of", "on", "in", "at", "and", "with", "to", "for", "by", "is", "photo", "picture",
           "image", "style", "art"}


def find_trigger(captions: list[str], tokenizer, known: set[str] = frozenset()) -> str | None:
    """The word every caption shares that the base does not know as a word, or None.

    Candidates: words in every caption, except common ones and the words of prompts the base is known to draw
    (``known``). A candidate the tokenizer cuts into pieces is one the base never read whole (a made-up
    word); else a single token from the rarest half of the vocabulary ("sks" is token 48136 of SD1.5's 49,408,
    "ohwx" 47993; "dog" is 1929): BPE vocabularies list merges in order of frequency. Among several, the one cut
    into fewest pieces (a made-up word is short), then the rarest.
    """
    sets = [set(re.findall(r"[a-z0-9]+", c.lower())) for c in captions if c.strip()]
    if not sets:
        return None
    shared = set.intersection(*sets) - _COMMON - {w.lower() for w in known}
    size = max(len(tokenizer), 1)

    def pieces(w):
        return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))

    split = [w for w in shared if len(pieces(w)) > 1 and len(w) > 1]
    if split:
        return min(split, key=lambda w: (len(pieces(w)), -max(pieces(w)), w))
    rare = [w for w in shared if len(w) > 1 and pieces(w) and pieces(w)[0] >= size // 2]
    return max(rare, key=lambda w: (pieces(w)[0], w)) if rare else None


def initial_token_vectors(pipe, words: list[str]) -> dict[str, torch.Tensor]:
    """Each word's starting embedding: the mean of its pieces' (roughly what the base read, as one vector)."""
    table = pipe.text_encoder.get_input_embeddings().weight
    return {w: table[pipe.tokenizer(w, add_special_tokens=False).input_ids].detach().float().mean(0).clone()
            for w in words}


class TriggerTokens:
    """The words added to one text encoder's tokenizer, each with the vector of the adapter that defines it.

    The vectors replace the table's rows through a forward hook on the input embedding, so a vector in training
    stays a float32 parameter that gradients reach (the table itself may be half precision and stays frozen).
    """

    def __init__(self):
        self.words: dict[str, tuple[str, torch.Tensor]] = {}  # word -> (adapter name, vector)
        self.ids: dict[int, torch.Tensor] = {}
        self.handle = None

    def set(self, pipe, wanted: dict[str, tuple[str, torch.Tensor]]) -> None:
        drop = [w for w in self.words if w not in wanted]
        if drop:  # diffusers' own removal: out of the tokenizer, and the rows out of the table
            pipe.unload_textual_inversion(tokens=drop, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        new = [w for w in wanted if w not in self.words]
        if new:
            # single_word: "sks" inside "tasks" stays part of that word (diffusers' load_textual_inversion adds
            # plain tokens, which match inside words)
            pipe.tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in new])
            pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        self.words = dict(wanted)
        self.ids = {pipe.tokenizer.convert_tokens_to_ids(w): v for w, (_, v) in self.words.items()}
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.ids:  # resizing replaces the embedding module, so the hook goes on the current one
            self.handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(self._substitute)

    def _substitute(self, module, args, output):
        # no "is the token there?" test first: on a GPU that would wait for the device at every encoding
        for tid, vec in self.ids.items():
            output = torch.where((args[0] == tid)[..., None], vec.to(output.device, output.dtype), output)
        return output


def has_tokens(pipe) -> bool:
    """Whether this pipeline's text encoder ever had trigger tokens (then its tokenizer must be kept in sync)."""
    return pipe.text_encoder in _TABLES


def token_table(pipe) -> TriggerTokens:
    return _TABLES.setdefault(pipe.text_encoder, TriggerTokens())


def set_tokens(pipe, wanted: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Exactly these words (word -> (owner, vector)) in the tokenizer; none: the base's own tokenization."""
    if wanted or has_tokens(pipe):
        token_table(pipe).set(pipe, wanted)


def token_owners(pipe) -> set[str]:
    """The adapters whose tokens are in the tokenizer now."""
    return {owner for owner, _ in token_table(pipe).words.values()} if has_tokens(pipe) else set()
