"""pfl-research's own simulator on the population study's workload: run by ``benchmarks/pfl_side_by_side.py`` under
the Python of a separate environment holding ``pfl[pytorch]`` (it pins dp-accounting < 0.6, this project 0.6.0).

  PFL_PYTHON benchmarks/pfl_worker.py SPEC.json OUT.json

The model is the torch twin of the project's heads (``a2v_jax/reference/torch_baseline.py``, loaded by file so
that no JAX is imported): the same widths and parameter count. Each user's rows are drawn on demand from its id
(a pool of random feature rows, as the JAX side's ``client_rows``); pfl samples ``cohort`` users of
``population`` per central iteration, trains each with a fresh local AdamW (stateless, as the JAX side), sums their
model differences and applies them with the central SGD at learning rate 1 (FedAvg). Only pfl's training loop is
timed (a callback's clock between central iterations); evaluation is off.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _torch_baseline():
  spec = importlib.util.spec_from_file_location("torch_baseline", ROOT / "a2v_jax/reference/torch_baseline.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def main(spec_path: str, out_path: str) -> None:
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.callback.base import TrainingProcessCallback
  from pfl.data.dataset import Dataset
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import get_user_sampler
  from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
  from pfl.metrics import Weighted
  from pfl.model.pytorch import PyTorchModel

  s = json.loads(Path(spec_path).read_text())
  torch.set_num_threads(s["threads"])
  torch.manual_seed(s["seed"])
  tb = _torch_baseline()
  shapes = {b: tuple(v) for b, v in s["target_shapes"].items()}

  class Heads(tb.Heads):
    """The project's heads with pfl's two methods: the summed per-branch MSE to the class targets."""

    def __init__(self):
      super().__init__(s["feature_dim"], shapes, s["hidden"], s["n_heads"], s["mlp_ratio"])
      rng = np.random.default_rng(s["seed"])
      for b, shape in shapes.items():
        self.register_buffer(f"target_{b}", torch.from_numpy(rng.normal(size=(s["num_classes"], *shape))
                                                             .astype(np.float32)), persistent=False)

    def loss(self, x, y, eval=False):
      self.eval() if eval else self.train()
      out = self(x)
      return sum(torch.nn.functional.mse_loss(o, getattr(self, f"target_{b}")[y]) for b, o in out.items())

    @torch.no_grad()
    def metrics(self, x, y, eval=False):
      return {"loss": Weighted(float(self.loss(x, y, eval)) * len(x), len(x))}

  module = Heads()
  n_params = sum(p.numel() for p in module.parameters())
  rng = np.random.default_rng(s["seed"])
  pool = torch.from_numpy(rng.normal(size=(s["pool"], s["tokens"], s["feature_dim"])).astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, s["num_classes"], s["pool"]))
  n = s["samples_per_client"]

  def user(uid):
    rows = torch.from_numpy(np.random.default_rng([s["seed"], int(uid)]).integers(0, s["pool"], n))
    return Dataset(raw_data=[pool[rows], labels[rows]], user_id=uid)

  users = list(range(s["population"]))
  data = FederatedDataset(user, get_user_sampler("random", users))
  model = PyTorchModel(model=module, local_optimizer_create=torch.optim.AdamW,
                       central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
  times: list[float] = []

  class Clock(TrainingProcessCallback):
    def on_train_begin(self, *, model):
      times.append(time.perf_counter())
      return super().on_train_begin(model=model)

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      times.append(time.perf_counter())
      print(f"pfl round {central_iteration}: {times[-1] - times[-2]:.3f} s", flush=True)
      return False, type(aggregate_metrics)()

  cpu0 = time.process_time()
  FederatedAveraging().run(
      algorithm_params=NNAlgorithmParams(central_num_iterations=s["warmup"] + s["rounds"],
                                         evaluation_frequency=10 ** 9, train_cohort_size=s["cohort"],
                                         val_cohort_size=0),
      backend=SimulatedBackend(training_data=data, val_data=data),
      model=model,
      model_train_params=NNTrainHyperParams(local_learning_rate=s["learning_rate"], local_num_epochs=1,
                                            local_batch_size=s["batch_size"]),
      model_eval_params=NNEvalHyperParams(local_batch_size=s["batch_size"]),
      callbacks=[Clock()])
  cpu = time.process_time() - cpu0
  rounds = np.diff(times)[s["warmup"]:]
  Path(out_path).write_text(json.dumps({
      "backend": "pfl-research (torch)", "pfl": _version("pfl"), "torch": torch.__version__,
      "round_s": float(np.median(rounds)), "round_s_all": [float(r) for r in rounds],
      "cpu_s_per_round_incl_warmup": cpu / (s["warmup"] + s["rounds"]),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": int(n_params),
      "threads": torch.get_num_threads()}, indent=2))


def _version(name: str) -> str:
  from importlib.metadata import version
  return version(name)


if __name__ == "__main__":
  main(*sys.argv[1:3])
