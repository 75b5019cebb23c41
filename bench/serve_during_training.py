"""Generation latency while a training run holds the app: p50/p95 of N concurrent generate calls, with and without
a run going (an adapter run of thousands of steps started through the app's own API).

    python -m bench.serve_during_training [--base tiny] [--calls 20] [--steps 8] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path


def burst(url: str, calls: int, steps: int) -> dict:
    from gradio_client import Client

    from tests.ui.test_app import generate_args

    times, errors = [], []

    def one(i):
        t0 = time.perf_counter()
        try:
            Client(url, verbose=False).predict(*generate_args(seed=i, steps=steps), api_name="/generate")
            times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(str(e)[:200])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = statistics.quantiles(times, n=20) if len(times) > 1 else times * 19
    return {"answered": len(times), "errors": errors, "p50_s": round(statistics.median(times), 2),
            "p95_s": round(q[18], 2), "max_s": round(max(times), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per generate call")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from gradio_client import Client

    from bench.star import star_dataset
    from hyperreal.loading import load_base
    from hyperreal.settings import Settings
    from hyperreal.ui.app import build_app, launch
    from tests.ui.conftest import free_port
    from tests.ui.test_app import adapter_knobs, upload, wait_until_training

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    settings = Settings(base=args.base, host="127.0.0.1", port=free_port(), outputs=tmp / "outputs")
    demo = build_app(load_base(args.base), settings)
    _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True)
    try:
        burst(url, 2, args.steps)  # warm up
        idle = burst(url, args.calls, args.steps)
        trainer = Client(url, verbose=False)
        table = upload(trainer, sorted(star_dataset(tmp / "stars", n=4).glob("*.png")), "a red sks star")
        job = trainer.submit(table, *adapter_knobs(5000, name="bench", sample_every=0), api_name="/train_adapter")
        wait_until_training(job)
        training = burst(url, args.calls, args.steps)
        still = not job.done()
        trainer.predict(api_name="/stop_adapter")
        job.result(timeout=300)
    finally:
        demo.close()
    figures = {"base": args.base, "calls": args.calls, "steps": args.steps, "idle": idle, "during_training": training,
               "training_still_running_after_burst": still}
    if not args.json:
        for k in ("idle", "during_training"):
            f = figures[k]
            print(f"{k:>16}: {f['answered']}/{args.calls} answered, p50 {f['p50_s']} s, p95 {f['p95_s']} s")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
