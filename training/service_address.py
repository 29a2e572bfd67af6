"""Addresses of tf.data service servers: parsed, and probed before anything is built.

Plain Python with no TensorFlow, so that `python -m tools.data_service` can report a
bad address in one line before TensorFlow starts (which takes seconds and logs).
"""

import errno
import socket
import urllib.parse

# distribute's default protocol; an address may also name it ("grpc://host:port").
PROTOCOL = "grpc"


class AddressError(ValueError):
  """An address that is malformed, unreachable, or (to serve on) already taken."""


def split_address(address):
  """(protocol, host, port) of "host:port" or "grpc://host:port".

  Raises:
    AddressError: no host or no port in `address`.
  """
  protocol, _, rest = address.rpartition("://")
  parsed = urllib.parse.urlsplit("//" + rest)
  try:
    port = parsed.port
  except ValueError:
    port = None
  if not parsed.hostname or port is None or parsed.path:
    raise AddressError(f"{address!r} is not host:port (e.g. grpc://localhost:5050)")
  return protocol or PROTOCOL, parsed.hostname, port


def probe(address, timeout_seconds=5.0):
  """Raises `AddressError` unless a TCP connection to `address` opens in time.

  With no dispatcher there, `distribute` retries quietly for as long as its own
  timeout allows; a socket connect says so in seconds, before anything is built.
  """
  _, host, port = split_address(address)
  try:
    with socket.create_connection((host, port), timeout=timeout_seconds):
      pass
  except OSError as e:
    reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
    raise AddressError(f"no tf.data service dispatcher answers at {host}:{port} "
                       f"({reason}); start one with `python -m tools.data_service`"
                       ) from None


def check_port_free(port):
  """Raises `AddressError` if `port` (0: any) cannot be bound on this host.

  The servers bind inside TensorFlow, which reports a taken port as a C++ error deep
  in its log; binding first gives the reason in one line.
  """
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("", port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise AddressError(f"port {port} is in use on this host; pick another, or 0 "
                           "for any free port") from None
      raise AddressError(f"cannot serve on port {port}: {e.strerror or e}") from None
