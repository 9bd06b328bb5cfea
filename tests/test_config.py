import json

import pytest

from a2v_jax import config
from a2v_jax.config import ConfigError


def test_defaults_and_overrides():
  cfg = config.load(None, ["global_rounds=3", "federation.join_ratio=0.5", "feda2v.clip_adapter_learning_rate=0.02"])
  assert cfg.federation.global_rounds == 3
  assert cfg.federation.join_ratio == 0.5
  assert cfg.train.clip_adapter_learning_rate == 0.02
  assert config.load(None).federation.global_rounds == config.FederationConfig().global_rounds


def test_reference_sections_are_routed(tmp_path):
  p = tmp_path / "c.json"
  p.write_text(json.dumps({"federation": {"global_rounds": 2}, "feda2v": {"t5_adapter_learning_rate": 0.003,
                                                                         "generator_granularity": "unified"},
                           "training": {"batch_size": 4}}))
  cfg = config.load(p)
  assert (cfg.federation.global_rounds, cfg.train.t5_adapter_learning_rate, cfg.train.batch_size,
          cfg.generators.generator_granularity) == (2, 0.003, 4, "unified")


@pytest.mark.parametrize("override, message", [
    ("global_round=3", "did you mean 'global_rounds'"),
    ('partition="speakers"', "choose one of"),
    ("batch_size=true", "expected an integer"),
    ("heads.global_rounds=2", "belongs to section 'federation'"),
    ("join_ratio=0", "join_ratio"),
    ('prompt_template="no placeholder"', "prompt_template"),
    ('adapter_aggregation_mode="kd"', "needs generators"),
    ("use_pretrained_generators=true", None),
    ("adapter_dropout=0.1", "dropout is not applied"),
    ("map_latents_init_std=0", "map_latents_init_std"),
    ('learning_rate_decay="linear"', "choose one of"),
])
def test_bad_values_name_the_key(override, message):
  if message is None:  # valid alone
    config.load(None, [override])
    return
  with pytest.raises(ConfigError, match=message):
    config.load(None, [override])


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    config.load(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ConfigError, match="not valid JSON"):
    config.load(bad)
  unknown = tmp_path / "u.json"
  unknown.write_text(json.dumps({"train": {"local_epoch": 2}}))
  with pytest.raises(ConfigError, match="train.local_epoch.*local_epochs"):
    config.load(unknown)


def test_shipped_configs_load():
  import pathlib
  files = sorted(pathlib.Path("experiments/configs").glob("*.json"))
  assert files
  for f in files:
    cfg = config.load(f)
    assert cfg.experiment.description, f"{f} has no description"


def test_hash_changes_with_content():
  a, b = config.load(None), config.load(None, ["seed=1"])
  assert a.hash() != b.hash() and a.hash() == config.load(None).hash()


def test_conditioned_generators_default_to_the_text_condition():
  """Seed 001's cVAE is conditioned on the class text embedding; one-hot stays as its own value, and a
  condition for an unconditioned generator is refused (it would be ignored)."""
  from a2v_jax.config import generator_condition
  assert generator_condition(config.load(None, ['generator_type="cvae"']).generators) == "text"
  assert generator_condition(config.load(None, ["use_conditioned_vae=true"]).generators) == "text"
  assert generator_condition(config.load(None, ['generator_type="cvae"', 'generator_condition="onehot"']
                                         ).generators) == "onehot"
  assert generator_condition(config.load(None, []).generators) is None
  with pytest.raises(ConfigError, match="'generator_condition' is 'onehot' but the generator is unconditioned"):
    config.load(None, ['generator_condition="onehot"'])
