"""How much does the extra encoder itself know about the development synonyms? (a diagnostic, seconds)

Two read-outs of the encoder's mean-pooled output of each layer, for the development synonyms (never trained on):
- nearest: the class of the most similar training words (mean of the 3 best cosines among the canonical word
  and its training synonyms);
- probe: a linear classifier trained on the training words (logistic regression, the best a linear layer on the
  encoder's features can learn from them).
A bridge that maps the encoder's meaning faithfully cannot do much better than these on words it never saw; the
colour x shape products below are the resulting ceiling for colour+shape accuracy on synonym prompts.

--colour-names adds several hundred more training words for the colour probe: matplotlib's XKCD and CSS colour
names, labelled by the nearest world colour in hue (clearly saturated ones only; none containing a development
word). It asks whether more words to learn from would lift the ceiling.

    python bench/bridge_encoder_ceiling.py [--encoder minilm,use-multilingual,FOLDER] [--colour-names] [--json]

Several encoders (comma-separated) print one JSON object each with --json, the last line holding them all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import languages as L  # noqa: E402
from bench.synonyms import DEV_COLOURS, DEV_SHAPES  # noqa: E402
from hyperreal.methods.bridge.encoders import load_encoder  # noqa: E402
from hyperreal.shapes.phrasing import TRAIN_COLOURS, TRAIN_SHAPES  # noqa: E402


def pooled(enc, texts: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        states, m = enc.read(texts, 32)  # a pooled encoder: one "layer" of one token
    mm = m[..., None].float()
    return [F.normalize((x.float() * mm).sum(1) / mm.sum(1), dim=-1) for x in states]


def probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], 1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w + b, y) + 1e-3 * (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


HUES = {"red": 0, "orange": 30, "yellow": 55, "green": 120, "blue": 220, "purple": 285}


def colour_names(exclude: set[str]) -> dict[str, str]:
    """Named colours (matplotlib's XKCD and CSS tables) whose hue is clearly one world colour's."""
    import colorsys

    from matplotlib import colors as mc

    out = {}
    for name, hexa in {**mc.XKCD_COLORS, **mc.CSS4_COLORS}.items():
        name = name.replace("xkcd:", "")
        if any(w in name or w.replace("-", " ") in name for w in exclude):
            continue
        h, light, sat = colorsys.rgb_to_hls(*mc.to_rgb(hexa))
        if sat < 0.45 or not 0.2 <= light <= 0.8:
            continue
        dist = {c: min(abs(360 * h - v), 360 - abs(360 * h - v)) for c, v in HUES.items()}
        first, second = sorted(dist, key=dist.get)[:2]
        if dist[first] <= 25 and dist[second] - dist[first] >= 15:
            out[name] = first
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="minilm,use-multilingual")
    ap.add_argument("--colour-names", action="store_true", help="train the colour probe on named colours too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [ceiling(name, args.colour_names) for name in args.encoder.split(",") if name]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"encoders": results}))
    return 0


def ceiling(name: str, with_colour_names: bool) -> dict:
    print(f"== {name}")
    enc = load_encoder(name)
    out = {"encoder": name}
    best = {}
    for kind, train, dev, tmpl in (("colour", TRAIN_COLOURS, DEV_COLOURS, "a {} thing"),
                                   ("shape", TRAIN_SHAPES, DEV_SHAPES, "a {}")):
        classes = list(train)
        pairs = [(w, c) for c, syn in train.items() for w in (c,) + syn]
        dev_words = [w for syn in dev.values() for w in syn]
        if kind == "colour" and with_colour_names:
            extra = colour_names(set(dev_words))
            pairs += [(w, c) for w, c in extra.items() if w not in dict(pairs)]
            out["colour_names"] = len(extra)
            print(f"colour probe also trains on {len(extra)} named colours")
        words = [w for w, _ in pairs]
        labels = torch.tensor([classes.index(c) for _, c in pairs])
        dev_labels = torch.tensor([classes.index(c) for c, syn in dev.items() for _ in syn])
        E, D = pooled(enc, [tmpl.format(w) for w in words]), pooled(enc, [tmpl.format(w) for w in dev_words])
        n = len(dev_words)
        for layer in range(len(E)):
            sims = D[layer] @ E[layer].T
            score = torch.stack([sims[:, labels == k].topk(3, dim=1).values.mean(1) for k in range(len(classes))], 1)
            nearest = int((score.argmax(1) == dev_labels).sum())
            w, b = probe(E[layer], labels, len(classes))
            probed = int(((D[layer] @ w + b).argmax(1) == dev_labels).sum())
            out[f"{kind}_layer{layer}"] = {"nearest": round(nearest / n, 3), "probe": round(probed / n, 3)}
            best[kind] = max(best.get(kind, 0.0), nearest / n, probed / n)
            print(f"{kind} layer {layer}: right for {nearest}/{n} development synonyms by nearest class, "
                  f"{probed}/{n} by a linear probe")
            for lang in L.LANGUAGES:  # the same read-outs on each language's own words, bare
                lw = L.words(lang, kind)
                X = pooled(enc, [w for w, _ in lw])[layer]
                y = torch.tensor([classes.index(c) for _, c in lw])
                s_ = X @ E[layer].T
                sc = torch.stack([s_[:, labels == k].topk(3, dim=1).values.mean(1) for k in range(len(classes))], 1)
                right = max(int((sc.argmax(1) == y).sum()), int(((X @ w + b).argmax(1) == y).sum())) / len(lw)
                key = f"{lang}_{kind}"
                out[key] = max(out.get(key, 0.0), round(right, 3))
    for lang in L.LANGUAGES:
        out[f"{lang}_ceiling"] = round(out[f"{lang}_colour"] * out[f"{lang}_shape"], 3)
    print("other languages' own words, colour x shape: "
          + ", ".join(f"{lang} {100 * out[f'{lang}_ceiling']:.0f}%" for lang in L.LANGUAGES))
    out["best_colour"], out["best_shape"] = round(best["colour"], 3), round(best["shape"], 3)
    out["ceiling_colour_shape"] = round(best["colour"] * best["shape"], 3)
    print(f"best layer and read-out: colour {100 * best['colour']:.0f}%, shape {100 * best['shape']:.0f}% "
          f"-> colour+shape ceiling about {100 * out['ceiling_colour_shape']:.0f}% (if errors are independent)")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
