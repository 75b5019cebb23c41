"""Prompts in other languages, and English prompts with words the bridge never trained on, for the bridge benchmark.

Each language has a development split (its templates used while choosing the recipe) and a held-out split (other
templates, other seeds), both one object with an optional position, written by hand from each language's grammar
(gender and case agree with the shape). Nothing here is ever trained on: bridges train on English captions only
(``hyperreal/shapes/phrasing.py``), and a test checks that none of these words is among its words.
The expected objects are in the world's canonical words, for the evaluator.
"""
from __future__ import annotations

import random

from hyperreal.shapes.world import COLOURS, POSITIONS, SceneObject, article

SPLITS = ("dev", "held-out")
SEED_OFFSET = {"dev": 61_000, "held-out": 81_000}
# the targets: English with unseen words, and four languages; the rest are reported as they come out
TARGET_LANGUAGES = ("es", "fr", "de", "ru")
REPORTED_LANGUAGES = ("ar", "zh", "he")

# English words and phrasings for the held-out split (the development split is bench/synonyms.py's)
# single words without the canonical word in them (the base reads "red" in "brick red"); a test checks that none
# is a training or development word
HELD_OUT_COLOURS = {"red": ("cerise", "carmine"), "green": ("viridian", "verdant"), "blue": ("cerulean", "lapis"),
                    "yellow": ("buttercup", "daffodil"), "purple": ("mulberry", "aubergine"),
                    "orange": ("persimmon", "papaya")}
HELD_OUT_SHAPES = {"circle": ("globe", "hoop"), "square": ("four-cornered figure", "quadrate"),
                   "triangle": ("three-cornered figure", "trigon")}
HELD_OUT_POSITIONS = {"left": "over on the left", "right": "over on the right", "top": "up high",
                      "bottom": "down low", "center": "dead center"}
HELD_OUT_TEMPLATES = ("please draw {a} {c} {s}{p}", "show me {a} {c} {s}{p}", "{a} {s} coloured {c}{p}",
                      "make me {a} {c} {s}{p}")

_ES = {"c": dict(zip(COLOURS, ("rojo", "verde", "azul", "amarillo", "morado", "naranja"))),
       "s": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"},
       "p": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
             "center": "en el centro"}}
_FR = {"c": dict(zip(COLOURS, ("rouge", "vert", "bleu", "jaune", "violet", "orange"))),
       "s": {"circle": "cercle", "square": "carré", "triangle": "triangle"},
       "p": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "center": "au centre"}}
_DE = {"c": dict(zip(COLOURS, ("rot", "grün", "blau", "gelb", "violett", "orange"))),
       "s": {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n")},
       "p": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "center": "in der Mitte"}}
_RU = {"c": dict(zip(COLOURS, ("красный", "зелёный", "синий", "жёлтый", "фиолетовый", "оранжевый"))),
       "s": {"circle": "круг", "square": "квадрат", "triangle": "треугольник"},
       "p": {"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу", "center": "в центре"}}
_AR = {"c": dict(zip(COLOURS, (("أحمر", "حمراء"), ("أخضر", "خضراء"), ("أزرق", "زرقاء"), ("أصفر", "صفراء"),
                                ("بنفسجي", "بنفسجية"), ("برتقالي", "برتقالية")))),
       "s": {"circle": ("دائرة", 1), "square": ("مربع", 0), "triangle": ("مثلث", 0)},
       "p": {"left": "على اليسار", "right": "على اليمين", "top": "في الأعلى", "bottom": "في الأسفل",
             "center": "في الوسط"}}
