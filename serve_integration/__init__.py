"""Ray Serve integration: vLLM replicas on liftoff, and replica compaction.

Three parts, imported in one direction only:
- the Ray Serve glue, here: `replica` (what every replica shares), `llm` (Ray Serve LLM apps for
  vLLM streaming weights), `apps` (config-file builders, e.g. a RayService's serveConfigV2);
- `compaction/` (`liftoff compact`): packing replicas onto fewer nodes and releasing the rest;
- `examples/`: the CPU twin (TinyLM under Serve) and a plain HTTP model server, used by tests,
  benchmarks and the demo. Nothing in the product imports them; they may import the product.
"""
