"""The client axis sharded over a 4-device mesh gives the same rounds as one device; memory plans
(``a2v_jax.federated.memory``: bytes per client, chunk choice, refusal before allocation) bound XLA's own figures.

The device count must be fixed before JAX starts, so the check runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; this file is also that subprocess's script.
Six real clients are padded to eight (a multiple of the device count): the padded clients hold no data,
so the sharded 8-client rounds must equal the unsharded 6-client rounds, not only the unsharded 8.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _problem(num_clients: int, extra: tuple[str, ...] = ()):
  import jax
  import jax.numpy as jnp

  from a2v_jax import config
  from a2v_jax.federated import engine
  from a2v_jax.models.heads import make_heads
  from experiments import scaling

  cfg = config.load(None, ['adapter_aggregation_mode="avg"', "local_epochs=2", "batch_size=4",
                           "clip_adapter_hidden=[16]", "t5_adapter_hidden=[16]", "map_heads=2", *extra])
  w = scaling.Workload(num_clients=num_clients, samples_per_client=6, batch_size=4, local_epochs=2, tokens=5,
                       feature_dim=8, target_shapes={"clip": (4,), "t5": (3, 8)}, num_classes=4)
  heads = make_heads(cfg, w.target_shapes)
  apply_fn = lambda p, x: heads.apply({"params": p}, x)
  init_fn = lambda k: heads.init(k, jnp.zeros((1, w.tokens, w.feature_dim)))["params"]
  alg = engine.fed_a2v(cfg, apply_fn, init_fn, steps=w.steps, num_clients=num_clients)
  init = jax.jit(lambda k: scaling.replicated_init(cfg, init_fn, num_clients, k))
  return cfg, w, alg, init


def child(real: int = 6, rounds: int = 3) -> None:
  """Runs in the 4-device subprocess: sharded (padded) vs one device (padded and unpadded)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from a2v_jax.federated import engine, sharding
  from a2v_jax.federated.local import Shared
  from experiments import scaling

  assert len(jax.devices()) == 4, jax.devices()
  mesh = sharding.client_mesh()
  padded = sharding.padded_clients(real, mesh)
  assert padded == 8
  cfg, w, alg, init = _problem(padded)
  data = scaling.synthetic_data(w)
  shared = Shared(jnp.asarray(data.features), jnp.asarray(data.labels),
                  {b: jnp.asarray(t) for b, t in data.targets.items()})
  rdata = scaling.round_data(w, data)
  rdata = rdata._replace(count=rdata.count.at[real:].set(0))  # padding clients: no data
  server0, clients0 = init(jax.random.PRNGKey(0))

  def run(alg, server, clients, rdata, shared):
    round_fn = jax.jit(alg.round)
    for _ in range(rounds):
      server, clients, _ = round_fn(server, clients, rdata, shared)
    return jax.device_get(server.params), jax.device_get(clients.params)

  one = run(alg, server0, clients0, rdata, shared)
  sharded_in = (sharding.replicate(server0, mesh), sharding.shard_clients(clients0, mesh),
                sharding.shard_clients(rdata, mesh), sharding.replicate(shared, mesh))
  assert len(sharded_in[1].params["clip"]["adapter"]["Dense_0"]["kernel"].sharding.device_set) == 4
  many = run(alg, *sharded_in)
  _, _, alg6, _ = _problem(real)
  take = lambda t: jax.tree.map(lambda x: x[:real], t)
  unpadded = run(alg6, server0, take(clients0), engine.RoundData(rdata.idx[:real], rdata.count[:real]), shared)
  for a, b, c in zip(jax.tree.leaves(one[0]), jax.tree.leaves(many[0]), jax.tree.leaves(unpadded[0])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(one[1]), jax.tree.leaves(many[1])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  start = jax.tree.leaves(jax.device_get(server0.params))
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one[0]), start))
  assert moved > 1e-4, "the rounds did not train"
  print("SHARDING-OK")


