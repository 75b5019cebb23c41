"""A hub that accepts connections and never answers costs the job that asked for it an error after the load
deadline; every other visitor's generation goes on meanwhile."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading

from ..conftest import ROOT

# runs in its own process: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported
SCRIPT = textwrap.dedent("""
    import json, threading, time
    from pathlib import Path
    from gradio_client import Client
    from hyperreal.loading import load_base
    from hyperreal.settings import Settings
    from hyperreal.ui.app import build_app, launch
    from tests.ui.conftest import free_port
    from tests.ui.test_app import generate_args

    out = Path(__import__("sys").argv[1])
    settings = Settings(base="tiny", host="127.0.0.1", port=free_port(), outputs=out)
    demo = build_app(load_base("tiny"), settings)
    _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True)
    t0, said = time.time(), {}

    def call(name, adapter):
        try:
            Client(url, verbose=False).predict(*generate_args(adapter=adapter, steps=4), api_name="/generate")
            said[name] = ["ok", time.time() - t0]
        except Exception as e:
            said[name] = [str(e)[:300], time.time() - t0]

    hub = threading.Thread(target=call, args=("hub", "someone/some-lora"))
    hub.start()
    time.sleep(1.0)  # the hub job is waiting on the silent server now
    plain = threading.Thread(target=call, args=("plain", None))
    plain.start()
    plain.join(120)
    hub.join(120)
    print(json.dumps(said), flush=True)
    demo.close()
    __import__("os")._exit(0)  # the hub job's loader thread may still be waiting on the silent server
""")


def silent_server():
    """A TCP server that accepts every connection and never sends a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return sock, held


def test_silent_hub_does_not_hold_up_other_visitors(tmp_path):
    sock, held = silent_server()
    port = sock.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_ETAG_TIMEOUT="120", HF_HUB_DOWNLOAD_TIMEOUT="120",  # the hub library would wait 2 minutes
               HYPERREAL_LOAD_TIMEOUT="6", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "outputs")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=400)
    finally:
        sock.close()
        for c in held:
            c.close()
    assert r.returncode == 0, r.stderr[-3000:]
    said = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert held, "the hub job did reach the silent server"
    assert said["plain"][0] == "ok", said
    hub_error, hub_at = said["hub"]
    assert "took more than 6 s" in hub_error and "someone/some-lora" in hub_error, said
    # the plain job was answered while the hub job was still waiting, not after it
    assert said["plain"][1] < hub_at, said
    assert hub_at < 60, said
