"""Engine worker processes: each local backend (llamacpp, paged) runs in a process of its own,
supervised by the serving process, so that a native fault in a model ends that model's
requests with clean errors and a restart, never the gateway.

  messages    what crosses the pipe (msgspec structs, msgpack on ZeroMQ)
  server      the worker's side: a LocalBackend driven by requests from its clients
  pipe        a client's end of the pipe to one worker: sockets, per-request streams
  process     one incarnation of a worker: spawn, the owner's pipe, exit
  backend     WorkerBackend: the Backend protocol over it, with load on demand, keep_alive
              and restarts with backoff
  control     what crosses between HTTP processes and the engine host (`--workers N`)
  shared      SharedWorkerBackend: an HTTP process's side of a worker the host supervises
"""
