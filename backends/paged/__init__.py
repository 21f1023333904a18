"""turnout's own PagedAttention continuous-batching engine (torch; plain-torch path on CPU).

Modules, one job each:
  config        model shape from GGUF metadata, HF config.json or a named dummy shape
  weights       tensors from GGUF (dequantized), safetensors, or random (dummy)
  tokenizer     a `tokenizers` Tokenizer from the GGUF vocab or tokenizer.json; incremental detokenization
  model         the Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU, optional qkv bias)
  kv_cache      the per-layer block pool, sized from a memory budget
  block_manager allocation, ref-counts, hash-chained prefix caching, LRU eviction
  scheduler     continuous batching with a token budget, chunked prefill, preemption by recompute
  attention     paged attention over the block pool (plain torch; a Triton kernel can replace it)
  sampler       OpenAI sampling parameters, per-request seeded generators, logprobs
  engine        the synchronous core: add_request / step / abort
  async_engine  one engine thread, per-request async streams
  backend       PagedBackend: the gateway's Backend protocol over all of the above

Nothing here imports a web framework.
"""
