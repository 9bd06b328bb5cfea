"""Federated state pytrees: the client axis leads every per-client leaf."""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax

from a2v_jax.types import OptState, Params


@flax.struct.dataclass
class ClientState:
  """Per-client state, every leaf with a leading client axis C.

  The optimiser state persists across rounds, as in the reference (its AdamW moments survive the
  load of the global weights).
  """
  params: Params
  opt_state: OptState
  rng: jax.Array
  # SCAFFOLD's client control variate (its mean gradient of the last round it took part in); None
  # unless ``local_drift_correction: scaffold``.
  control: Optional[Params] = None


@flax.struct.dataclass
class ServerState:
  """The global model and the server optimiser (FedAvg = server sgd(1.0) on the mean delta)."""
  params: Params
  opt_state: OptState
  round: jax.Array
  rng: jax.Array
  # SCAFFOLD's server control variate (the mean of the clients' ones); None unless scaffold.
  control: Optional[Params] = None
  # Node-level DP's clip (adapted each round with dp_adaptive_clip); None unless dp_level 'node'.
  clip: Optional[jax.Array] = None
