"""How much does the extra encoder itself know about the development synonyms? (a diagnostic, seconds)

For each development synonym (never trained on) the nearest class among the canonical word and its training
synonyms (mean of the 3 most similar words, cosine of the encoder's mean-pooled layer output). A bridge that maps
the encoder's meaning faithfully cannot do much better than this on words it never saw.

    python bench/bridge_encoder_ceiling.py [--encoder minilm] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperreal import bridge as B  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    enc = B.TextEncoder(args.encoder)

    def emb(texts, layer):
        ids, m = enc.tokenize(texts, 32)
        with torch.no_grad():
            x = enc.states(ids, m)[layer]
        mm = m[..., None].float()
        return torch.nn.functional.normalize((x * mm).sum(1) / mm.sum(1), dim=-1)

    out = {"encoder": args.encoder}
    for kind, train, dev, tmpl in (("colour", B.TRAIN_COLOURS, B.DEV_COLOURS, "a {} thing"),
                                   ("shape", B.TRAIN_SHAPES, B.DEV_SHAPES, "a {}")):
        words, labels = [], []
        for c, syn in train.items():
            for w in (c,) + syn:
                words.append(w)
                labels.append(c)
        for layer in range(enc.n_states):
            E = emb([tmpl.format(w) for w in words], layer)
            ok = n = 0
            for c, syn in dev.items():
                for a in syn:
                    sims = (emb([tmpl.format(a)], layer) @ E.T)[0]
                    score = {k: float(sims[[i for i, x in enumerate(labels) if x == k]].topk(3).values.mean())
                             for k in train}
                    ok += max(score, key=score.get) == c
                    n += 1
            out[f"{kind}_layer{layer}"] = round(ok / n, 3)
            print(f"{kind} layer {layer}: nearest class right for {ok}/{n} development synonyms")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
