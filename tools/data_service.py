"""Starts a tf.data service for main.py's training input, and serves until Ctrl-C.

    python -m tools.data_service --num_workers=4 --port=5050
        # a dispatcher and 4 workers on this host
    python -m tools.data_service --dispatcher_address=host:5050
        # one more worker, on this host, for a dispatcher elsewhere

The first form prints the address to train with (`--data_service_address=...`). Each
worker makes whole examples (read, decode, crop, augment) from shards it must be able
to read itself: the same --data_dir path, or a gs:// one. Workers register under
`--host`, the name the trainers reach them by (default: this host's name), so run them
on hosts the trainers can reach. See training/data_service.py for what the service
changes in training (order, epochs, resume).
"""

import argparse
import os
import socket
import sys
import time

from training import service_address
from training.flag_error import FlagError


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m tools.data_service",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--num_workers", type=int, default=2,
                      help="Workers to start beside the dispatcher (without "
                      "--dispatcher_address).")
  parser.add_argument("--port", type=int, default=5050,
                      help="The dispatcher's port; with --dispatcher_address, the "
                      "worker's (0: any free port).")
  parser.add_argument("--dispatcher_address", default=None,
                      help="host:port of a running dispatcher: start one worker here "
                      "for it.")
  parser.add_argument("--host", default=socket.gethostname(),
                      help="The name trainers and workers reach this host by.")
  return parser.parse_args(argv)


def check_args(args):
  """Raises `FlagError` for a bad value or an address that does not answer."""
  if args.dispatcher_address is None and args.num_workers < 1:
    raise FlagError("num_workers", f"must be at least 1, got {args.num_workers}")
  if args.port < 0 or args.port > 65535:
    raise FlagError("port", f"must be in 0..65535, got {args.port}")
  try:
    service_address.check_port_free(args.port)
  except service_address.AddressError as e:
    raise FlagError("port", str(e)) from None
  if args.dispatcher_address is not None:
    try:
      service_address.probe(args.dispatcher_address, timeout_seconds=3.0)
    except service_address.AddressError as e:
      raise FlagError("dispatcher_address", str(e)) from None


def _wait_forever(*servers):
  """Sleeps in Python while `servers` (kept referenced: a collected server stops)
  serve: their own `join` waits in C++, where Ctrl-C cannot reach it."""
  del servers
  while True:
    time.sleep(1)  # short: a signal that lands on a TF thread is seen within 1 s


def serve(args, out):
  """Starts the servers and blocks until they stop (or Ctrl-C)."""
  # TensorFlow starts here, after the checks: it takes seconds and logs at start-up,
  # and a bad address is better reported before all that.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  service = tf.data.experimental.service
  worker_address = f"{args.host}:%port%"
  if args.dispatcher_address is not None:
    _, host, port = service_address.split_address(args.dispatcher_address)
    worker = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=f"{host}:{port}", worker_address=worker_address,
        port=args.port))
    print(f"tf.data service worker on {args.host} serving the dispatcher at "
          f"{host}:{port}; Ctrl-C stops it.", file=out, flush=True)
    _wait_forever(worker)
    return
  dispatcher = service.DispatchServer(service.DispatcherConfig(port=args.port))
  port = int(dispatcher.target.rsplit(":", 1)[1])
  workers = [service.WorkerServer(service.WorkerConfig(
      dispatcher_address=f"localhost:{port}", worker_address=worker_address))
             for _ in range(args.num_workers)]
  print(f"tf.data service: a dispatcher and {len(workers)} worker(s) on {args.host}; "
        "train with\n"
        f"  python main.py --data_service_address=grpc://{args.host}:{port} ...\n"
        f"add workers on other hosts with\n"
        f"  python -m tools.data_service --dispatcher_address={args.host}:{port}\n"
        "Ctrl-C stops the service.", file=out, flush=True)
  _wait_forever(dispatcher, workers)


def main(argv, out=sys.stdout, err=sys.stderr):
  """Returns the exit code: 0 after Ctrl-C, 2 for a bad flag (one line on `err`)."""
  args = parse_args(argv)
  try:
    check_args(args)
  except FlagError as e:
    print(f"tools.data_service: error: {e}", file=err)
    return 2
  try:
    serve(args, out)
  except KeyboardInterrupt:
    print("tf.data service stopped.", file=out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
