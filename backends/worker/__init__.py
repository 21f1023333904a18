"""Engine worker processes: each local backend (llamacpp, paged) runs in a process of its own,
supervised by the serving process, so that a native fault in a model ends that model's
requests with clean errors and a restart, never the gateway.

  messages    what crosses the pipe (msgspec structs, msgpack on ZeroMQ)
  server      the worker's side: a LocalBackend driven by requests from the pipe
  process     one incarnation of a worker: spawn, sockets, per-request channels, exit
  backend     WorkerBackend: the Backend protocol over it, with load on demand, keep_alive
              and restarts with backoff
"""
