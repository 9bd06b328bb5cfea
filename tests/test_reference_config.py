"""Reference (fedgfe) compatibility: its JSON configs, its node clip selection, our example configs."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from a2v_jax import config
from a2v_jax.config import ConfigError
from a2v_jax.data.records import Clip, ClipSet
from a2v_jax.data.reference_nodes import one_class_nodes, reference_node_indices
from a2v_jax.data.registry import DatasetError
from a2v_jax.data.vegas import VEGAS_CLASSES
from a2v_jax.reference.config import read_reference_config, sectioned

EXAMPLES = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _vegas_avg(num_nodes=10):
  """A reference config shaped like spec 8.3's ``a2v_vegas_10n_10c_400s_avg_5le_40gr.json``."""
  node = {"dataset": "VEGAS", "node_split_id": 0, "samples_per_node": 400, "node_split_seed": 42,
          "diffusion_type": "flux", "train_ratio": 0.8, "val_ratio": 0.1, "test_ratio": 0.1}
  return {
      "experiment": {"name": "federated_a2v_avg", "description": "FedAvg - VEGAS 10n",
                     "use_balooning": False, "optimize_memory_usage": True},
      "federation": {"algorithm": "FedA2V", "diffusion_type": "flux", "num_clients": 11,
                     "global_rounds": 40, "local_epochs": 5, "eval_gap": 1,
                     "model_aggregation": "none", "use_saved_audio_embeddings": False},
      "training": {"learning_rate": 0.001, "optimizer": "AdamW", "batch_size": 8,
                   "weight_decay": 0.0001},
      "feda2v": {
          "use_generator": False, "generator_type": "vae", "generator_granularity": "per_class",
          "_comment_adapter": "=== ADAPTER SETTINGS ===",
          "generator_checkpoint_dir": "checkpoints/generators/vegas", "generator_training_epochs": 0,
          "generator_augmentation": True, "generator_training_sequence_length": 1214,
          "adapter_checkpoint_dir": "checkpoints/adapters/vegas", "adapter_save_checkpoint": False,
          "adapter_checkpoint_frequency": 1, "adapter_aggregation_mode": "avg",
          "global_model_train": False, "t5_adapter_learning_rate": 0.003,
          "t5_adapter_weight_decay": 0.01, "clip_adapter_learning_rate": 0.001,
          "clip_adapter_weight_decay": 0.01, "adapters_learning_rate": 0.001,
          "clip_adapter_learning_rate_schedule": True, "t5_adapter_learning_rate_schedule": False,
          "generate_embeddings_only": False, "generate_nodes_images_frequency": 1,
          "generate_global_images_frequency": 1, "images_output_dir": "output_images/vegas",
          "nodes_test_metrics_splits": ["val"], "store_audio_embeddings": False,
          "use_act_loss": False},
      "nodes": {str(i): {**node, "selected_classes": [VEGAS_CLASSES[i]]} for i in range(num_nodes)},
      "model": {"backbone": "a2v", "backbone_model": "hf_vit", "pretrained": False},
      "dataset": {"name": "VEGAS", "path": "./data"},
      "wandb": {"disabled": False},
  }


def _write(tmp_path, raw):
  path = tmp_path / "a2v_ref.json"
  path.write_text(json.dumps(raw, indent=2))
  return path


# ---------------------------------------------------------------- reference JSON -> our keys


def test_reference_vegas_avg_maps_keys(tmp_path):
  flat, warnings, nodes = read_reference_config(_write(tmp_path, _vegas_avg()), dataset_root="data/VEGAS")
  expected = {
      "name": "federated_a2v_avg", "diffusion_type": "flux", "global_rounds": 40, "local_epochs": 5,
      "eval_gap": 1, "batch_size": 8, "kd_learning_rate": 0.001, "adapter_aggregation_mode": "avg",
      "clip_adapter_learning_rate": 0.001, "clip_adapter_weight_decay": 0.01,
      "t5_adapter_learning_rate": 0.003, "t5_adapter_weight_decay": 0.01,
      "clip_adapter_learning_rate_schedule": True, "generate_nodes_images_frequency": 1,
      "save_embeddings_instead_of_images": False, "wandb": True, "dataset": "vegas",
      "dataset_root": "data/VEGAS", "num_nodes": 10, "partition": "class", "samples_per_node": 400,
      "node_split_seed": 42, "split": "stratified", "train_ratio": 0.8, "val_ratio": 0.1,
      "selected_classes": list(VEGAS_CLASSES), "clip_adapter_hidden": [1024, 2048],
      "t5_adapter_hidden": [1024, 2048, 2048], "map_heads": 8, "t5_latents": 17, "max_length": 1024,
      "generator_granularity": "per_class", "generator_augmentation": True}
  assert {k: flat[k] for k in expected} == expected
  assert flat["test_ratio"] == pytest.approx(0.1)
  cfg = config.from_dict(sectioned(flat))
  assert cfg.federation.adapter_aggregation_mode == "avg" and cfg.data.num_nodes == 10
  assert cfg.train.t5_adapter_learning_rate == 0.003 and cfg.heads.t5_adapter_hidden == (1024, 2048, 2048)
  # One warning per accepted-but-ignored key; comments are silent.
  for key in ("experiment.use_balooning", "experiment.optimize_memory_usage", "federation.num_clients",
              "federation.model_aggregation", "training.weight_decay", "feda2v.images_output_dir",
              "feda2v.adapters_learning_rate", "feda2v.use_act_loss",
              "feda2v.nodes_test_metrics_splits", "model.backbone_model", "dataset.path",
              "feda2v.adapter_save_checkpoint"):
    assert sum(key in w for w in warnings) == 1, (key, warnings)
  assert not any("_comment" in w for w in warnings)
  assert [n["node_id"] for n in nodes] == [str(i) for i in range(10)]
  assert nodes[3]["selected_classes"] == ["drum"] and nodes[3]["samples_per_node"] == 400


def test_reference_absent_keys_take_reference_effective_values(tmp_path):
  raw = _vegas_avg(2)
  for key in ("adapter_aggregation_mode", "clip_adapter_learning_rate", "t5_adapter_weight_decay",
              "generator_granularity", "generator_augmentation"):
    del raw["feda2v"][key]
  flat, warnings, _ = read_reference_config(raw)
  # DotDict None -> no aggregation; loader-injected defaults otherwise.
  assert flat["adapter_aggregation_mode"] == "none"
  assert any("adapter_aggregation_mode' absent" in w for w in warnings)
  assert flat["clip_adapter_learning_rate"] == 1e-4 and flat["t5_adapter_weight_decay"] == 1e-3
  assert flat["generator_granularity"] == "unified" and flat["generator_augmentation"] is False
  assert any("dataset root" in w for w in warnings)


def test_reference_node_overrides(tmp_path):
  raw = _vegas_avg(3)
  for n in raw["nodes"].values():
    n["clip_adapter_learning_rate"] = 0.005
    n["adapter_dropout"] = 0.1
  raw["nodes"]["1"]["t5_adapter_learning_rate"] = 0.01
  flat, warnings, _ = read_reference_config(raw)
  assert flat["clip_adapter_learning_rate"] == 0.005  # every node overrides identically
  assert flat["t5_adapter_learning_rate"] == 0.003
  assert any("'t5_adapter_learning_rate' differ" in w for w in warnings)
  assert any("'adapter_dropout' ignored on nodes 0, 1, 2" in w for w in warnings)


def test_reference_multi_slice_layout_keeps_nodes(tmp_path):
  raw = _vegas_avg(2)
  raw["nodes"]["0"]["selected_classes"] = ["dog"]
  raw["nodes"]["1"].update(selected_classes=["dog"], node_split_id=1)
  flat, warnings, nodes = read_reference_config(raw)
  assert "partition" not in flat and flat["samples_per_node"] == 400
  assert any("reference_node_indices" in w for w in warnings)
  assert [n["node_split_id"] for n in nodes] == [0, 1]


def test_reference_samples_per_node_needs_split_id(tmp_path):
  raw = _vegas_avg(2)
  for n in raw["nodes"].values():
    del n["node_split_id"]
  flat, warnings, _ = read_reference_config(raw)
  # fedgfe sliced only with a node_split_id: without it every clip of the class is used.
  assert flat["partition"] == "class" and flat["samples_per_node"] is None
  assert any("without 'node_split_id'" in w for w in warnings)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["federation"].update(algorithm="FedAvg"), "'federation.algorithm' is 'FedAvg'"),
    (lambda r: r["training"].update(optimizer="SGD"), "'training.optimizer' is 'SGD'"),
    (lambda r: r["federation"].update(model_aggregation="per_class_average"), "federation.model_aggregation"),
    (lambda r: r["feda2v"].update(generate_from_t5_text_embeddings=True), "ground-truth T5"),
    (lambda r: r["feda2v"].update(adapter_load_checkpoint=True), "adapter_load_checkpoint"),
    (lambda r: r["feda2v"].update(clip_adaptr_learning_rate=1e-3),
     "unknown key 'feda2v.clip_adaptr_learning_rate' .*did you mean 'clip_adapter_learning_rate'"),
    (lambda r: r.update(rewindd={}), "unknown section 'rewindd'"),
    (lambda r: r["nodes"]["1"].update(sample_per_node=3), "node '1' has unknown keys \\['sample_per_node'\\]"),
    (lambda r: r["nodes"]["1"].update(diffusion_type="sd"), "diffusion_type"),
    (lambda r: r["nodes"]["1"].update(dataset="ESC50"), "mixed-dataset"),
    (lambda r: r["feda2v"].update(adapter_aggregation_mode="median"), "adapter_aggregation_mode"),
    (lambda r: r.pop("nodes"), "no 'nodes' section"),
])
def test_reference_errors(tmp_path, edit, message):
  raw = _vegas_avg(2)
  edit(raw)
  with pytest.raises(ConfigError, match=message):
    read_reference_config(_write(tmp_path, raw))


