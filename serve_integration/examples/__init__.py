"""Examples outside the product path: `tinylm` (a small real transformer, torch), `twin` (the CPU
twin of a vLLM replica: TinyLM under Ray Serve, loading through weightstream or download-then-load)
and `server` (TinyLM behind a plain HTTP server, what the container scale-up benchmark runs).

Used by tests, benchmarks and the demo; nothing in `serve_integration` outside this package
imports it (tests/serve/test_layout.py checks).
"""
