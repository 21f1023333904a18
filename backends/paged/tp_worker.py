"""`python -m backends.paged.tp_worker`: one tensor-parallel rank other than 0.

Started by rank 0 (tp_launch), which writes a `RankSpec` on our stdin. We join the process
group, load our slice of the weights, build a model runner over it (KV pool, CUDA graphs:
the same start-up as rank 0's runner, collective for collective), then loop: receive a step's
inputs from rank 0, run our share of its forward pass (taking part in its collectives), until
rank 0 sends the stop message. The scheduler, the sampler and everything about requests stay
on rank 0.

We exit when rank 0 is gone, however it went: a thread reads our stdin, whose write end only
rank 0 holds, and ends the process at end of file.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading

import torch
import torch.distributed as dist

from backends.paged.loader import ModelSource, load_weights
from backends.paged.model_runner import ModelRunner
from backends.paged.parallel import cpu_threads_per_rank, destroy_tensor_parallel, init_tensor_parallel
from backends.paged.tp_launch import COLLECTIVE_TIMEOUT, MASTER_ADDR, START_TIMEOUT_S, RankSpec, read_spec, ready_key

log = logging.getLogger("turnout.tp_worker")


def serve(spec: RankSpec) -> None:
    """Join the group, build this rank's runner, run steps until told to stop."""
    opts = spec.options
    device = opts.torch_device()
    threads = opts.num_threads or (cpu_threads_per_rank(spec.size) if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        device = torch.device("cuda", 0)  # the one GPU rank 0 left us visible (CUDA_VISIBLE_DEVICES)
        torch.cuda.set_device(device)
    store = dist.TCPStore(MASTER_ADDR, spec.port, spec.size, False, timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    store.set(ready_key(spec.rank), "1")
    tp = init_tensor_parallel(spec.config, spec.rank, spec.size, store, device, COLLECTIVE_TIMEOUT)
    try:
        source = ModelSource(spec.source_kind, spec.source_location)
        dtype = opts.torch_dtype(device)
        weights = load_weights(source, spec.config, dtype, device, seed=opts.seed, quantization=opts.quantization, shard=tp.layout)
        tp.barrier()  # rank 0 has its weights too
        runner = ModelRunner(spec.config, weights, opts, decode_graphs=spec.task != "embed", tp=tp)
        log.info("rank %d of %d ready: %d KV blocks", spec.rank, spec.size, runner.num_blocks)
        while (message := tp.recv_step()) is not None:
            inp, num_prev = message
            if num_prev:  # filled by rank 0's broadcast in run_forward
                inp.prev_tokens = torch.empty(num_prev, dtype=torch.int64, device=runner.device)
            runner.run_forward(inp)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the last step's collectives done before the group goes
    finally:
        destroy_tensor_parallel()


def _exit_with_rank_zero(fd: int) -> None:
    """Block on stdin; at its end (rank 0 closed it or died) end this process at once."""
    try:
        while os.read(fd, 4096):
            pass
    finally:
        os._exit(0)


def main() -> int:
    logging.basicConfig(level=os.environ.get("TURNOUT_WORKER_LOG_LEVEL", "WARNING"), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fd = sys.stdin.fileno()
    spec = read_spec(fd)
    threading.Thread(target=_exit_with_rank_zero, args=(fd,), name="rank-zero-watch", daemon=True).start()
    try:
        serve(spec)
    except Exception:
        log.exception("tensor-parallel rank %d failed", spec.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
