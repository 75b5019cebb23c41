"""hyperreal app: `python app.py [--base B] [--vae V] [--host H] [--port P] [--share]` (settings also from env vars)."""
from __future__ import annotations

try:  # on Hugging Face ZeroGPU, spaces must patch torch.cuda before anything touches it (so first of all)
    import spaces  # noqa: F401
except ImportError:
    pass

import argparse  # noqa: E402
import sys  # noqa: E402

from hyperreal.errors import HyperrealError  # noqa: E402
from hyperreal.loading import load_base  # noqa: E402
from hyperreal.settings import Settings  # noqa: E402
from hyperreal.ui.app import build_app, launch  # noqa: E402


def main(argv=None) -> int:
    s = Settings.from_env()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default=s.base, help="tiny | hub id | local diffusers folder | one SD1.5 .safetensors "
                    "checkpoint (default: HYPERREAL_BASE, else auto); the page can switch to the checkpoints in the "
                    "models folder (HYPERREAL_MODELS)")
    ap.add_argument("--vae", default=s.vae, help="a VAE used instead of the base's: .safetensors file, diffusers VAE "
                    "folder or hub id (default: HYPERREAL_VAE)")
    ap.add_argument("--host", default=s.host)
    ap.add_argument("--port", type=int, default=s.port)
    ap.add_argument("--share", action="store_true", default=s.share, help="create a public share link")
    args = ap.parse_args(argv)
    s.base, s.vae, s.host, s.port, s.share = args.base, args.vae, args.host, args.port, args.share
    try:
        base = load_base(s.base, vae=s.vae)
    except HyperrealError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"hyperreal: base '{base.name}' on {base.device}; outputs in {s.outputs}")
    launch(build_app(base, s), s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
