"""The scaling study's FLOP accounting: the analytic counts against the dots of the traced programs."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2v_jax import config
from a2v_jax.models.heads import make_heads
from benchmarks import summarize
from experiments import scaling


def _dot_flops(jaxpr) -> list[int]:
  """2 x multiply-adds of every dot_general in a jaxpr, sub-jaxprs included (an independent count)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      free_rhs = [n for i, n in enumerate(rhs) if i not in rc and i not in rb]
      out.append(2 * int(np.prod(lhs)) * int(np.prod(free_rhs)))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          out += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          out += _dot_flops(sub)
  return out


@pytest.mark.parametrize("diffusion,shapes", [("flux", {"clip": (32,), "t5": (17, 32)}), ("sd", {"clip": (77, 24)})])
def test_forward_flops_equal_the_traced_dots(diffusion, shapes):
  cfg = config.load("experiments/configs/fsdd_tiny.json", ["clip_adapter_hidden=[48, 40]", "t5_adapter_hidden=[56]",
                                                           f'diffusion_type="{diffusion}"'])
  heads = make_heads(cfg, shapes)
  b, t, d = 3, 11, 20
  x = jnp.zeros((b, t, d))
  params = jax.eval_shape(heads.init, jax.random.PRNGKey(0), x)["params"]
  dots = _dot_flops(jax.make_jaxpr(lambda p, x: heads.apply({"params": p}, x))(params, x).jaxpr)
  assert sum(dots) == b * scaling.forward_flops_per_sample(heads, t, d)
  dense = collections.Counter(2 * b * m * i * o for m, i, o in scaling.dense_shapes(heads, t, d))
  rest = collections.Counter(dots) - dense
  assert sum(rest.values()) == len(dots) - sum(dense.values())  # every Dense is one of the traced dots
  # What is left: the attention's scores and weighted values, 2 x B x K x T x D each, per branch.
  attention = collections.Counter(2 * b * (1 if len(s) == 1 else s[0]) * t * s[-1] for s in shapes.values()
                                  for _ in range(2))
  assert rest == attention


def test_step_shape_yardstick_computes_the_step_products():
  cfg = config.load("experiments/configs/fsdd_tiny.json")
  w = scaling.Workload(num_clients=2, samples_per_client=8, batch_size=4, local_epochs=1, tokens=9, feature_dim=16,
                       target_shapes={"clip": (32,), "t5": (17, 32)})
  heads = make_heads(cfg, w.target_shapes)
  run = scaling.StepShapesMatmulRunner(w, heads, target_flops=1e8, max_reps=5)
  run.setup()
  run.round(0)
  # XLA's own count of the jitted program against the runner's claim (rows = batch x rows per sample).
  cost = run.step.lower(run.args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] == pytest.approx(run.flops / run.reps, rel=1e-6)
  assert {m for m, _, _ in run.shapes} == {w.batch_size * w.tokens, w.batch_size, w.batch_size * 17}
  assert 1 <= run.reps <= 5


def test_summary_gives_both_yardstick_fractions():
  row = lambda backend, gs, gc: {"backend": backend, "clients": 10, "train_gflop_s": gs, "train_gflop_per_cpu_s": gc}
  jx = dict(row("jax", 60.0, 30.0), round_s=2.0, cpu_s_per_round=4.0, rounds_per_s=0.5, samples_per_s=100,
            compile_s=1.0, peak_rss_mb=10, loadavg_1min=1.0)
  table = summarize.markdown([jx, row("matmul", 200.0, 100.0), row("matmul@step", 100.0, 40.0)])
  last = table.splitlines()[-1].split("|")
  assert [c.strip() for c in last[-4:-2]] == ["30% (30%)", "60% (75%)"]
  assert len(last) == len(table.splitlines()[0].split("|"))
