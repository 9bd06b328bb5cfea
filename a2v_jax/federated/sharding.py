"""Placement of the client axis on a device mesh (several local devices, or several hosts).

The round function is written for one client axis; here it is laid over a ``Mesh`` axis named
``'clients'``. Shared read-only arrays (features, targets) are replicated. The client count is
padded to a multiple of the device count; padded clients hold no data and never participate.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def client_mesh(devices: Optional[list] = None) -> Optional[Mesh]:
  """A 1-D 'clients' mesh over all (global) devices; None on a single device."""
  devices = devices if devices is not None else jax.devices()
  if len(devices) <= 1:
    return None
  return Mesh(np.asarray(devices), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))


def padded_clients(num_clients: int, mesh: Optional[Mesh]) -> int:
  if mesh is None:
    return num_clients
  d = mesh.devices.size
  return -(-num_clients // d) * d


def shard_clients(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Places every leaf with its leading axis split over 'clients'."""
  if mesh is None:
    return tree
  s = NamedSharding(mesh, P("clients"))
  return jax.tree.map(lambda x: jax.device_put(x, s), tree)


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  if mesh is None:
    return tree
  s = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(x, s), tree)
