"""Markdown tables from ``python -m hyperreal eval bridge --json`` output (the README's and the model card's).

    python -m hyperreal eval bridge --json | tail -1 > bridge.json
    python -m bench.bridge_table bridge.json
"""
from __future__ import annotations

import json
import sys

from . import languages as L


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def accuracy_table(figures: dict, split: str) -> str:
    """The markdown table of one split: each prompt set's colour+shape accuracy, base alone and each bridge."""
    sets = list(figures["base_accuracy"][split])
    head = "| | " + " | ".join(L.NAMES[k] for k in sets) + " | original captions |"
    rows = [head, "|---" * (len(sets) + 2) + "|",
            "| base alone | " + " | ".join(_pct(figures["base_accuracy"][split][k]) for k in sets)
            + f" | {_pct(figures['base_original_accuracy'])} |"]
    for mode, r in figures["modes"].items():
        rows.append(f"| {mode} (`{r['bridge']}`) | " + " | ".join(_pct(r["accuracy"][split][k]) for k in sets)
                    + f" | {_pct(r['original_accuracy'])} ({r['original_change_points']:+.1f}) |")
    return "\n".join(rows)



def targets_table(figures: dict) -> str:
    rows = ["| bridge | training | targets met (held-out) |", "|---|---|---|"]
    for mode, r in figures["modes"].items():
        secs = r.get("train_seconds")
        met = ", ".join(f"{k} {'yes' if v else '**no**'}" for k, v in r["targets_met"].items())
        rows.append(f"| {mode} | {'n/a' if secs is None else f'{secs / 60:.1f} min'} | {met} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    figures = json.loads(open(argv[0]).read().strip().splitlines()[-1])
    for split in figures["splits"]:
        print(f"{split} prompts:\n\n{accuracy_table(figures, split)}\n")
    print(targets_table(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
