"""Names a SuperLink for ``flwr`` (its ``config.toml``), as ``flwr run ... NAME`` and ``flwr supernode register``
use it: flwr 1.42 has no command for this, and a hand-written entry fails on a relative ``root-certificates``
(flwr reads it only as an absolute path) or a missing ``insecure``.

  python -m a2v_jax.deploy.connection lab lab.example.org:9093 --root-certificates certs/ca.crt
  python -m a2v_jax.deploy.connection loop 127.0.0.1:9093 --insecure

Writes the ``[superlink.NAME]`` table of ``$FLWR_HOME/config.toml`` (``~/.flwr`` without ``FLWR_HOME``), keeps
every other entry.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path
from typing import Optional

from a2v_jax.deploy.node import DeploymentError


def add_connection(name: str, address: str, root_certificates: Optional[str] = None,
                   insecure: bool = False) -> Path:
  """Writes the connection; returns the config file's path.

  Raises:
    DeploymentError: neither or both of ``root_certificates`` / ``insecure``, a certificate file that is
      missing or not a PEM certificate, an address without a port.
  """
  from flwr.cli.flower_config import read_flower_config, write_superlink_connection
  from flwr.cli.typing import SuperLinkConnection
  if (root_certificates is None) == (not insecure):
    raise DeploymentError("give the CA certificate the SuperLink's is signed by (--root-certificates ca.crt) or, "
                          "for a SuperLink started with --insecure, --insecure")
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DeploymentError(f"the SuperLink address must be HOST:PORT (its --port, 9093 by default), got {address!r}")
  cert = None
  if root_certificates is not None:
    path = Path(root_certificates).expanduser().resolve()
    if not path.is_file():
      raise DeploymentError(f"no CA certificate at {path} (a2v_jax/deploy/make_certs.sh writes ca.crt)")
    try:
      ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as e:
      raise DeploymentError(f"{path} is not a PEM certificate: {e}") from None
    cert = str(path)
  write_superlink_connection(SuperLinkConnection(name=name, address=address, root_certificates=cert,
                                                 insecure=True if insecure else None))
  return read_flower_config()[1]


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", help="the connection's name (flwr run APP NAME)")
  p.add_argument("address", help="the SuperLink's HOST:PORT")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--root-certificates", help="the CA certificate (ca.crt); stored as an absolute path")
  group.add_argument("--insecure", action="store_true", help="a SuperLink started with --insecure (no TLS)")
  args = p.parse_args(argv)
  try:
    path = add_connection(args.name, args.address, args.root_certificates, args.insecure)
  except DeploymentError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{path}: [superlink.{args.name}] address = {args.address!r}"
        + (" (insecure)" if args.insecure else f", root-certificates = {Path(args.root_certificates).resolve()}"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
