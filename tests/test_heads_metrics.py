import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2v_jax import config, metrics
from a2v_jax.models.heads import MAPBlock, count_params, make_heads


def test_reference_widths_match_spec_param_counts():
  # spec 2.4: clip chain ~14.5 M, t5 chain ~300 M (Voltron MAPBlock, 16 heads).
  cfg = config.load(None, ["clip_adapter_hidden=[1024,2048]", "t5_adapter_hidden=[1024,2048,2048]", "map_heads=16"])
  counts = count_params(make_heads(cfg, {"clip": (768,), "t5": (17, 4096)}), (1214, 768))
  adapter_clip = 768 * 1024 + 1024 + 1024 * 2048 + 2048 + 2048 * 768 + 768 + 2 * 768
  # MAPBlock: proj D^2+D, latents K*D, q D^2, kv 2D^2, out D^2+D, mlp_in 8D^2+8D, mlp_out 4D^2+D, 2 norms.
  d, k = 768, 1
  map_clip = 17 * d * d + d * (1 + k + 1 + 8 + 1 + 2)
  assert counts["clip"] == adapter_clip + map_clip
  assert 295e6 < counts["t5"] < 305e6


@pytest.mark.parametrize("dt, shapes", [("flux", {"clip": (8,), "t5": (3, 8)}), ("sd", {"clip": (5, 8)}),
                                        ("cogx", {"t5": (4, 8)})])
def test_heads_output_shapes(dt, shapes):
  cfg = config.load(None, [f'diffusion_type="{dt}"', "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
                           "map_heads=2"])
  heads = make_heads(cfg, shapes)
  p = heads.init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 6)))
  out = heads.apply(p, jnp.ones((2, 7, 6)))
  assert {k: v.shape for k, v in out.items()} == {k: (2,) + v for k, v in shapes.items()}


def test_missing_branch_is_an_error():
  cfg = config.load(None, ['diffusion_type="flux"'])
  with pytest.raises(ValueError, match="needs targets for branches"):
    make_heads(cfg, {"clip": (8,)})


def test_mapblock_mask_ignores_masked_tokens():
  m = MAPBlock(n_latents=2, embed_dim=8, n_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 8))
  p = m.init(jax.random.PRNGKey(1), x)
  mask = jnp.asarray([[1, 1, 1, 0, 0]])
  a = m.apply(p, x, mask)
  b = m.apply(p, x.at[:, 3:].set(100.0), mask)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_metrics_against_numpy():
  rs = np.random.RandomState(0)
  table = rs.randn(4, 6).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1, 0])
  pred = (table[labels] + 0.3 * rs.randn(6, 6)).astype(np.float32)
  pred[5] = table[2]  # a wrong one
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)[:6]
  m = metrics.branch_metrics(jnp.asarray(pred), jnp.asarray(labels), jnp.asarray(table), jnp.asarray(mask))
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  nearest = np.argmax(unit(pred) @ unit(table).T, 1)
  assert float(m["accuracy"]) == pytest.approx(np.mean(nearest == labels))
  mu = table.mean(0)
  cc = np.sum(unit(pred - mu) * unit(table[labels] - mu), 1).mean()
  assert float(m["centred_cosine"]) == pytest.approx(cc, rel=1e-5)
  mse = np.mean((pred - table[labels]) ** 2)
  assert float(m["mse"]) == pytest.approx(mse, rel=1e-5)
  assert float(m["nmse"]) == pytest.approx(mse / np.mean(table.var(0)), rel=1e-5)
  # Padding rows are ignored.
  m2 = metrics.branch_metrics(jnp.asarray(pred), jnp.asarray(labels), jnp.asarray(table),
                              jnp.asarray([1, 1, 1, 1, 1, 0.0]))
  assert float(m2["accuracy"]) == pytest.approx(np.mean((nearest == labels)[:5]))


def test_nearest_target_is_by_cosine_not_euclidean_distance():
  """A case where the two disagree: the prediction points along target 1 but lies closer to target 0."""
  table = np.array([[1.0, 0.0], [0.0, 10.0]], np.float32)
  pred = np.array([[0.1, 1.0], [5.0, 0.1]], np.float32)  # row 0: euclid -> 0, cosine -> 1; row 1: both -> 0
  labels = np.array([1, 0])
  assert np.argmin(np.linalg.norm(pred[0] - table, axis=1)) == 0  # Euclidean would pick target 0
  m = metrics.branch_metrics(jnp.asarray(pred), jnp.asarray(labels), jnp.asarray(table), jnp.ones((2,)))
  assert float(m["accuracy"]) == 1.0  # cosine picks 1 for row 0 and 0 for row 1
