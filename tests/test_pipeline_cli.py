"""README's three commands in a row (train generators -> train heads -> generate), through the CLI, on the
embedded FSDD with three digits and very short schedules: the generate step writes one embeddings file per
node and one for the server, with the heads' shapes and every digit, and renders the server's file.
(That its embeddings land nearest their own class's text target more often than chance is tested on
separable data in tests/test_generate.py: these schedules are too short to learn FSDD.)"""

import json

import numpy as np

from a2v_jax import config
from a2v_jax.render import embeddings_io as eio
from a2v_jax import features as features_lib
from experiments import run as cli

CONFIGS = "experiments/configs"
DIGITS = ["zero", "one", "two"]
PER_CLASS = 2


def test_three_commands_train_generators_heads_then_generate(tmp_path, capsys):
  common = [f'output_dir="{tmp_path}/runs"', f'cache_dir="{tmp_path}/cache"',
            f'generator_checkpoint_dir="{tmp_path}/gens"', f"selected_classes={json.dumps(DIGITS)}"]
  sets = lambda *kv: [a for x in (*common, *kv) for a in ("--set", x)]
  steps = [
      [f"{CONFIGS}/fsdd_run1_generators.json", "global_rounds=1", "generator_training_epochs=2"],
      [f"{CONFIGS}/fsdd_tiny.json", "global_rounds=2", "eval_gap=0"],
      [f"{CONFIGS}/fsdd_generate.json", f'adapter_load_checkpoint="{tmp_path}/runs/fsdd_tiny"',
       f'synthetic_samples_per_class="{PER_CLASS}"', "generate_nodes_images_frequency=0"],
  ]
  for path, *kv in steps:
    assert cli.main(["--config", path, "--quiet", *sets(*kv)]) == 0, capsys.readouterr().err

  run = tmp_path / "runs" / "fsdd_generate"
  files = sorted(p.name for p in (run / "embeddings").iterdir())
  assert files == [f"node_{i}_embeddings_r2.safetensors" for i in range(5)] + ["server_embeddings_r2.safetensors"]
  cfg = config.load(f"{CONFIGS}/fsdd_tiny.json", common)
  targets = features_lib.text_targets(cfg, DIGITS, verbose=False)
  server = eio.load_embeddings(run / "embeddings" / "server_embeddings_r2.safetensors")
  assert len(server) == 5 * 3 * PER_CLASS  # every node holds every digit here (speaker nodes)
  for b, t in targets.items():
    assert server.embeddings[b].shape == (len(server),) + t.shape[1:]
  labels = np.array([DIGITS.index(c) for c in server.class_names])
  assert np.bincount(labels).tolist() == [5 * PER_CLASS] * 3
  for i in range(5):
    node = eio.load_embeddings(run / "embeddings" / f"node_{i}_embeddings_r2.safetensors")
    assert len(node) == 3 * PER_CLASS and node.node == i and set(node.splits) == {"synthetic"}
  summary = json.loads((run / "summary.json").read_text())
  assert summary["images"] == len(server)
  images = run / "images" / "server_embeddings_r2"
  assert len(list(images.glob("server_r2_*.png"))) == len(server)  # + one contact sheet per digit
  assert sorted(p.name for p in images.glob("sheet_*.png")) == [f"sheet_{d}.png" for d in sorted(DIGITS)]
