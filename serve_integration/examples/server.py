"""A minimal TinyLM HTTP server for a container (no Ray): what the scale-up benchmark starts.

    python3 -m serve_integration.examples.server --model-url s3://bucket/tiny/ --loader weightstream --port 8080
        [--import vllm]   # a serving framework's import first, as a vLLM replica's process starts
        [--loader download --evict]   # the downloaded checkpoint leaves the page cache before it is loaded

GET /health answers 503 until the weights are loaded and one warm-up generation ran, then {"ready": true, timings}; POST
/generate {"prompt", "max_new_tokens"} -> {"text"}. Timings use the wall clock, so the host
that started the container can place the process start and the load on its own timeline.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = time.time()


def import_loader(loader: str, modules: list[str]) -> None:
    """Import `modules`, torch and the loader's libraries up front, so the load's time is the load's alone."""
    import importlib

    for module in modules:
        importlib.import_module(module)
    import torch  # noqa: F401

    if loader == "weightstream":
        import weightstream.api  # noqa: F401
    else:
        import boto3  # noqa: F401
        import safetensors.torch  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-url", required=True)
    parser.add_argument("--loader", choices=["weightstream", "download"], default="weightstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--import", dest="modules", action="append", default=[], help="a module to import first")
    parser.add_argument("--evict", action="store_true", help="download: drop the files from the page cache, then load")
    args = parser.parse_args(argv)
    state: dict = {"ready": False, "started_at": STARTED, "loader": args.loader}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200 if state["ready"] else 503, {k: v for k, v in state.items() if k != "model"})

        def do_POST(self) -> None:
            if not state["ready"]:
                self._send(503, {"error": "loading"})
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            text = state["model"].generate(str(body.get("prompt", "")), int(body.get("max_new_tokens", 1)))
            self._send(200, {"text": text})

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["listening_at"] = time.time()
    import_loader(args.loader, args.modules)
    from serve_integration.examples.twin import load_downloading, load_streaming, warm_up

    state["imported_at"] = time.time()
    if args.loader == "weightstream":
        state["model"] = load_streaming(args.model_url)
    else:
        state["model"] = load_downloading(args.model_url, evict=args.evict)
    state["loaded_at"] = time.time()
    state["load_seconds"] = round(state["loaded_at"] - state["imported_at"], 3)
    warm_up(state["model"])
    state["warmed_at"] = time.time()
    state["ready"] = True
    print(f"ready: loaded with {args.loader} in {state['load_seconds']} s", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
