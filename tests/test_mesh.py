"""The client axis sharded over 4 host CPU devices gives the single-device result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys
import jax
from a2v_jax import config
from a2v_jax.run.trainer import train_and_evaluate
from tests.fakes import synthetic_prepared
out = sys.argv[1]
cfg = config.load(None, ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
                         "map_heads=2", "num_nodes=3", "global_rounds=2", f'output_dir="{out}"', 'name="m"'])
s = train_and_evaluate(cfg, verbose=False, prepared=synthetic_prepared())
print(json.dumps({"devices": jax.device_count(), "final": s["final"]}))
"""


def _run(tmp_path, devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(ROOT))
  res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / f"d{devices}")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_four_devices_equal_one(tmp_path):
  one, four = _run(tmp_path, 1), _run(tmp_path, 4)
  assert (one["devices"], four["devices"]) == (1, 4)
  assert one["final"].keys() == four["final"].keys() and one["final"]
  for k, v in one["final"].items():
    np.testing.assert_allclose(four["final"][k], v, rtol=1e-4, atol=1e-5, err_msg=k)
