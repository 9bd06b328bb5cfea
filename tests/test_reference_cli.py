"""A reference fedgfe JSON runs through our CLI: translated, warned, nodes reproduced exactly."""

import json

import numpy as np
import soundfile as sf

from a2v_jax.data.nodes import build_nodes
from a2v_jax.reference.config import load_config
from experiments.run import main


def _vegas_tree(root, classes=("baby_cry", "chainsaw"), clips=6):
  for c in classes:
    (root / c / "audios").mkdir(parents=True)
    (root / c / "img").mkdir()
    lines = ["YTID,start,end"]
    for i in range(clips):
      sf.write(root / c / "audios" / f"video_{i:05d}.wav", np.full(1600, 0.1, np.float32), 16000)
      (root / c / "img" / f"video_{i:05d}.jpg").write_bytes(b"jpg")
      lines.append(f"{c}{i},0,5")
    (root / c / "video_info.csv").write_text("\n".join(lines))


def _reference_json(path, samples_per_node=None):
  node = lambda c: {"dataset": "VEGAS", "selected_classes": [c], "diffusion_type": "flux",
                    **({"samples_per_node": samples_per_node, "node_split_id": 0} if samples_per_node else {})}
  path.write_text(json.dumps({
      "experiment": {"seed": 42}, "federation": {"algorithm": "FedA2V", "diffusion_type": "flux",
                                                 "global_rounds": 2, "local_epochs": 1},
      "training": {"optimizer": "AdamW", "batch_size": 2, "learning_rate": 0.001},
      "feda2v": {"adapter_aggregation_mode": "avg", "use_act_loss": False},
      "nodes": {"0": node("baby_cry"), "1": node("chainsaw")}}))


def test_reference_config_reproduces_its_nodes(tmp_path, capsys):
  _vegas_tree(tmp_path)
  _reference_json(tmp_path / "ref.json", samples_per_node=4)
  cfg = load_config(str(tmp_path / "ref.json"), [f'dataset_root="{tmp_path}"'])
  assert cfg.data.partition == "reference" and cfg.federation.global_rounds == 2
  assert cfg.federation.adapter_aggregation_mode == "avg"
  nodes = build_nodes(cfg)
  labels = nodes.clipset.labels
  for k, node in enumerate(nodes.nodes):
    idx = np.concatenate(list(node.values()))
    assert len(idx) == 4 and set(labels[idx]) == {nodes.clipset.class_names.index(["baby_cry", "chainsaw"][k])}
  assert "use_act_loss" in capsys.readouterr().err  # accepted-but-ignored keys are announced


def test_reference_config_dry_run(tmp_path, capsys):
  _vegas_tree(tmp_path)
  _reference_json(tmp_path / "ref.json")
  base = ["--config", str(tmp_path / "ref.json"), "--set", f'dataset_root="{tmp_path}"',
          "--set", f'tiny_dir="{tmp_path / "bb"}"', "--dry-run", "--quiet"]
  # The reference's real backbones are not here: all three are listed at once.
  assert main(base) == 1
  out = capsys.readouterr().out
  assert "3 problem(s)" in out and "ast-finetuned-audioset" in out
  tiny = [a for k in ("ast_model", "clip_text_model", "t5_model") for a in ("--set", f'{k}="tiny"')]
  assert main(base + tiny) == 0


def _run_translated(tmp_path, name, feda2v, capsys):
  _vegas_tree(tmp_path)
  _reference_json(tmp_path / f"{name}.json")
  ref = json.loads((tmp_path / f"{name}.json").read_text())
  ref["feda2v"].update(feda2v)
  ref["experiment"]["name"] = name
  (tmp_path / f"{name}.json").write_text(json.dumps(ref))
  small = ["clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2", "generator_hidden_dim=8",
           "generator_latent_dim=4", "generator_batch_size=4", "generator_training_epochs=1", "max_length=128"]
  argv = ["--config", str(tmp_path / f"{name}.json"), "--quiet"]
  for kv in [f'dataset_root="{tmp_path}"', f'tiny_dir="{tmp_path / "bb"}"', f'output_dir="{tmp_path / "runs"}"',
             f'cache_dir="{tmp_path / "cache"}"', 'ast_model="tiny"', 'clip_text_model="tiny"', 't5_model="tiny"',
             *small]:
    argv += ["--set", kv]
  assert main(argv) == 0, capsys.readouterr().err
  return tmp_path / "runs" / name


def test_translated_run1_keeps_its_generators_and_its_embeddings(tmp_path, capsys):
  """fedgfe's clients always saved their Run 1 generators, and an embeddings-only run saved every round unless
  told otherwise (embeddings_save_frequency 1): the translated config keeps both."""
  gens, emb = tmp_path / "gens", tmp_path / "emb"
  _run_translated(tmp_path, "ref_run1", {"use_generator": True, "generator_training_mode": True,
                                         "generator_checkpoint_dir": str(gens), "generate_embeddings_only": True,
                                         "embeddings_checkpoint_dir": str(emb)}, capsys)
  root = gens / "generator"  # generator_checkpoint_base_name's default
  rounds = sorted(p.name for p in root.iterdir() if p.name.startswith("round_"))
  assert rounds[-1] == "round_00002" and (root / "round_00002" / "manifest.json").is_file(), rounds
  names = sorted(p.name for p in emb.rglob("*.safetensors"))
  for r in (1, 2):
    assert f"server_embeddings_r{r}.safetensors" in names, names


def test_reference_sbatch_pipelines_run_one_after_another(tmp_path, capsys, monkeypatch):
  """The reference's sbatch pipelines (spec 5.7), as files shaped like its JSONs: train generators -> train
  adapters -> generate, and train generators -> kd. The adapter and generator checkpoint keys link the files
  as they did in fedgfe; each step reads what the one before it wrote."""
  _vegas_tree(tmp_path)
  monkeypatch.chdir(tmp_path)  # run directories at their default place (checkpoints/runs), here
  gens, adapters = str(tmp_path / "ckpt" / "generators"), str(tmp_path / "ckpt" / "adapters")
  gen_keys = {"generator_checkpoint_dir": gens, "generator_checkpoint_base_name": "vae_perclass",
              "generator_granularity": "per_class", "generator_type": "vae", "generator_training_sequence_length": 2}
  ad_keys = {"adapter_checkpoint_dir": adapters, "adapter_checkpoint_base_name": "vegas_sa"}
  steps = {
      "train_generator": ({"use_generator": True, "generator_training_mode": True, "generator_only_mode": True,
                           "generator_training_epochs": 1, "generator_checkpoint_freq": 1, **gen_keys}, 2),
      "train_adapters": ({"adapter_aggregation_mode": "none", "adapter_save_checkpoint": True,
                          "adapter_checkpoint_frequency": 1, **ad_keys}, 2),
      "generate": ({"adapter_aggregation_mode": "none", "adapter_load_checkpoint": True, "use_generator": True,
                    "generator_load_checkpoint": True, "synthetic_samples_per_class": 2,
                    "generate_embeddings_only": True, **ad_keys, **gen_keys}, 1),
      "kd": ({"adapter_aggregation_mode": "kd", "use_generator": True, "generator_load_checkpoint": True,
              "kd_training_epochs": 1, "kd_samples_per_class": 2, **gen_keys}, 2),
  }
  common = ["--quiet"]
  for kv in [f'dataset_root="{tmp_path}"', f'tiny_dir="{tmp_path / "bb"}"',
             f'cache_dir="{tmp_path / "cache"}"', 'ast_model="tiny"', 'clip_text_model="tiny"', 't5_model="tiny"',
             "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2", "generator_hidden_dim=8",
             "generator_latent_dim=4", "generator_batch_size=4", "max_length=128"]:
    common += ["--set", kv]
  for name, (feda2v, rounds) in steps.items():
    _reference_json(tmp_path / f"{name}.json")
    ref = json.loads((tmp_path / f"{name}.json").read_text())
    ref["feda2v"] = feda2v
    ref["federation"]["global_rounds"] = rounds
    ref["experiment"]["name"] = name
    (tmp_path / f"{name}.json").write_text(json.dumps(ref))
    assert main(["--config", str(tmp_path / f"{name}.json"), *common]) == 0, (name, capsys.readouterr().err)
    err = capsys.readouterr().err
    if name == "train_adapters":
      assert f"this run's directory is {adapters}/vegas_sa" in err
  gen_rounds = sorted(p.name for p in (tmp_path / "ckpt" / "generators" / "vae_perclass").glob("round_*"))
  assert gen_rounds[-1] == "round_00002", gen_rounds
  heads = tmp_path / "ckpt" / "adapters" / "vegas_sa"
  assert (heads / "summary.json").is_file() and sorted(p.name for p in (heads / "state").iterdir())
  made = sorted(p.name for p in (tmp_path / "checkpoints" / "runs" / "generate" / "embeddings").glob("*.safetensors"))
  assert made == ["node_0_embeddings_r2.safetensors", "node_1_embeddings_r2.safetensors"], made
  kd = [json.loads(line) for line in (tmp_path / "checkpoints" / "runs" / "kd" / "metrics.jsonl").read_text().splitlines()]
  assert len(kd) == 2 and all(np.isfinite(v) for row in kd for k, v in row.items() if k.startswith("server/kd"))
  assert any(k.startswith("server/kd") for k in kd[-1]), sorted(kd[-1])
