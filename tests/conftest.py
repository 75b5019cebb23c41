import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

# the tests never reach a hub: fail fast instead of waiting on the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HYPERREAL_DEVICE", "cpu")
# class images generated once per base are cached; the tests' cache is their own, emptied by the OS
os.environ.setdefault("HYPERREAL_CACHE", __import__("tempfile").mkdtemp(prefix="hyperreal-test-cache-"))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny():
    from hyperreal.loading import load_base

    return load_base("tiny")


def run_cli(*args, timeout=300, env=None):
    """``python -m hyperreal ARGS`` in a subprocess, as a user runs it."""
    import subprocess

    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hyperreal", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e)


def digest(*modules) -> str:
    """Hash of every weight: frozen parts must hash the same after training."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()
