"""No accepted-but-ignored config key: every field of every config section is read by the code that uses it,
or refused (with a message naming it) wherever it would have no effect.

How it can fail: a new field that nothing reads, a reader removed by a refactor, or a refusal dropped.
"""

import dataclasses
import re
from pathlib import Path

import pytest

from a2v_jax import config
from a2v_jax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {p.relative_to(ROOT).as_posix(): p.read_text()
           for d in ("a2v_jax", "experiments") for p in (ROOT / d).rglob("*.py") if p.name != "config.py"}

# Read by name built at run time (per branch / per backbone kind): where, and the text that reads it.
DYNAMIC = {
    "clip_adapter_learning_rate": ("a2v_jax/federated/optim.py", 'getattr(t, f"{b}_adapter_learning_rate")'),
    "t5_adapter_learning_rate": ("a2v_jax/federated/optim.py", 'getattr(t, f"{b}_adapter_learning_rate")'),
    "clip_adapter_learning_rate_schedule": ("a2v_jax/federated/optim.py",
                                            'getattr(t, f"{b}_adapter_learning_rate_schedule")'),
    "t5_adapter_learning_rate_schedule": ("a2v_jax/federated/optim.py",
                                          'getattr(t, f"{b}_adapter_learning_rate_schedule")'),
    "clip_adapter_weight_decay": ("a2v_jax/federated/optim.py", 'getattr(cfg.train, f"{branch}_adapter_weight_decay")'),
    "t5_adapter_weight_decay": ("a2v_jax/federated/optim.py", 'getattr(cfg.train, f"{branch}_adapter_weight_decay")'),
    "sd_model": ("a2v_jax/backbones/paths.py", '"sd": "sd_model"'),
    "flux_model": ("a2v_jax/backbones/paths.py", '"flux": "flux_model"'),
    "clip_vision_model": ("a2v_jax/backbones/paths.py", '"clip": "clip_vision_model"'),
    "generator_condition": ("a2v_jax/generators/training.py", "generator_condition(cfg)"),
}
# Fields with no effect on the computation by design, and why.
DOCUMENTATION = {
    "description": "free text about the run; kept in config.json, never changes results (resumable)",
}
# Refused, with a message naming the key, in the settings where they would be ignored.
REFUSED = {
    "adapter_dropout": ["adapter_dropout=0.1"],
    "generator_load_checkpoint": ["generator_load_checkpoint=true"],  # only Run 2 restores generators
    "generator_condition": ['generator_condition="text"'],            # an unconditioned generator
    "t5_latents": ["t5_latents=5"],                                   # one latent per T5 token
    "use_generator": ["use_generator=true"],                          # neither Run 1 nor Run 2
    "global_model_train": ["global_model_train=true"],                # no generators to draw from
    "adapter_load_checkpoint": ['adapter_load_checkpoint="x"'],       # generate needs generators
    "server_synthetic_samples_per_class": ["server_synthetic_samples_per_class=40"],  # no generators
    # mode keys given where their mode is off (config.MODE_KEYS)
    **{k: [f"{k}=3"] for k in ("kd_training_epochs", "kd_samples_per_class", "generator_training_epochs",
                               "generator_batch_size")},
    **{k: [f"{k}=0.01"] for k in ("kd_learning_rate", "global_model_train_learning_rate", "generator_learning_rate",
                                  "generator_augmentation_noise")},
    "global_model_train_epochs": ["global_model_train_epochs=2"],
    "generator_augmentation": ["generator_augmentation=false"],
    "generator_kl_weight": ["generator_kl_weight=1.0"],  # Run 1 only
    "shared_generator_schedule": ['shared_generator_schedule="sequential"'],  # a shared Run 1 only
    **{k: [f"{k}=0.5"] for k in ("dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_clipped_count_stddev")},
    "dp_adaptive_clip": ["dp_adaptive_clip=true"],  # without dp_level 'node'
    "dp_target_quantile": ["dp_target_quantile=0.3"], "dp_clip_learning_rate": ["dp_clip_learning_rate=0.1"],
    "reset_generator_on_class_change": ["reset_generator_on_class_change=true"],  # can never fire here
}


def _fields():
  for section in dataclasses.fields(config.Config):
    for f in dataclasses.fields(getattr(config.Config(), section.name)):
      yield section.name, f.name


def test_every_config_field_is_read_or_documented():
  unread = []
  for section, name in _fields():
    if name in DYNAMIC:
      path, text = DYNAMIC[name]
      assert text in SOURCES.get(path, ""), f"{section}.{name}: {path} no longer reads it as {text!r}"
      continue
    if name in DOCUMENTATION or name in REFUSED:  # REFUSED: tested below
      continue
    if not any(re.search(rf"\.{name}\b", src) for src in SOURCES.values()):
      unread.append(f"{section}.{name}")
  assert not unread, f"config keys accepted but read nowhere outside config.py: {unread}"


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_keys_are_refused_where_they_would_be_ignored(key):
  for override in REFUSED[key]:
    with pytest.raises(ConfigError, match=f"'{key}'"):
      config.load(None, [override])


def test_the_lists_name_real_fields():
  names = {n for _, n in _fields()}
  assert set(DYNAMIC) | set(DOCUMENTATION) | set(REFUSED) <= names


def test_explicit_false_where_the_mode_needs_true_is_refused():
  run1 = ["use_generator=true", "generator_only_mode=true"]
  config.load(None, run1)  # generator_training_mode left unset: Run 1
  with pytest.raises(ConfigError, match="'generator_training_mode' is false but 'generator_only_mode'"):
    config.load(None, run1 + ["generator_training_mode=false"])
  run2 = ["use_pretrained_generators=true"]
  config.load(None, run2 + ["generator_load_checkpoint=true"])
  with pytest.raises(ConfigError, match="'generator_load_checkpoint' is false but 'use_pretrained_generators'"):
    config.load(None, run2 + ["generator_load_checkpoint=false"])
  # the same keys where their mode is on are accepted
  config.load(None, run1 + ["generator_training_epochs=3", "generator_learning_rate=0.01"])
  config.load(None, ['adapter_aggregation_mode="kd"', "use_pretrained_generators=true", "kd_training_epochs=3"])


def test_a_runs_saved_config_with_every_key_is_read_back():
  """config.json holds every key (kd_*, generator_* included): reading it back is not a user's choice of keys."""
  cfg = config.load("experiments/configs/fsdd_tiny.json")
  assert config.from_dict(cfg.to_dict()) == cfg
