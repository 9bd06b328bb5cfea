"""Shared type aliases (one place, as optax does)."""

from typing import Any, Mapping

import jax

Params = Any          # a pytree of arrays
OptState = Any        # an optax state pytree
PRNGKey = jax.Array   # a typed or raw jax.random key
Metrics = Mapping[str, jax.Array]
Batch = Mapping[str, jax.Array]
