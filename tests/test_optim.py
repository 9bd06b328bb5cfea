"""Learning-rate schedules against torch's own schedulers, stepped with the reference's epoch index."""

import numpy as np
import pytest
import torch

from a2v_jax import config
from a2v_jax.federated import optim


def _torch_lrs(make_sched, lr0, epochs):
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([p], lr=lr0)
  sched = make_sched(opt)
  out = []
  for e in range(epochs):
    sched.step(e)  # the reference steps with an explicit epoch index (spec 3.4)
    out.append(opt.param_groups[0]["lr"])
  return np.array(out)


def _ours(cfg, branch, epochs):
  return np.array([float(optim.branch_schedules(cfg)[branch](e)) for e in range(epochs)])


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch deprecates the epoch argument
def test_reference_schedules_match_torch():
  cfg = config.load(None, ["local_epochs=5", "global_rounds=8", "clip_adapter_learning_rate_schedule=true",
                           "t5_adapter_learning_rate_schedule=true", "clip_adapter_learning_rate=0.001",
                           "t5_adapter_learning_rate=0.003"])
  cawr = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4, eta_min=1e-8),
                    1e-3, 40)
  np.testing.assert_allclose(_ours(cfg, "clip", 40), cawr, rtol=1e-5)
  cos = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=1e-6), 3e-3, 40)
  np.testing.assert_allclose(_ours(cfg, "t5", 40), cos, rtol=1e-5, atol=1e-9)


def test_cosine_decay_spans_the_whole_run():
  cfg = config.load(None, ["local_epochs=5", "global_rounds=8", "learning_rate_decay=\"cosine\"",
                           "clip_adapter_learning_rate=0.002"])
  lrs = _ours(cfg, "clip", 40)
  assert lrs[0] == pytest.approx(2e-3)
  assert lrs[20] == pytest.approx(1e-3, rel=1e-5)  # half-way through the 40 epochs
  assert np.all(np.diff(lrs) < 0) and 0 < lrs[-1] < 1e-5
  flat = _ours(config.load(None, ["local_epochs=5", "global_rounds=8"]), "t5", 40)
  assert np.all(flat == flat[0])


def _server_updates(overrides, pseudo_grads):
  tx = optim.server_optimizer(config.load(None, overrides))
  params = {"w": np.zeros(3, np.float32)}
  state, out = tx.init(params), []
  for g in pseudo_grads:
    u, state = tx.update({"w": g}, state, params)
    out.append(np.asarray(u["w"]))
  return out


def test_centralised_mode_ignores_the_server_optimiser():
  """The engine applies server_optimizer(cfg) to the mean client delta: centralised must just take it."""
  gs = [np.array([1.0, -2.0, 0.5], np.float32), np.array([0.5, 1.0, -1.0], np.float32)]
  for extra in (["server_momentum=0.9"], ['server_optimizer="adam"', "server_learning_rate=0.1"]):
    central = _server_updates(['adapter_aggregation_mode="centralised"', *extra], gs)
    np.testing.assert_allclose(central, [-g for g in gs])  # new params = the node's params
    fed = _server_updates(extra, gs)
    assert not np.allclose(fed[1], -gs[1])  # FedAvgM / FedAdam themselves do use it
  np.testing.assert_allclose(_server_updates(["server_momentum=0.9"], gs)[1], -(gs[1] + 0.9 * gs[0]), rtol=1e-6)
