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


def _place(o, words: dict, front: str, alone: str) -> dict:
    """Pieces every language shares: ``p`` the position after the object, ``lead`` the sentence opening that
    puts it first (``front`` with ``{P}`` for the phrase), or ``alone`` without a position."""
    phrase = words["p"][o.position] if o.position else ""
    return {"p": f" {phrase}" if phrase else "", "lead": front.format(P=phrase, Cap=phrase.capitalize()) if phrase
            else alone}


def _es(o):
    c, s = _ES["c"][o.colour], _ES["s"][o.shape]
    return {"obj": f"un {s} {c}", "bare": f"{s} {c}", "of": f"un {s} de color {c}",
            **_place(o, _ES, "{Cap} hay", "hay")}


def _fr(o):
    c, s = _FR["c"][o.colour], _FR["s"][o.shape]
    return {"obj": f"un {s} {c}", "bare": f"{s} {c}", **_place(o, _FR, "{Cap}, il y a", "il y a")}


def _de(o):
    stem, (noun, g) = _DE["c"][o.colour], _DE["s"][o.shape]
    strong = f"{stem}{'er' if g == 'm' else 'es'} {noun}"  # the adjective's ending agrees with the noun's gender
    return {"nom": f"ein {strong}", "bare": strong, "dat": f"einem {stem}en {noun}",
            "acc": f"{'einen' if g == 'm' else 'ein'} {stem}{'en' if g == 'm' else 'es'} {noun}",
            **_place(o, _DE, "{Cap} ist", "da ist")}


def _ru(o):
    return {"obj": f"{_RU['c'][o.colour]} {_RU['s'][o.shape]}", **_place(o, _RU, "{Cap}", "вот")}


def _ar(o):
    noun, fem = _AR["s"][o.shape]
    return {"obj": f"{noun} {_AR['c'][o.colour][fem]}", "one": "واحدة" if fem else "واحد",
            **_place(o, _AR, "{P}", "هنا")}


def _zh(o):
    return {"c": _ZH["c"][o.colour], "s": _ZH["s"][o.shape],
            "after": f"在{_ZH['p'][o.position]}" if o.position else "", **_place(o, _ZH, "{P}", "这里")}


def _he(o):
    return {"obj": f"{_HE['s'][o.shape]} {_HE['c'][o.colour]}", **_place(o, _HE, "{P} יש", "יש")}


# language -> (the object's pieces, six templates: 0-2 the development split's, 3-5 the held-out split's)
WRITERS = {
    "es": (_es, ("{obj}{p}", "dibuja {obj}{p}", "{bare}{p}",
                 "quiero {obj}{p}", "una imagen con {of}{p}", "{lead} {obj}")),
    "fr": (_fr, ("{obj}{p}", "dessine {obj}{p}", "{bare}{p}",
                 "je voudrais {obj}{p}", "une image avec {obj}{p}", "{lead} {obj}")),
    "de": (_de, ("{nom}{p}", "zeichne {acc}{p}", "{bare}{p}",
                 "ich möchte {acc}{p}", "ein Bild mit {dat}{p}", "{lead} {nom}")),
    "ru": (_ru, ("{obj}{p}", "нарисуй {obj}{p}", "один {obj}{p}",
                 "я хочу {obj}{p}", "картинка, на которой {obj}{p}", "{lead} {obj}")),
    "ar": (_ar, ("{obj}{p}", "ارسم {obj}{p}", "{obj} {one}{p}",
                 "أريد {obj}{p}", "صورة فيها {obj}{p}", "{lead} {obj}")),
    "zh": (_zh, ("一个{c}的{s}{after}", "画一个{c}的{s}{after}", "{c}{s}{after}",
                 "我想要一个{c}{s}{after}", "一张图片，{after}有一个{c}的{s}", "{lead}有一个{c}的{s}")),
    "he": (_he, ("{obj}{p}", "צייר {obj}{p}", "{obj} אחד{p}",
                 "אני רוצה {obj}{p}", "תמונה של {obj}{p}", "{lead} {obj}")),
}


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


LANGUAGES = tuple(WRITERS)
NAMES = {"es": "Spanish", "fr": "French", "de": "German", "ru": "Russian", "ar": "Arabic", "zh": "Chinese",
         "he": "Hebrew", "en": "English (unseen words)"}


def language_prompts(lang: str, split: str, n: int = 32) -> list[tuple[str, list, int]]:
    """(prompt, expected objects, seed): ``n`` one-object prompts in ``lang`` (``en``: English with held-out words,
    held-out split only); dev uses templates 0-2, held-out 3-5, other objects and seeds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    rng = random.Random(f"{lang}|{split}")
    write = _en if lang == "en" else (lambda o, t: WRITERS[lang][1][t].format(**WRITERS[lang][0](o)))
    first = 0 if split == "dev" else 3
    out = []
    for i in range(n):
        o = SceneObject(rng.choice(COLOURS), rng.choice(("circle", "square", "triangle")),
                        rng.choice((None,) + tuple(POSITIONS)))
        t = i if lang == "en" else first + i % 3
        out.append((write(o, t), [o], SEED_OFFSET[split] + 1000 * (list(NAMES).index(lang)) + i))
    return out
