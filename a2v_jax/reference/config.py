"""Reads a reference fedgfe A2V JSON (``configs/a2v_*.json``) into our config keys.

Why a translator and not ``config.load``: a reference file means what fedgfe *did*
with it, not what its keys say. Its loader injected defaults for some missing keys
and turned every other missing key into ``None``, so e.g. a file without
``adapter_aggregation_mode`` ran without aggregation, and its model widths, AST input
length and Flux settings were hard-coded. This module therefore starts from the
reference's *effective* values, overlays the file, and accounts for every key:

* mapped: our field of the same or another name (``training.learning_rate`` ->
  ``kd_learning_rate``, ``generate_embeddings_only`` ->
  ``save_embeddings_instead_of_images``, ``wandb.disabled`` -> ``wandb``, ...);
* accepted but ignored: one warning each (fedgfe's legacy and unused keys, output
  folders, memory switches, per-node values we cannot express, ...);
* not honourable: a ConfigError naming the key (another algorithm or optimiser,
  a server "global model" training path, rendering from ground-truth embeddings, ...).

Keys starting with "_" are comments. The ``nodes`` section is returned as a list of
node dicts for :func:`a2v_jax.data.reference_nodes.reference_node_indices`, which
reproduces the reference's clip selection exactly; its common values (dataset,
split ratios, one-class-per-node layout) are also mapped to ``data`` keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from a2v_jax.config import FIELD_OWNER, Config, ConfigError, from_dict
from a2v_jax.data.scan import suggest
from a2v_jax.data.reference_nodes import DATA_KEYS, OTHER_KEYS

# Values fedgfe used when its file is silent (loader defaults, None-defaults that
# mean "off", and the model / feature settings its code hard-codes).
REFERENCE_DEFAULTS: dict[str, Any] = {
    "adapter_aggregation_mode": "none",  # None*: send/receive, no aggregation
    "clip_adapter_learning_rate": 1e-4, "clip_adapter_weight_decay": 1e-4,
    "t5_adapter_learning_rate": 1e-3, "t5_adapter_weight_decay": 1e-3,
    "clip_adapter_learning_rate_schedule": False, "t5_adapter_learning_rate_schedule": False,
    "optimizer_clip_gradients": False, "use_cls_token_only": False,
    "generate_nodes_images_frequency": 0, "generate_global_images_frequency": 0,
    "save_embeddings_instead_of_images": False,
    # An embeddings-only run saved every round unless told otherwise (its embeddings
    # writer read feda2v.get('embeddings_save_frequency', 1)); ours defaults to 0 (never), which lost them.
    "embeddings_save_frequency": 1,
    "use_generator": False, "generator_type": "vae", "use_conditioned_vae": False,
    "generator_granularity": "unified", "generator_augmentation": False,
    # fedgfe's clients saved their generators in Run 1 whatever generator_save_checkpoint said (that key
    # only gated a dead server-side save): a translated Run 1 keeps them too.
    "generator_save_checkpoint": True, "generator_load_checkpoint": False,
    "generator_checkpoint_frequency": 5,
    # Hard-coded VAE generator: MLP 1024 hidden, 256 latent, batch 1, lr 1e-2.
    "generator_hidden_dim": 1024, "generator_latent_dim": 256, "generator_batch_size": 1,
    "generator_learning_rate": 1e-2,
    # Hard-coded model and front-end.
    "clip_adapter_hidden": [1024, 2048], "t5_adapter_hidden": [1024, 2048, 2048],
    "map_heads": 8, "t5_latents": 17, "t5_max_length": 17,
    "sample_rate": 16000, "num_mel_bins": 128, "max_length": 1024,
    # Training-time evaluation: FLUX.1-schnell, 1 step, 1024^2.
    "num_inference_steps": 1, "guidance_scale": 0.0, "image_size": 1024,
}

# Local Hugging Face folders of the reference's checkpoints (fetched ahead of time).
REFERENCE_BACKBONES: dict[str, str] = {
    "ast_model": "weights/ast-finetuned-audioset-10-10-0.4593",
    "clip_text_model": "weights/clip-vit-large-patch14",
    "t5_model": "weights/t5-v1_1-xxl",
    "sd_model": "weights/stable-diffusion-v1-5",
    "flux_model": "weights/FLUX.1-schnell",
    "clip_vision_model": "weights/clip-vit-base-patch32",
}

_LEGACY = "legacy key, unused by fedgfe's A2V path"
# Keys accepted and ignored, with the reason given in the warning.
IGNORED: dict[str, str] = {
    **{k: _LEGACY for k in (
        "use_act_loss", "use_text_loss", "use_image_loss", "audio_model_name", "image_model_name",
        "img_pipe_name", "img_lcm_lora_id", "audio_pipe_name", "lr1", "lr2", "lr3", "steps", "mode",
        "ablation_type", "controllability_type", "target_img_path", "img_out_path", "audio_out_path",
        "class_to_activate", "single_class", "checkpoint_name", "project", "entity", "wandb_mode")},
    "num_clients": "the node count is the number of entries in 'nodes'",
    "join_ratio": "fedgfe trains every client every round",
    "use_saved_audio_embeddings": "AST features are always cached",
    "generate_images_frequency": "unused by fedgfe",
    "weight_decay": "training.weight_decay is unused (per-branch *_weight_decay keys apply)",
    "kd_learning_rate": "unused by fedgfe (KD uses training.learning_rate)",
    "adapters_learning_rate": "fallback for branches other than clip/t5, none exist",
    "adapters_weight_decay": "fallback for branches other than clip/t5, none exist",
    "adapters_learning_rate_schedule": "read, unused by fedgfe",
    "adapter_aggregation_method": "loader-injected, unused by fedgfe",
    "text_losses_summed": "hard-coded False in fedgfe",
    "store_audio_embeddings": "AST features are always cached",
    "audio_embedding_file_name": "AST features are always cached",
    "generate_low_memomy_footprint": "memory switch of the PyTorch pipeline",
    "images_output_dir": "images are written under the run directory",
    "output_image_base_name": "images are written under the run directory",
    "save_generated_images_splits": "evaluation splits are fixed",
    "nodes_train_metrics_splits": "evaluation splits are fixed",
    "nodes_test_metrics_splits": "evaluation splits are fixed",
    "server_test_metrics_splits": "evaluation splits are fixed",
    "server_train_metrics_splits": "evaluation splits are fixed",
    "generation_split_for_metrics": "read, unused by fedgfe",
    "global_model_train_inputs": "unused by fedgfe",
    "compute_global_mean_from_class_means": "used only with model_aggregation per_class_average",
    "train_adapters": "only gates fedgfe's evaluate() MSE metrics",
    "generator_validation_frequency": "server unified-generator validation is dead code in fedgfe",
    "adapter_checkpoint_per_type": "checkpoints hold the whole server state",
    "optimize_memory_usage": "memory switch of the PyTorch pipeline",
    "use_balooning": "memory switch of the PyTorch pipeline",
    "backbone_model": "model.backbone 'a2v' fixes the model",
    "pretrained": "model.backbone 'a2v' fixes the model",
    "path": "fedgfe hard-codes the dataset roots; pass dataset_root",
}
# Keys whose truthy value asks for something we do not do.
REJECT_IF_TRUE: dict[str, str] = {
    "generate_from_clip_text_embeddings": "rendering from ground-truth CLIP embeddings (an ablation)",
    "generate_from_t5_text_embeddings": "rendering from ground-truth T5 embeddings (an ablation)",
    "global_model_train_from_generator": "server global-model training from a unified generator (a path fedgfe "
                                         "never reached; a2v-jax trains the global heads on the nodes' synthetic "
                                         "features instead: 'global_model_train')",
    "global_model_train_from_nodes_audio_embeddings": "server global-model training (dead code)",
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "algorithm": ("FedA2V",), "optimizer": ("AdamW",), "backbone": ("a2v",),
    "model_aggregation": ("none",),
}
SECTIONS = ("experiment", "federation", "training", "feda2v", "model", "wandb", "dataset", "nodes")
IGNORED_SECTIONS = ("rewind", "fedgfe")
DATASETS = {"vegas": "vegas", "esc50": "esc50", "esc-50": "esc50", "vggsound": "vggsound"}
# Node keys mapped to a global field when every node agrees.
NODE_FIELDS = ("clip_adapter_learning_rate", "clip_adapter_weight_decay", "t5_adapter_learning_rate",
               "t5_adapter_weight_decay", "use_cls_token_only", "generator_granularity")
NODE_IGNORED = {
    "adapter_dropout": "unused by fedgfe",
    "dataset_split": "loader-injected", "pretext_tasks": "loader-injected",
    "task_type": "loader-injected", "balance_classes": "loader-injected",
    "use_folds": "read but not passed by fedgfe (all folds pooled)",
    "train_folds": "read but not passed by fedgfe (all folds pooled)",
    "test_folds": "read but not passed by fedgfe (all folds pooled)",
}


def _default(name: str) -> Any:
  return getattr(getattr(Config(), FIELD_OWNER[name]), name)


def _section_key(flat: dict, extra: dict, warnings: list, section: str, key: str, value: Any,
                 path: str) -> None:
  """Routes one ``section.key`` of the reference file into ``flat`` (or ``extra``)."""
  where = f"{section}.{key}"
  if key in REQUIRED:
    if value not in REQUIRED[key] and not (key == "model_aggregation" and value is None):
      raise ConfigError(f"reference config {path}: '{where}' is {value!r}; only "
                        f"{list(REQUIRED[key])} can be run")
    if key == "model_aggregation":
      warnings.append(f"'{where}' ignored: the global model is not aggregated by fedgfe's A2V")
    return
  if key in REJECT_IF_TRUE:
    if value:
      raise ConfigError(f"reference config {path}: '{where}' = {value!r} asks for "
                        f"{REJECT_IF_TRUE[key]}, which a2v-jax does not do")
    warnings.append(f"'{where}' ignored (off)")
    return
  if section == "wandb" and key == "disabled":
    flat["wandb"] = not bool(value)
  elif section == "dataset" and key == "name":
    extra["dataset"] = value
  elif section == "training" and key == "learning_rate":
    flat["kd_learning_rate"] = value  # fedgfe's server optimisers (KD) use it
  elif section == "experiment" and key == "seed":
    if value is None or (isinstance(value, int) and value < 0):
      warnings.append(f"'{where}' = {value!r} (no seeding in fedgfe); using seed 0")
      value = 0
    flat["seed"] = value
  elif key == "diffusion_type":
    if section == "federation":
      flat["diffusion_type"] = value
    else:
      warnings.append(f"'{where}' ignored: fedgfe reads federation.diffusion_type and the nodes'")
  elif key == "generate_embeddings_only":
    flat["save_embeddings_instead_of_images"] = value
  elif key == "generator_checkpoint_freq":
    flat["generator_checkpoint_frequency"] = value
  elif key == "generator_checkpoint_path":
    if value:
      flat["generator_checkpoint_dir"] = str(Path(value).parent)
      flat["generator_checkpoint_base_name"] = Path(value).stem
  elif key == "synthetic_samples_per_class":
    flat[key] = str(value)
  elif key in ("adapter_save_checkpoint", "adapter_checkpoint_frequency", "adapter_load_checkpoint",
               "adapter_checkpoint_dir", "adapter_checkpoint_base_name"):
    extra[key] = value  # resolved together in _adapter_checkpoints
  elif key in ("global_model_train_epochs", "global_model_train_learning_rate"):
    extra[key] = value  # kept only with global_model_train (read_reference_config), as fedgfe read it
  elif key in IGNORED:
    warnings.append(f"'{where}' ignored: {IGNORED[key]}")
  elif key in FIELD_OWNER:
    if value is None and _default(key) is not None:
      warnings.append(f"'{where}' is null (fedgfe falls back to None); using {_default(key)!r}")
    else:
      flat[key] = value
  else:
    raise ConfigError(f"reference config {path}: unknown key '{where}'{suggest(key, FIELD_OWNER)}")


def _node_list(raw: Any, path: str) -> list[dict[str, Any]]:
  if isinstance(raw, Mapping):
    items = list(raw.items())
    if all(str(k).isdigit() for k, _ in items):
      items.sort(key=lambda kv: int(kv[0]))
  elif isinstance(raw, list):
    items = [(str(i), n) for i, n in enumerate(raw)]
  else:
    raise ConfigError(f"reference config {path}: 'nodes' must be an object or a list")
  if not items:
    raise ConfigError(f"reference config {path}: 'nodes' is empty")
  nodes = []
  for key, node in items:
    if not isinstance(node, Mapping):
      raise ConfigError(f"reference config {path}: node '{key}' must be an object")
    node = {k: v for k, v in node.items() if not str(k).startswith("_")}
    unknown = sorted(set(node) - DATA_KEYS - OTHER_KEYS)
    if unknown:
      raise ConfigError(f"reference config {path}: node '{key}' has unknown keys {unknown}"
                        f"{suggest(unknown[0], DATA_KEYS | OTHER_KEYS)}")
    nodes.append({"node_id": str(key), **node})
  return nodes


def _common(nodes: list[dict], key: str, default: Any = None) -> tuple[bool, Any]:
  values = [n.get(key, default) for n in nodes]
  return all(v == values[0] for v in values), values[0]


def _apply_nodes(flat: dict, warnings: list, nodes: list[dict], dataset_section: Any,
                 path: str) -> None:
  """Maps what the nodes have in common to ``data``/optimiser keys; warns on the rest."""
  ids = ", ".join(n["node_id"] for n in nodes)
  names = {str(n.get("dataset", dataset_section)).lower() for n in nodes}
  if len(names) != 1 or next(iter(names)) not in DATASETS:
    raise ConfigError(f"reference config {path}: the nodes' datasets {sorted(names)} must be one of "
                      "VEGAS, ESC50, VGGSound (mixed-dataset runs are not supported)")
  dataset = DATASETS[names.pop()]
  flat["dataset"] = dataset
  flat["num_nodes"] = len(nodes)
  same, dt = _common(nodes, "diffusion_type")
  if not same or (dt is not None and flat.get("diffusion_type", dt) != dt):
    raise ConfigError(f"reference config {path}: nodes' diffusion_type "
                      f"{[n.get('diffusion_type') for n in nodes]} must all equal "
                      f"federation.diffusion_type {flat.get('diffusion_type')!r}")
  if dt is not None:
    flat["diffusion_type"] = dt
  if flat.get("diffusion_type") is None:
    raise ConfigError(f"reference config {path}: no diffusion_type (fedgfe needs it in "
                      "federation and in every node)")
  # Train/val/test ratios: VEGAS/ESC-50 take test = 1 - train - val; VGGSound its own.
  train_default = 0.7 if dataset == "vggsound" else 0.8
  split_keys = ["train_ratio", "val_ratio"] + (["test_ratio", "use_official_split"]
                                               if dataset == "vggsound" else [])
  defaults = {"train_ratio": train_default, "val_ratio": 0.1, "test_ratio": 0.2, "use_official_split": True}
  values = {}
  for key in split_keys:
    same, values[key] = _common(nodes, key, defaults[key])
    if not same:
      warnings.append(f"nodes' '{key}' differ ({[n.get(key) for n in nodes]}); per-node split ratios "
                      f"cannot be expressed, using node {nodes[0]['node_id']}'s {values[key]!r}")
  if dataset == "vggsound" and values["use_official_split"]:
    flat["split"] = "official"
  else:
    test = values.get("test_ratio", 1.0 - values["train_ratio"] - values["val_ratio"])
    flat.update(split="stratified", train_ratio=values["train_ratio"], val_ratio=values["val_ratio"],
                test_ratio=round(max(test, 0.0), 10))
  if dataset != "vggsound":
    for key in ("test_ratio", "use_official_split"):
      if any(key in n for n in nodes):
        warnings.append(f"nodes' '{key}' ignored: fedgfe reads it for VGGSound only")
  # Data selection: exact via reference_node_indices; mapped when it is a partition we have.
  classes = [n.get("selected_classes") for n in nodes]
  if all(isinstance(c, list) and all(isinstance(x, str) for x in c) for c in classes):
    flat["selected_classes"] = list(dict.fromkeys(x for c in classes for x in c))
  same_spn, spn = _common(nodes, "samples_per_node")
  if spn is not None and all(n.get("node_split_id") is None for n in nodes):
    warnings.append("nodes' 'samples_per_node' ignored: without 'node_split_id' fedgfe took every clip")
    spn = None
  same_seed, seed = _common(nodes, "node_split_seed", 42)
  one_class = (all(isinstance(c, list) and len(c) == 1 for c in classes)
               and len({c[0] for c in classes}) == len(nodes)
               and (spn is None or all(n.get("node_split_id") == 0 for n in nodes))
               and not any(k in n for n in nodes for k in ("excluded_classes", "num_samples_per_class",
                                                           "num_samples", "num_nodes")))
  if one_class and same_spn and same_seed:
    flat.update(partition="class", samples_per_node=spn, node_split_seed=seed)
  else:
    warnings.append(f"nodes {ids}: this node layout is not one of data.partition's schemes; "
                    "use the returned nodes with reference_node_indices to reproduce it")
    if same_spn and spn is not None:
      flat["samples_per_node"] = spn
    if same_seed:
      flat["node_split_seed"] = seed
  if dataset == "vegas" and any(not isinstance(c, list) or len(c) > 1 for c in classes):
    warnings.append("fedgfe's VEGAS collate used the first sample's target for the whole batch; set "
                    "reference_batch_target_bug=true to reproduce that on multi-class nodes")
  for key in NODE_FIELDS:
    present = [n for n in nodes if key in n]
    if not present:
      continue
    same, value = _common(nodes, key, flat.get(key, _default(key)))
    if same:
      flat[key] = value  # every node overrides the section value identically
    else:
      warnings.append(f"nodes' '{key}' differ ({[n.get(key) for n in nodes]}); per-node values "
                      f"cannot be expressed, using {flat.get(key, _default(key))!r} for every node")
  _node_generator_classes(flat, nodes, path)
  for key, why in NODE_IGNORED.items():
    holders = [n["node_id"] for n in nodes if key in n]
    if holders:
      warnings.append(f"node key '{key}' ignored on nodes {', '.join(holders)}: {why}")


def _adapter_checkpoints(flat: dict, extra: dict, warnings: list, path: str) -> None:
  """fedgfe's adapter files -> a run directory: ``{adapter_checkpoint_dir}/{adapter_checkpoint_base_name}``.

  fedgfe wrote each node's adapters as ``{dir}/{base}_node{i}_..._round_{r}.pt`` and its generate step read
  them back from the same two keys. Here a heads run checkpoints its whole state (server and every node) in
  its run directory, so the two keys name that directory: a saving run (``adapter_save_checkpoint``) is run
  there (``output_dir`` = dir, ``name`` = base), a loading one (``adapter_load_checkpoint``, the generate step)
  restores it. The same pair of keys in both files therefore links them, as it did in fedgfe.
  """
  where = os.path.join(extra.get("adapter_checkpoint_dir") or "checkpoints/adapters",
                       extra.get("adapter_checkpoint_base_name") or "adapter")
  saving, loading = bool(extra.get("adapter_save_checkpoint")), bool(extra.get("adapter_load_checkpoint"))
  if loading:
    flat["adapter_load_checkpoint"] = where
    if saving:
      warnings.append("'feda2v.adapter_save_checkpoint' ignored: a run that loads adapters trains none (fedgfe "
                      "skipped node training too)")
    return
  if saving:
    flat["checkpoint_frequency"] = extra.get("adapter_checkpoint_frequency", 5)
    flat["output_dir"], flat["name"] = os.path.split(where)
    warnings.append(f"adapter checkpoints: this run's directory is {where} (adapter_checkpoint_dir / "
                    "adapter_checkpoint_base_name); its state/ holds the server's and every node's heads")
  elif any(k in extra for k in ("adapter_checkpoint_frequency", "adapter_checkpoint_dir",
                                "adapter_checkpoint_base_name")):
    warnings.append("'feda2v.adapter_save_checkpoint' is off and nothing is loaded: adapter_checkpoint_dir / "
                    "_base_name / _frequency ignored (the server state is checkpointed every checkpoint_frequency "
                    "rounds in the run directory)")


def _generators_restored(flat: dict, warnings: list) -> None:
  """fedgfe's Run 2 switch (``use_generator`` + ``generator_load_checkpoint`` without training) is our
  ``use_pretrained_generators``."""
  training = flat.get("generator_training_mode") or flat.get("generator_only_mode")
  if flat.get("use_generator") and flat.get("generator_load_checkpoint") and not training:
    flat["use_pretrained_generators"] = True
  elif flat.get("generator_load_checkpoint") and training:
    raise ConfigError("reference config: 'generator_load_checkpoint' with 'generator_training_mode' continued a "
                      "Run 1 in fedgfe; here run the Run 1 config again with --resume instead")
  elif not flat.get("use_generator"):
    flat.pop("generator_load_checkpoint", None)


def _node_generator_classes(flat: dict, nodes: list[dict], path: str) -> None:
  """Per-node generator keys: ``generator_class_group`` (every class of the node belongs to that group) joins
  ``generator_class_groups``; ``generator_train_classes`` is honoured when it covers the node's classes (a node's
  generators train on every class it holds here) and refused otherwise."""
  groups = {k: list(v) for k, v in (flat.get("generator_class_groups") or {}).items()}
  owner = {c: g for g, cs in groups.items() for c in cs}
  for n in nodes:
    classes = n.get("selected_classes") or []
    train = n.get("generator_train_classes")
    if train is not None and not set(classes) <= set(train):
      raise ConfigError(f"reference config {path}: node '{n['node_id']}' has generator_train_classes {train} without "
                        f"its classes {sorted(set(classes) - set(train))}; a2v-jax trains a node's generators on "
                        "every class it holds (drop the key, or drop those classes from the node)")
    group = n.get("generator_class_group")
    if group is None:
      continue
    if not classes:
      raise ConfigError(f"reference config {path}: node '{n['node_id']}' names generator_class_group {group!r} "
                        "but no selected_classes to put in it")
    for c in classes:
      if owner.get(c, group) != group:
        raise ConfigError(f"reference config {path}: class {c!r} is in generator group {owner[c]!r} and, by node "
                          f"'{n['node_id']}', in {group!r}; a class belongs to one group")
      if c not in owner:
        owner[c] = group
        groups.setdefault(group, []).append(c)
  if groups:
    flat["generator_class_groups"] = groups


def _drop_unused_zeros(flat: dict, warnings: list) -> None:
  """Drops counts of 0 that fedgfe files set for features they switch off (our minimum is 1)."""
  training = flat.get("generator_training_mode") or flat.get("generator_only_mode")
  in_use = {"generator_training_epochs": training, "generator_batch_size": training,
            "kd_training_epochs": flat.get("adapter_aggregation_mode") == "kd"}
  for key, used in in_use.items():
    value = flat.get(key)
    if not used and isinstance(value, int) and value < 1:
      del flat[key]
      warnings.append(f"'{key}' = {value} ignored: what it sizes (generator training, KD) is off")


def read_reference_config(
    source: str | Path | Mapping[str, Any], *, dataset_root: Optional[str] = None,
    backbones: Optional[Mapping[str, str]] = None,
) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
  """Translates a reference fedgfe A2V config into our flat config keys.

  Args:
    source: a JSON file path or its already-parsed mapping.
    dataset_root: the dataset folder (fedgfe hard-coded its roots); None = keep our
      default, with a warning.
    backbones: backbone field -> local folder; None = ``REFERENCE_BACKBONES``.

  Returns:
    ``(flat, warnings, nodes)``: ``flat`` maps our field names to values and is
    accepted by ``a2v_jax.config.from_dict``; ``warnings`` has one line per key that
    is accepted but ignored (and per reference behaviour we do not copy); ``nodes``
    are the reference node dicts in node order, each with a ``node_id``, for
    ``reference_node_indices``.

  Raises:
    ConfigError: unreadable JSON, an unknown section or key, or a key whose value
      a2v-jax cannot honour (named in the message).
  """
  path = str(source) if not isinstance(source, Mapping) else "<dict>"
  if isinstance(source, Mapping):
    raw = dict(source)
  else:
    try:
      raw = json.loads(Path(source).read_text())
    except FileNotFoundError as e:
      raise ConfigError(f"reference config not found: {source}") from e
    except json.JSONDecodeError as e:
      raise ConfigError(f"reference config {source}:{e.lineno}: invalid JSON ({e.msg})") from e
  if not isinstance(raw, dict):
    raise ConfigError(f"reference config {path} must hold a JSON object")
  flat: dict[str, Any] = {**REFERENCE_DEFAULTS, **dict(backbones or REFERENCE_BACKBONES)}
  extra: dict[str, Any] = {}  # values needed after the pass (checkpoint switches, dataset name)
  warnings: list[str] = []
  nodes: list[dict[str, Any]] = []
  for section, body in raw.items():
    if section.startswith("_"):
      continue
    if section in IGNORED_SECTIONS:
      warnings.append(f"section '{section}' ignored: it configures another fedgfe algorithm")
      continue
    if section not in SECTIONS:
      raise ConfigError(f"reference config {path}: unknown section '{section}'"
                        f"{suggest(section, SECTIONS)}")
    if section == "nodes":
      nodes = _node_list(body, path)
      continue
    if not isinstance(body, Mapping):
      raise ConfigError(f"reference config {path}: section '{section}' must be an object")
    for key, value in body.items():
      if not key.startswith("_"):
        _section_key(flat, extra, warnings, section, key, value, path)
  if "adapter_aggregation_mode" not in raw.get("feda2v", {}):
    warnings.append("'feda2v.adapter_aggregation_mode' absent: fedgfe then did not aggregate "
                    "(DotDict None), so 'none' is used")
  _adapter_checkpoints(flat, extra, warnings, path)
  _generators_restored(flat, warnings)
  for key in ("global_model_train_epochs", "global_model_train_learning_rate"):
    if key in extra:
      if flat.get("global_model_train"):
        flat[key] = extra.pop(key)
      else:
        warnings.append(f"'feda2v.{key}' ignored: server global training is off ('global_model_train' false)")
  _drop_unused_zeros(flat, warnings)
  if flat.get("adapter_aggregation_mode") == "kd":
    warnings.append("fedgfe's KD distilled only the CLIP branch (its T5 stayed at random init); "
                    "a2v-jax distils every branch")
  if not nodes:
    raise ConfigError(f"reference config {path}: no 'nodes' section")
  _apply_nodes(flat, warnings, nodes, extra.get("dataset", ""), path)
  if dataset_root is not None:
    flat["dataset_root"] = dataset_root
  else:
    warnings.append("no dataset root in the reference config (fedgfe hard-coded it); set "
                    "'dataset_root'")
  warnings.append("fedgfe padded/truncated every clip to 5 s before AST; a2v-jax feeds whole clips "
                  "(truncated at max_length frames)")
  from_dict(sectioned(flat), where=f"reference config {path}")  # fail here if inconsistent
  return flat, warnings, nodes


def sectioned(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Groups flat field names by their section: our JSON config format.

  ``json.dumps(sectioned(flat))`` is a config file for ``a2v_jax.config.load``; it is
  also the unambiguous input for ``from_dict`` (the flat names ``dataset`` and
  ``wandb`` are also section names).
  """
  out: dict[str, dict[str, Any]] = {}
  for name, value in flat.items():
    if name not in FIELD_OWNER:
      raise ConfigError(f"unknown config key '{name}'{suggest(name, FIELD_OWNER)}")
    out.setdefault(FIELD_OWNER[name], {})[name] = value
  return out


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
  """A config file in either format: ours (sections ``experiment``, ``data``, ...), or a reference fedgfe JSON
  (``feda2v`` / ``nodes`` sections), translated (its warnings on stderr) with ``overrides`` applied on top.

  Why here and not in the CLI: every entry point (run, seeds, the Flower apps) reads configs the same way.
  """
  import sys
  from a2v_jax import config as config_lib
  raw = None
  if path is not None and Path(path).is_file():
    try:
      raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
      raw = None  # config_lib.load reports it
  if isinstance(raw, dict) and ("feda2v" in raw or isinstance(raw.get("nodes"), list)):
    flat, warnings, nodes = read_reference_config(path)
    for w in warnings:
      print(f"reference config: {w}", file=sys.stderr)
    flat.update(partition="reference", reference_nodes=nodes, num_nodes=len(nodes))
    for item in overrides:
      key, value = config_lib.parse_override(item)
      flat[key.split(".")[-1]] = value
    return config_lib.from_dict(flat, where=str(path))
  return config_lib.load(path, list(overrides))