def test_sharded_rounds_equal_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "SHARDING-OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_memory_estimate_bounds_xla_and_refuses_before_allocating():
  import jax
  import numpy as np
  import pytest

  from a2v_jax.federated import memory
  from experiments import scaling
  cfg, w, alg, init = _problem(16)
  run = scaling.JaxRunner(cfg, w, scaling.synthetic_data(w), budget=1 << 40)  # compiles; allocates nothing
  fp = run.footprint
  server_params = jax.eval_shape(run.init, jax.random.PRNGKey(0))[0].params  # one client's shapes
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(server_params))
  assert fp.params == 4 * n_params
  assert 2 * fp.params <= fp.opt_state <= 2 * fp.params + 1024  # AdamW moments (+ counters)
  assert fp.activations > 0 and fp.batch == 4 * (w.batch_size * w.tokens * w.feature_dim + w.batch_size * (4 + 24))
  assert run.xla_bytes <= run.plan.estimated <= 2.5 * run.xla_bytes
  # A budget below one client's state at a time: refused with the numbers and the remedy.
  with pytest.raises(memory.MemoryPlanError, match="At most .* clients fit per process"):
    memory.plan(fp, 10_000, budget=fp.state * 100)
  # All at once does not fit, chunks do: the plan picks a chunk and stays within the budget.
  budget = memory.round_bytes(fp, 1000, 50)
  chunk = memory.choose_chunk(fp, 1000, budget)
  assert chunk is not None and 1 <= chunk < 1000 and memory.round_bytes(fp, 1000, chunk) <= budget
  assert memory.choose_chunk(fp, 10, 1 << 40) is None


@pytest.mark.parametrize("drift", ["none", "fedprox", "scaffold"])
def test_memory_estimate_counts_drift_corrections(drift):
  """FedProx's anchor and SCAFFOLD's controls are in the plan: it still bounds XLA's figure, all at once
  and in chunks (where SCAFFOLD keeps every client's old control for the server's update), and
  SCAFFOLD's persistent state is exactly one params pytree more than plain FedAvg's."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from a2v_jax.federated import memory
  from a2v_jax.federated import optim
  from experiments import scaling
  extra = (f'local_drift_correction="{drift}"', "fedprox_mu=0.1")
  # All at once without a drift correction is test_memory_estimate_bounds_xla_and_refuses_before_allocating's.
  for clients, chunk in ((48, 4),) + (((8, None),) if drift != "none" else ()):
    cfg, w, _, _ = _problem(clients, extra)
    run = scaling.JaxRunner(cfg, w, scaling.synthetic_data(w), budget=1 << 40, chunk=chunk)
    assert run.plan.chunk == chunk
    assert run.xla_bytes <= run.plan.estimated <= 2.0 * run.xla_bytes, (clients, chunk, run.plan.estimated,
                                                                        run.xla_bytes)
  fp, heads, token_shape = run.footprint, run.heads, (w.tokens, w.feature_dim)
  plain = memory.client_footprint(lambda p, x: heads.apply({"params": p}, x),
                                  lambda k: heads.init(k, jnp.zeros((1,) + token_shape))["params"],
                                  optim.client_optimizer(cfg), token_shape, w.batch_size, w.target_shapes)
  params = jax.eval_shape(run.init, jax.random.PRNGKey(0))[0].params  # one client's shapes
  params_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
  assert fp.state - plain.state == (params_bytes if drift == "scaffold" else 0)
  # While training: FedProx's anchor; SCAFFOLD's new control, gradient sum and correction.
  assert fp.working - plain.working == {"none": 0, "fedprox": 1, "scaffold": 3}[drift] * params_bytes
  # The refusal's "at most N clients" is the largest count whose one-at-a-time round fits.
  budget = memory.round_bytes(fp, 100, 1) - 1
  with pytest.raises(memory.MemoryPlanError, match="At most 99 clients fit per process") as err:
    memory.plan(fp, 1000, budget)
  assert ("SCAFFOLD control" in str(err.value)) == (drift == "scaffold")


def test_chunked_round_holds_one_copy_of_the_client_state():
  """In chunks, XLA's buffers hold the C clients' state about once (in place), not the 3 copies that
  ``lax.map``'s stacked outputs beside the donated inputs took; the plan still bounds XLA's figure."""
  from experiments import scaling
  cfg, w, _, _ = _problem(256)
  run = scaling.JaxRunner(cfg, w, scaling.synthetic_data(w), budget=1 << 40, chunk=16)
  fp, c = run.footprint, w.num_clients
  state = c * fp.state
  assert run.plan.chunk == 16
  assert state < run.xla_bytes <= run.plan.estimated
  # One state, the broadcast params, 16 clients' working sets and the shared arrays, with 25 % slack.
  assert run.xla_bytes < 1.25 * (state + c * fp.params + 16 * fp.working) + (1 << 20)


def test_largest_count_from_two_compiles():
  from a2v_jax.federated import memory
  calls = []

  def bytes_at(c):  # an affine "compiler": 100 MiB + 7 MiB per client
    calls.append(c)
    return (100 + 7 * c) << 20

  assert memory.largest_count(bytes_at, budget=1000 << 20) == (1000 - 100) // 7
  assert len(calls) == 3


if __name__ == "__main__" and sys.argv[1:] == ["child"]:
  child()
