"""Write SD1.5's CLIP tokenizer files (``vocab.json``, ``merges.txt``) into ``hyperreal/configs/sd15/tokenizer``.

The vocabulary is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence), which the ``open-clip-torch`` wheel
ships; the hub's openai/clip-vit-large-patch14 files (what SD1.5 uses) are built from it the way OpenAI's
``simple_tokenizer.py`` builds its encoder, which this script repeats:

    pip download --no-deps open-clip-torch -d /tmp/oc && python -m bench.make_sd15_tokenizer /tmp/oc/open_clip_torch-*.whl
"""
from __future__ import annotations

import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

from hyperreal.loading import SD15_CONFIGS

MERGES = 49152 - 256 - 2  # simple_tokenizer.py: merges[1:49152-256-2+1]


def bytes_to_unicode() -> dict[int, str]:
    # openai/CLIP simple_tokenizer.py's byte-to-character table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_bpe(source: Path) -> list[str]:
    """The BPE file's lines, from the .txt.gz itself or from inside an open-clip-torch wheel."""
    data = source.read_bytes()
    if source.suffix == ".whl":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            data = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    return gzip.decompress(data).decode("utf-8").split("\n")


def main(argv: list[str]) -> int:
    merges = [tuple(m.split()) for m in read_bpe(Path(argv[0]))[1:MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out = SD15_CONFIGS / "tokenizer"
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    print(f"wrote {out}: {len(vocab)} tokens, {len(merges)} merges")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
