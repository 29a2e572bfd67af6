"""Free TCP ports on loopback, for tests that start worker processes."""

import socket


def free_ports(count):
  """`count` distinct ports that were free a moment ago (the OS picked them)."""
  sockets = []
  for _ in range(count):
    s = socket.socket()
    s.bind(("localhost", 0))
    sockets.append(s)
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports
