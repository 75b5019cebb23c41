"""The README's adapter tables, from the JSON that ``python -m hyperreal eval adapter --json`` prints; several
files (kinds run apart, e.g. in parallel) make one table per split, provided their base figures agree.

    python -m hyperreal eval adapter --work WORK --json | tail -1 > star.json
    python bench/star_table.py star.json [more.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"full": "full UNet fine-tune"}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def split_table(split: str, result: dict) -> str:
    b = result["base_figures"]
    lines = ["| kind | star of the colour asked | any star | without the trigger: all | one object | drift (0–255) "
             "| training | trained parameters | targets |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| base alone | {pct(b['star_colour_rate'])} | {pct(b['star_rate'])} | {pct(b['colour_shape_accuracy'])} "
             f"| {pct(b['one_object_accuracy'])} | 0 | | | |"]
    for kind, r in result["kinds"].items():
        met = r.get("targets_met")
        targets = "comparison" if met is None else ("**all met**" if all(met.values()) else
                                                     "missed: " + ", ".join(k for k, v in met.items() if not v))
        threads = r.get("torch_threads")
        lines.append(
            f"| {NAMES.get(kind, kind)} | {pct(r['star_colour_rate'])} | {pct(r['star_rate'])} "
            f"| {pct(r['colour_shape_accuracy'])} ({r['accuracy_change_points']:+.1f}) "
            f"| {pct(r['one_object_accuracy'])} ({r['one_object_change_points']:+.1f}) | {r['drift']:.2f} "
            f"| {r['train_seconds']:.0f} s" + (f", {threads} thread{'s' * (threads > 1)}" if threads else "")
            + f" | {r['trained_parameters']:,} | {targets} |")
    return f"**{split}** split:\n\n" + "\n".join(lines)


def merged(files: list[str]) -> tuple[dict, float | None]:
    """Each split's base figures and every file's kinds (each row keeps its file's torch thread count), and the
    guidance the adapters' images were drawn at (files from before ``adapter_guidance`` drew them at the base's)."""
    splits: dict[str, dict] = {}
    guidances = set()
    for f in files:
        figures = json.loads(Path(f).read_text().strip().splitlines()[-1])
        guidances.add(figures.get("adapter_guidance", figures.get("guidance")))
        if len(guidances) > 1:
            raise SystemExit(f"{f}: its adapters were sampled at another guidance than the other files' "
                             f"({', '.join(sorted('the base' + chr(39) + 's' if g is None else f'{g:g}' for g in guidances))})"
                             "; tables from "
                             "such files do not belong together")
        for split, result in figures["splits"].items():
            into = splits.setdefault(split, {"base_figures": result["base_figures"], "kinds": {}})
            if into["base_figures"] != result["base_figures"]:
                raise SystemExit(f"{f}: the base's figures on {split} differ from the other files' (another base "
                                 "or other prompts); tables from such files do not belong together")
            for kind, row in result["kinds"].items():
                into["kinds"][kind] = {**row, "torch_threads": figures.get("torch_threads")}
    return splits, guidances.pop()


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    splits, guidance = merged(argv)
    if guidance is not None:
        print(f"Adapters sampled at guidance {guidance:g}; the base alone at its own.\n")
    print("\n\n".join(split_table(split, result) for split, result in splits.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
