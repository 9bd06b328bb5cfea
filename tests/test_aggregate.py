import jax.numpy as jnp
import numpy as np
import pytest

from a2v_jax.federated import aggregate


def test_weighted_mean_matches_numpy():
  rs = np.random.RandomState(0)
  tree = {"a": rs.randn(4, 3, 2).astype(np.float32), "b": {"c": rs.randn(4, 5).astype(np.float32)}}
  w = np.array([1.0, 0.0, 3.0, 2.0], np.float32)
  got = aggregate.weighted_mean({k: jnp.asarray(v) if not isinstance(v, dict) else
                                 {kk: jnp.asarray(vv) for kk, vv in v.items()} for k, v in tree.items()},
                                jnp.asarray(w))
  np.testing.assert_allclose(got["a"], np.einsum("c,cij->ij", w, tree["a"]) / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(got["b"]["c"], (w[:, None] * tree["b"]["c"]).sum(0) / w.sum(), rtol=1e-6)


@pytest.mark.parametrize("mode", ["avg", "weighted"])
def test_client_weights(mode):
  counts = jnp.asarray([10, 0, 5, 7])
  part = jnp.asarray([True, True, False, True])
  w = np.asarray(aggregate.client_weights(mode, counts, part))
  expected = np.array([10, 0, 0, 7.0]) if mode == "weighted" else np.array([1, 0, 0, 1.0])
  np.testing.assert_array_equal(w, expected)


def test_select_and_broadcast():
  old = {"p": jnp.zeros((3, 2))}
  new = aggregate.broadcast({"p": jnp.ones((2,))}, 3)
  out = aggregate.select(jnp.asarray([True, False, True]), new, old)
  np.testing.assert_array_equal(out["p"], [[1, 1], [0, 0], [1, 1]])