_ZH = {"c": dict(zip(COLOURS, ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色"))),
       "s": {"circle": "圆形", "square": "正方形", "triangle": "三角形"},
       "p": {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面", "center": "中间"}}
_HE = {"c": dict(zip(COLOURS, ("אדום", "ירוק", "כחול", "צהוב", "סגול", "כתום"))),
       "s": {"circle": "עיגול", "square": "ריבוע", "triangle": "משולש"},
       "p": {"left": "בצד שמאל", "right": "בצד ימין", "top": "למעלה", "bottom": "למטה", "center": "באמצע"}}


def _sp(pos, words, lead=" "):
    return f"{lead}{words['p'][pos]}" if pos else ""


def _es(o, t):
    obj, p = f"un {_ES['s'][o.shape]} {_ES['c'][o.colour]}", _sp(o.position, _ES)
    return [f"{obj}{p}", f"dibuja {obj}{p}", f"{_ES['s'][o.shape]} {_ES['c'][o.colour]}{p}"][t] if t < 3 else [
        f"quiero {obj}{p}", f"una imagen con un {_ES['s'][o.shape]} de color {_ES['c'][o.colour]}{p}",
        f"{_ES['p'][o.position].capitalize()} hay {obj}" if o.position else f"hay {obj}"][t - 3]


def _fr(o, t):
    obj, p = f"un {_FR['s'][o.shape]} {_FR['c'][o.colour]}", _sp(o.position, _FR)
    return [f"{obj}{p}", f"dessine {obj}{p}", f"{_FR['s'][o.shape]} {_FR['c'][o.colour]}{p}"][t] if t < 3 else [
        f"je voudrais {obj}{p}", f"une image avec {obj}{p}",
        f"{_FR['p'][o.position].capitalize()}, il y a {obj}" if o.position else f"il y a {obj}"][t - 3]


def _de(o, t):
    stem, (noun, g) = _DE["c"][o.colour], _DE["s"][o.shape]
    nom = f"ein {stem}{'er' if g == 'm' else 'es'} {noun}"
    acc = f"{'einen' if g == 'm' else 'ein'} {stem}{'en' if g == 'm' else 'es'} {noun}"
    dat = f"einem {stem}en {noun}"
    p = _sp(o.position, _DE)
    return [f"{nom}{p}", f"zeichne {acc}{p}", f"{stem}{'er' if g == 'm' else 'es'} {noun}{p}"][t] if t < 3 else [
        f"ich möchte {acc}{p}", f"ein Bild mit {dat}{p}",
        f"{_DE['p'][o.position].capitalize()} ist {nom}" if o.position else f"da ist {nom}"][t - 3]


def _ru(o, t):
    obj, p = f"{_RU['c'][o.colour]} {_RU['s'][o.shape]}", _sp(o.position, _RU)
    return [f"{obj}{p}", f"нарисуй {obj}{p}", f"один {obj}{p}"][t] if t < 3 else [
        f"я хочу {obj}{p}", f"картинка, на которой {obj}{p}",
        f"{_RU['p'][o.position].capitalize()} {obj}" if o.position else f"вот {obj}"][t - 3]


def _ar(o, t):
    noun, fem = _AR["s"][o.shape]
    obj, p = f"{noun} {_AR['c'][o.colour][fem]}", _sp(o.position, _AR)
    return [f"{obj}{p}", f"ارسم {obj}{p}", f"{obj} واحد{'ة' if fem else ''}{p}"][t] if t < 3 else [
        f"أريد {obj}{p}", f"صورة فيها {obj}{p}", f"{_AR['p'][o.position]} {obj}" if o.position else f"هنا {obj}"][t - 3]


def _zh(o, t):
    c, s = _ZH["c"][o.colour], _ZH["s"][o.shape]
    after = f"在{_ZH['p'][o.position]}" if o.position else ""
    return [f"一个{c}的{s}{after}", f"画一个{c}的{s}{after}", f"{c}{s}{after}"][t] if t < 3 else [
        f"我想要一个{c}{s}{after}", f"一张图片，{after}有一个{c}的{s}" if after else f"一张图片，有一个{c}的{s}",
        f"{_ZH['p'][o.position]}有一个{c}的{s}" if o.position else f"这里有一个{c}的{s}"][t - 3]


def _he(o, t):
    obj, p = f"{_HE['s'][o.shape]} {_HE['c'][o.colour]}", _sp(o.position, _HE)
    return [f"{obj}{p}", f"צייר {obj}{p}", f"{obj} אחד{p}"][t] if t < 3 else [
        f"אני רוצה {obj}{p}", f"תמונה של {obj}{p}", f"{_HE['p'][o.position]} יש {obj}" if o.position else
        f"יש {obj}"][t - 3]


def _en(o, t):
    c, s = random.Random(f"{o}|{t}").choice(HELD_OUT_COLOURS[o.colour]), random.Random(f"{t}|{o}").choice(
        HELD_OUT_SHAPES[o.shape])
    p = f" {HELD_OUT_POSITIONS[o.position]}" if o.position else ""
    tmpl = HELD_OUT_TEMPLATES[t % len(HELD_OUT_TEMPLATES)]
    first = s if tmpl.index("{s}") < tmpl.index("{c}") else c  # the word the article stands before
    return tmpl.format(a=article(first), c=c, s=s, p=p)


def words(lang: str, kind: str) -> list[tuple[str, str]]:
    """(word in ``lang``, canonical word) for its colours (``kind`` "colour") or shapes ("shape"), bare."""
    table = {"es": _ES, "fr": _FR, "de": _DE, "ru": _RU, "ar": _AR, "zh": _ZH, "he": _HE}[lang]["c" if kind == "colour"
                                                                                             else "s"]
    return [(w if isinstance(w, str) else w[0], canonical) for canonical, w in table.items()]


LANGUAGES = {"es": _es, "fr": _fr, "de": _de, "ru": _ru, "ar": _ar, "zh": _zh, "he": _he}
NAMES = {"es": "Spanish", "fr": "French", "de": "German", "ru": "Russian", "ar": "Arabic", "zh": "Chinese",
         "he": "Hebrew", "en": "English (unseen words)"}


def language_prompts(lang: str, split: str, n: int = 32) -> list[tuple[str, list, int]]:
    """(prompt, expected objects, seed): ``n`` one-object prompts in ``lang`` (``en``: English with held-out words,
    held-out split only); dev uses templates 0-2, held-out 3-5, other objects and seeds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    rng = random.Random(f"{lang}|{split}")
    write = _en if lang == "en" else LANGUAGES[lang]
    first = 0 if split == "dev" else 3
    out = []
    for i in range(n):
        o = SceneObject(rng.choice(COLOURS), rng.choice(("circle", "square", "triangle")),
                        rng.choice((None,) + tuple(POSITIONS)))
        t = i if lang == "en" else first + i % 3
        out.append((write(o, t), [o], SEED_OFFSET[split] + 1000 * (list(NAMES).index(lang)) + i))
    return out