def test_reference_bad_json(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{\n "experiment": {},\n}')
  with pytest.raises(ConfigError, match=r"bad.json:3: invalid JSON"):
    read_reference_config(path)


# ---------------------------------------------------------------- node clip selection


def _clipset(per_class=(25, 25, 25)):
  """VEGAS-named clips, stored in a scrambled order (selection must sort by clip id)."""
  clips = [Clip(path=f"{VEGAS_CLASSES[c]}/{i}.wav", label=c, group=f"g{c}{i}",
                clip_id=f"{VEGAS_CLASSES[c]}/video_{i:05d}")
           for c, n in enumerate(per_class) for i in range(n)]
  order = np.random.default_rng(0).permutation(len(clips))
  return ClipSet("vegas", VEGAS_CLASSES, tuple(clips[i] for i in order))


def _expected(cs, classes, seed, start, stop):
  """The reference's procedure on Python lists: sort by video id, shuffle, slice."""
  rng = np.random.RandomState(seed)
  out = []
  for name in classes:
    ids = sorted(c.clip_id for c in cs.clips if cs.class_names[c.label] == name)
    rng.shuffle(ids)
    out += ids[start:stop]
  return out


def _ids(cs, idx):
  return [cs.clips[i].clip_id for i in idx]


def test_node_slices_match_reference_procedure():
  cs = _clipset()
  nodes = [{"node_id": "a", "selected_classes": ["dog"], "node_split_id": 1, "samples_per_node": 10},
           # Multi-class node: the RandomState carries over from class to class, label order.
           {"node_id": "b", "selected_classes": ["chainsaw", "baby_cry"], "node_split_id": 0,
            "samples_per_node": 7, "node_split_seed": 3}]
  a, b = reference_node_indices(cs, nodes)
  assert _ids(cs, a) == _expected(cs, ["dog"], 42, 10, 20)
  assert _ids(cs, b) == _expected(cs, ["baby_cry", "chainsaw"], 3, 0, 7)


def test_one_class_nodes_layout():
  cs = _clipset()
  nodes = one_class_nodes(VEGAS_CLASSES[:3], samples_per_node=5, dataset="VEGAS")
  parts = reference_node_indices(cs, nodes)
  assert [len(p) for p in parts] == [5, 5, 5]
  assert [set(cs.labels[p].tolist()) for p in parts] == [{0}, {1}, {2}]
  assert all(_ids(cs, p) == _expected(cs, [VEGAS_CLASSES[k]], 42, 0, 5) for k, p in enumerate(parts))


def test_num_nodes_and_num_samples_per_class():
  cs = _clipset()
  nodes = [{"selected_classes": ["drum"], "node_split_id": k, "num_nodes": 3} for k in range(3)]
  cs = _clipset((25, 25, 25, 25))
  parts = reference_node_indices(cs, nodes)
  assert [len(p) for p in parts] == [9, 8, 8]  # remainder to the first ids
  assert sorted(np.concatenate(parts).tolist()) == np.flatnonzero(cs.labels == 3).tolist()
  (first,) = reference_node_indices(cs, [{"num_samples_per_class": 4, "excluded_classes": ["dog"]}])
  in_order = [np.flatnonzero(cs.labels == c)[:4] for c in (0, 1, 3)]  # dataset order, no shuffle
  assert first.tolist() == np.concatenate(in_order).tolist()


@pytest.mark.parametrize("nodes, message", [
    ([{"selected_classes": ["dog", "cat", "helicoptr"]}],
     r"node '0' selected_classes: unknown classes 'cat', 'helicoptr' \(did you mean 'helicopter'\?\)"),
    ([{"node_id": "n1", "selected_classes": ["dog"]}, {"node_id": "n2", "selected_classes": ["dog"]}],
     r"nodes 'n1' and 'n2' share 25 clips"),
    ([{"selected_classes": ["dog"], "node_split_id": 2, "samples_per_node": 10}],
     r"class 'dog' has 25 clips, not enough .*needs 30"),
    ([{"selected_classes": ["dog"], "sample_per_node": 10}], r"unknown node keys \['sample_per_node'\]"),
    ([{"dataset": "ESC50"}], "node dataset 'ESC50' is not this dataset"),
    ([{"node_split_id": 0, "samples_per_node": 1, "num_nodes": 2}], "not both"),
    ([{"selected_classes": ["dog"], "excluded_classes": ["dog"]}], "selects no class"),
    ([{"selected_classes": ["drum"]}], r"classes \['drum'\] have no clips"),
])
def test_node_errors(nodes, message):
  with pytest.raises(DatasetError, match=message):
    reference_node_indices(_clipset(), nodes)


def test_reference_config_nodes_feed_node_selection(tmp_path):
  raw = _vegas_avg(3)
  for n in raw["nodes"].values():
    n["samples_per_node"] = 6
  _, _, nodes = read_reference_config(copy.deepcopy(raw))
  parts = reference_node_indices(_clipset(), nodes)
  assert [len(p) for p in parts] == [6, 6, 6]


# ---------------------------------------------------------------- shipped example configs


@pytest.mark.parametrize("name", ["vegas_flux_10n", "esc50_sd", "vggsound_flux"])
def test_example_configs_load(name):
  cfg = config.load(EXAMPLES / f"{name}.json")
  assert cfg.experiment.description and cfg.experiment.name == name
  assert cfg.data.dataset == name.split("_")[0]


def test_vegas_example_has_reference_shape():
  cfg = config.load(EXAMPLES / "vegas_flux_10n.json")
  h, t, f, d = cfg.heads, cfg.train, cfg.federation, cfg.data
  assert (h.diffusion_type, h.clip_adapter_hidden, h.t5_adapter_hidden, h.map_heads) == (
      "flux", (1024, 2048), (1024, 2048, 2048), 8)
  assert (t.batch_size, t.local_epochs, f.global_rounds, f.adapter_aggregation_mode) == (8, 5, 40, "avg")
  assert (t.clip_adapter_learning_rate, t.clip_adapter_weight_decay) == (1e-3, 0.01)
  assert (t.t5_adapter_learning_rate, t.t5_adapter_weight_decay) == (3e-3, 0.01)
  assert (d.num_nodes, d.partition, d.samples_per_node, cfg.features.max_length) == (10, "class", 400, 1024)


def test_reference_run2_server_training_keys_are_translated():
  """The reference's Run 2 keys (global training, from the nodes' adapters, the output token count) map to what
  a2v-jax does with them; the epochs are kept only where global training is on."""
  raw = _vegas_avg(2)
  raw["feda2v"].update(use_pretrained_generators=True, generator_load_checkpoint=True, global_model_train=True,
                       global_model_train_from_nodes_adapters=True, global_model_train_epochs=3,
                       generator_output_sequence_length=1214)
  flat, warnings, _ = read_reference_config(raw)
  cfg = config.from_dict(sectioned(flat))
  f = cfg.federation
  assert f.global_model_train and f.global_model_train_from_nodes_adapters and f.global_model_train_epochs == 3
  assert cfg.generators.generator_output_sequence_length == 1214
  raw["feda2v"].update(global_model_train=False, global_model_train_from_nodes_adapters=False)
  flat, warnings, _ = read_reference_config(raw)
  assert "global_model_train_epochs" not in flat
  assert any("'feda2v.global_model_train_epochs' ignored: server global training is off" in w for w in warnings)


def test_reference_adapter_checkpoint_keys_link_a_heads_run_to_its_generate_step():
  """fedgfe's adapter files lived at {adapter_checkpoint_dir}/{base}_node...: the heads run's directory is
  that path here, and a loading config (generate) restores it; its Run 2 switch is use_pretrained_generators."""
  raw = _vegas_avg(2)
  raw["feda2v"].update(adapter_save_checkpoint=True, adapter_checkpoint_frequency=2,
                       adapter_checkpoint_base_name="sa")
  flat, warnings, _ = read_reference_config(raw)
  assert (flat["output_dir"], flat["name"], flat["checkpoint_frequency"]) == ("checkpoints/adapters/vegas", "sa", 2)
  assert any("this run's directory is checkpoints/adapters/vegas/sa" in w for w in warnings)
  raw["feda2v"].update(adapter_load_checkpoint=True, use_generator=True, generator_load_checkpoint=True)
  flat, warnings, _ = read_reference_config(raw)
  cfg = config.from_dict(sectioned(flat))
  assert cfg.federation.adapter_load_checkpoint == "checkpoints/adapters/vegas/sa"
  assert cfg.generators.use_pretrained_generators and cfg.experiment.name == "federated_a2v_avg"
  assert any("adapter_save_checkpoint' ignored: a run that loads adapters" in w for w in warnings)
  raw["feda2v"].update(generator_training_mode=True)
  with pytest.raises(ConfigError, match="--resume"):
    read_reference_config(raw)


def test_reference_node_generator_keys():
  """Per-node generator_class_group joins generator_class_groups; generator_train_classes that would leave out
  one of the node's classes is refused (no longer dropped with a warning)."""
  raw = _vegas_avg(3)
  raw["feda2v"].update(generator_granularity="per_group")
  for i, g in enumerate(("animals", "animals", "machines")):
    raw["nodes"][str(i)]["generator_class_group"] = g
    raw["nodes"][str(i)]["generator_train_classes"] = [VEGAS_CLASSES[i], "extra"]
  flat, _, _ = read_reference_config(raw)
  groups = config.from_dict(sectioned(flat)).generators.generator_class_groups
  assert groups == {"animals": list(VEGAS_CLASSES[:2]), "machines": [VEGAS_CLASSES[2]]}
  raw["feda2v"]["generator_class_groups"] = {"machines": [VEGAS_CLASSES[0]]}
  with pytest.raises(ConfigError, match="a class belongs to one group"):
    read_reference_config(raw)
  del raw["feda2v"]["generator_class_groups"]
  raw["nodes"]["1"]["generator_train_classes"] = ["extra"]
  with pytest.raises(ConfigError, match=f"node '1' has generator_train_classes .*{VEGAS_CLASSES[1]}"):
    read_reference_config(raw)
