"""turnout's own PagedAttention continuous-batching engine (torch; plain-torch path on CPU).

Modules, one job each:
  config        model shape from GGUF metadata, HF config.json or a named dummy shape
  weights       tensors from GGUF (dequantized), safetensors, or random (dummy)
  loader        a model name -> its source, then config + tokenizer (cheap) and weights (not)
  tokenizer     a `tokenizers` Tokenizer from the GGUF vocab or tokenizer.json; incremental detokenization
  model         the Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU, optional qkv bias)
  fp8           `quantization: fp8`: FP8 weights (per channel) and activations (per token), GEMMs
                through torch._scaled_mm; the one `linear` the decoder calls for any weight
  kv_cache      the per-layer block pool, sized from a memory budget; in the model's dtype or
                FP8 (`kv_cache_dtype: fp8`, scaled e4m3)
  block_manager allocation, ref-counts, prefix caching by BLAKE2b chain digests, LRU eviction,
                forks (a request's choices sharing its prompt blocks)
  scheduler     continuous batching with a token budget, chunked prefill, preemption by recompute;
                each sequence's progress (computed counts, tokens, grammars, stops, frees); the
                choices of an n > 1 request admitted on their parent's prompt blocks
  attention     paged attention over the block pool: plain torch (CPU) or the Triton kernels (CUDA)
  triton_kernels  Triton paged attention: GQA split-K decode, varlen prefill over cached prefixes
  triton_ops    fused Triton kernels: (residual add +) RMSNorm, SiLU-and-mul, RoPE, K/V write,
                per-token FP8 quantization
  step_inputs   one step's model inputs built with numpy, moved to the device in a few copies
  cuda_graphs   decode steps captured as CUDA graphs at bucketed batch sizes
  memory_profile  the GPU KV pool sized from a profiling pass (gpu_memory_utilization)
  hf_compat     the same weights in a transformers model (GPU checks, the benchmark's peer)
  sampler       OpenAI sampling parameters, per-request seeded generators, logprobs; batched GPU fast
                path; grammar masks (llguidance bitmasks unpacked on the device) for both paths
  options       the backend's `options:` (torch-free: the gateway validates them)
  sequence      one choice's tokens, progress, blocks and grammar state; a request's choices (n)
  model_runner  the device half: a plan in, forward pass, grammar masks built while it runs,
                CUDA graphs and sampling, tokens out
  output_processor  new tokens -> text deltas: detokenization, stop strings, logprobs
  engine        the synchronous core: add_request / step / abort, a thin loop of
                schedule -> runner.launch_forward / launch_sampling -> scheduler.update_from_output
                -> outputs
  async_engine  one engine thread, per-request async streams
  backend       PagedBackend: the Backend protocol over all of the above (served by an engine
                worker process: backends.worker)
  parallel      tensor parallelism: a rank's shard layout, its process groups and collectives
                (vocab-parallel embedding and logits, all-reduce, the step broadcast)
  shard         a rank's slice of each weight, cut as the loaders read it
  tp_launch     rank 0's side: start ranks 1..N-1, watch them, stop them
  tp_worker     ranks 1..N-1: receive each step from rank 0 and run their share of it

Nothing here imports a web framework.
"""
