"""Typed run configuration: one dataclass per section, JSON loading, validation.

Why this shape: the reference (fedgfe) read a JSON file through a ``DotDict`` whose
missing keys silently became ``None``, so code-level defaults were ignored (spec
item 17). Here every default is written exactly once, as a dataclass field default,
and every key in a file must name a field: unknown keys, wrong types and impossible
combinations fail at start-up with a message naming the key.

Field names are globally unique across sections and reuse the reference's key
names (``global_rounds``, ``clip_adapter_learning_rate``, ``generator_granularity``,
...). A file may therefore be written with our sections, or with the reference's
section names (``feda2v``, ``federation``, ``training``, ...) whose keys are routed
to the section that owns them, or flat.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from a2v_jax.errors import A2VError

DiffusionType = Literal["sd", "flux", "cogx"]
DriftCorrection = Literal["none", "fedprox", "scaffold"]


class ConfigError(A2VError, ValueError):
  """A configuration problem, with a message that names the offending key."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """What the run is called, where it writes, how it is seeded."""
  name: str = "run"
  description: str = ""
  seed: int = 0
  # Run directories are created under this folder (ignored by git).
  output_dir: str = "checkpoints/runs"
  # Float type of heads during training ("float32" or "bfloat16").
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  wandb: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Dataset, node partition and splits."""
  dataset: Literal["fsdd", "vegas", "esc50", "vggsound", "folder"] = "fsdd"
  dataset_root: str = "data/fsdd"
  # How clips are spread over nodes: by speaker/group (FSDD's natural split),
  # one class per node (the reference's 10n-10c-400s), Dirichlet label skew, iid.
  # "reference" = the reference's explicit node list (reference_nodes), sliced exactly as fedgfe did.
  partition: Literal["group", "class", "dirichlet", "iid", "reference"] = "group"
  num_nodes: int = 5
  dirichlet_alpha: float = 0.5
  # Reference node slicing: at most this many clips per node (None = all).
  samples_per_node: Optional[int] = None
  node_split_seed: int = 42
  # "official" = the dataset's own split (FSDD: takes 0-4 are test);
  # "stratified" = per-class fractions below.
  split: Literal["official", "stratified"] = "official"
  train_ratio: float = 0.8
  val_ratio: float = 0.1
  test_ratio: float = 0.1
  # With the official FSDD split, this fraction of each node's train clips is held out as val.
  official_val_fraction: float = 0.1
  selected_classes: Optional[tuple[str, ...]] = None
  # The reference's per-node dicts (selected_classes, samples_per_node, node_split_id, ...).
  reference_nodes: Optional[tuple[dict, ...]] = None


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Audio front-end and the frozen AST feature cache."""
  sample_rate: int = 16000
  num_mel_bins: int = 128
  # fbank frames fed to AST. The real checkpoint was trained with 1024 (10.24 s);
  # FSDD clips are under 1 s, so 128 frames avoid ~10x padding compute.
  max_length: int = 128
  # What to do with clips longer than max_length: "truncate" (AST's own behaviour) or "error".
  long_clips: Literal["truncate", "error"] = "truncate"
  use_cls_token_only: bool = False
  # Token pooling applied when caching: None keeps all tokens; an int k
  # average-pools patch tokens to k per axis-free sequence chunk (2 special tokens kept).
  pooled_tokens: Optional[int] = None
  cache_dir: str = "checkpoints/cache"
  cache_dtype: Literal["float16", "float32"] = "float32"
  feature_batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """Where frozen weights come from: "tiny" (written offline by the project) or a local HF directory."""
  ast_model: str = "tiny"
  clip_text_model: str = "tiny"
  t5_model: str = "tiny"
  sd_model: str = "tiny"
  flux_model: str = "tiny"
  clip_vision_model: str = "tiny"
  tiny_dir: str = "checkpoints/backbones"


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """How per-class text targets are made."""
  prompt_template: str = "a photo of the number {}"
  t5_max_length: int = 17
  clip_max_length: int = 77


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Per-node trainable heads (Adapter + MAPBlock per branch)."""
  diffusion_type: DiffusionType = "flux"
  clip_adapter_hidden: tuple[int, ...] = (128, 128)
  t5_adapter_hidden: tuple[int, ...] = (128, 128)
  # MAPBlock width multiplier of its MLP and number of attention heads.
  map_heads: int = 4
  map_mlp_ratio: int = 4
  # Std of the MAPBlock's learned latents at init: 0.02 is Voltron's (and so the reference's). With such
  # small latents every query is ~0, attention starts uniform (mean pooling) and its gradient is tiny, so
  # training first sits on a plateau; a std of 1 starts with distinct queries (see README, tuning).
  map_latents_init_std: float = 0.02
  # Latents (tokens) of the t5 branch output (17 in the reference).
  t5_latents: int = 17
  # Read by fedgfe and ignored; accepted so reference configs load, refused when non-zero (validate).
  adapter_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Local optimisation, one AdamW per branch (reference names)."""
  local_epochs: int = 1
  batch_size: int = 8
  clip_adapter_learning_rate: float = 1e-3
  clip_adapter_weight_decay: float = 1e-4
  t5_adapter_learning_rate: float = 1e-3
  t5_adapter_weight_decay: float = 1e-4
  clip_adapter_learning_rate_schedule: bool = False
  t5_adapter_learning_rate_schedule: bool = False
  optimizer_clip_gradients: bool = False
  # a2v-jax: cosine decay of every branch without a reference schedule, from its learning rate to 0 over
  # the run's global_rounds * local_epochs epochs (stepped per local epoch, like the reference's schedules).
  learning_rate_decay: Literal["none", "cosine"] = "none"
  # Weight of an extra (1 - cosine) term; 0 = the reference's plain MSE.
  cosine_loss_weight: float = 0.0
  # Reproduce the reference's VEGAS collate bug (first sample's target for the whole batch).
  reference_batch_target_bug: bool = False


@dataclasses.dataclass(frozen=True)
class FederationConfig:
  """Rounds, aggregation, sampling, checkpoints."""
  global_rounds: int = 10
  # avg = uniform FedAvg (reference); weighted = sample-weighted FedAvg;
  # none = local-only; centralised = all data on one node; kd = server distillation.
  adapter_aggregation_mode: Literal["avg", "weighted", "none", "centralised", "kd"] = "avg"
  join_ratio: float = 1.0
  # What a node keeps between rounds. persistent (the reference): its optimiser state (AdamW moments) and key
  # survive the load of the global heads. stateless (cross-device FedAvg): every participant starts each round
  # from the global heads with a fresh optimiser state and a key drawn from (round, node id); nothing it learnt
  # locally carries over except through the global model.
  client_state: Literal["persistent", "stateless"] = "persistent"
  # Server transform on the mean client delta: sgd(1.0) is FedAvg; adam is FedAdam (Reddi et al. 2021).
  # Not applied in 'centralised' mode (one node, nothing to aggregate: its model is the model).
  server_optimizer: Literal["sgd", "adam"] = "sgd"
  server_learning_rate: float = 1.0
  # Server momentum on the mean client delta (FedAvgM, Hsu et al. 2019); 0 = plain FedAvg.
  server_momentum: float = 0.0
  # Correction of client drift in local training (a2v-jax; the reference has none): fedprox adds
  # fedprox_mu / 2 * ||w - w_global||^2 to the local loss (Li et al. 2020); scaffold adds the difference
  # between the server's and the client's control variates (mean gradients of the last round) to every
  # local gradient (Karimireddy et al. 2020).
  local_drift_correction: DriftCorrection = "none"
  fedprox_mu: float = 0.01
  eval_gap: int = 1
  checkpoint_frequency: int = 1
  max_to_keep: int = 2
  # KD aggregation (both branches distilled, see federated/kd.py): epochs over the round's
  # generator features, features drawn per class per round, AdamW learning rate of the distillation.
  kd_training_epochs: int = 10
  kd_samples_per_class: int = 100
  kd_learning_rate: float = 1e-3
  # Clients per vmapped chunk (None = all at once).
  client_chunk_size: Optional[int] = None
  # Server global training (the design notes' Run 2, done as the reference intended; federated/server_train.py): after
  # FedAvg, the server trains the global heads for global_model_train_epochs epochs on the round's
  # aggregated synthetic features of every node (+ each node's per-class MEAN real feature when the nodes
  # train on real features; never a raw clip). Targets: the class text embeddings, or with
  # global_model_train_from_nodes_adapters the per-class mean of the nodes' head outputs (what the nodes'
  # adapters make of their own clips of that class). AdamW at global_model_train_learning_rate.
  global_model_train: bool = False
  global_model_train_epochs: int = 5
  global_model_train_from_nodes_adapters: bool = False
  global_model_train_learning_rate: float = 1e-3
  # A finished run directory whose heads a generate run loads (the reference's third step: heads +
  # generators, no training; see a2v_jax/run/generate.py). None = train heads as usual.
  adapter_load_checkpoint: Optional[str] = None
  # Deployment (a2v_jax/deploy, Flower): a sampled node that does not answer a round stops the run
  # ('stop', one line naming it; earlier rows kept) or the round aggregates the nodes that answered.
  deployment_on_node_failure: Literal["stop", "continue"] = "stop"


TEXT_CONDITIONS = ("text", "t5_clip")  # generator conditions built from the class text embeddings


def generator_condition(g: "GeneratorConfig") -> Optional[str]:
  """What a conditioned generator is conditioned on ("text" unless set to "onehot"); None if unconditioned."""
  if not (g.generator_type == "cvae" or g.use_conditioned_vae):
    return None
  return g.generator_condition or "text"


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """VAE / GAN generators of AST features (Run 1 trains, Run 2 restores)."""
  use_generator: bool = False
  generator_type: Literal["vae", "cvae", "gan"] = "vae"
  use_conditioned_vae: bool = False
  # Condition of a conditioned generator (cvae / use_conditioned_vae): "text" (the default when unset:
  # the design notes' visual condition, the class's text embedding -- the pooled CLIP target where the heads have
  # a clip branch, the T5 target's token mean for cogx -- scaled to unit norm) or "onehot" (the class
  # index) or "t5_clip" (the reference's FLUX condition per token: the class's T5 target pooled to the generator's
  # tokens, the pooled CLIP target appended to each; needs both branches). Setting it for an unconditioned
  # generator is refused (it would be ignored).
  generator_condition: Optional[Literal["onehot", "text", "t5_clip"]] = None
  generator_training_mode: bool = False
  generator_only_mode: bool = False
  use_pretrained_generators: bool = False
  generator_granularity: Literal["unified", "per_class", "per_group"] = "per_class"
  generator_class_groups: Optional[dict] = None
  # Seed 003: re-initialise a generator when a node brings a class it has not trained before (per node
  # tracking; the first visit of a node is never a "change"). Off by default, as in the design notes.
  reset_generator_on_class_change: bool = False
  shared_generator_in_only_mode: bool = True
  # How nodes visit a shared generator in a round: "interleaved" -- each of the generator_training_epochs epochs
  # visits every node in turn for one epoch -- or "sequential", the reference's: each node trains all its epochs,
  # then the next. Sequential visits forget: one-hot CVAE shared by 10 one-digit FSDD nodes, 8 rounds, 0.16 of its
  # samples nearest their own digit's mean, 0.59 interleaved (per-node per-digit VAEs 0.52); benchmarks/RESULTS.md.
  shared_generator_schedule: Literal["interleaved", "sequential"] = "interleaved"
  generator_training_epochs: int = 20
  generator_batch_size: int = 16
  generator_learning_rate: float = 1e-3
  generator_hidden_dim: int = 256
  generator_latent_dim: int = 32
  generator_training_sequence_length: int = 4
  generator_augmentation: bool = True
  generator_augmentation_noise: float = 0.1
  # Ceiling of the VAE loss's KL weight (beta; it ramps up over the first half of the epochs): the reference's 0.01.
  # A conditioned VAE needs no other value: its z has a learned prior per class (models.generators), which is what
  # makes it follow its condition (FSDD, one shared one-hot VAE, 8 rounds: samples nearest their own class mean
  # 0.17 without the class prior, 0.43 with it; benchmarks/RESULTS.md#conditioned-generators).
  generator_kl_weight: float = 0.01
  # The VAE's architecture: "token" (ours: one encoder / decoder shared by the tokens, 239x fewer parameters at the
  # AST's 1214 x 768) or "reference_mlp" (the reference's flattening MLP VAEGenerator; unconditioned VAE only): what
  # generators imported from the reference's .pt files are (python -m experiments.import_reference).
  generator_architecture: Literal["token", "reference_mlp"] = "token"
  # Run 1: generators model features standardised per (token, dim) with the mean / std of all nodes'
  # train rows (recorded in the checkpoint; Run 2 undoes it on every sample). Why: the VAE loss's
  # beta <= 0.01 on raw AST features (variance << 1) acts as a large observation noise and blurs the
  # small class-specific directions (FSDD: ridge probe trained on samples 0.69 raw -> 0.82 standardised).
  generator_standardize_features: bool = True
  synthetic_samples_per_class: str = "auto"
  # Run 2: the server sends every participating node synthetic rows of the classes it lacks, drawn each round
  # from the OTHER participants' synthetic rows, so that the node trains class-balanced: for each class, this
  # many rows minus those it holds ('auto' = the node's train rows / classes it holds). A node holding every
  # class receives nothing. None = nothing is sent (federated/synthetic_share.py).
  server_synthetic_samples_per_class: Optional[Union[int, Literal["auto"]]] = None
  # Run 2: token count of synthetic features (samples of S tokens are stretched by linear
  # interpolation). None = the heads' input token count (the cached features' T, or the T the
  # generators were trained from when no cache exists); a value must equal that count. Generators trained on
  # features of another token count than this run's are refused unless this key asks for that count.
  generator_output_sequence_length: Optional[int] = None
  # Run 2: nodes also train on their real cached train features (false = synthetic only, the
  # train-on-synthetic / test-on-real measurement). Without a feature cache there is nothing real.
  train_on_real_features: bool = True
  # Run 2: nodes also train on their own synthetic rows. false = the design notes' Run 2: nodes train on
  # real clips only and send their synthetic rows to the server (for global_model_train).
  train_on_synthetic_features: bool = True
  # Run 2: draw fresh synthetic rows before every round (same counts and labels, new latents; the
  # reference regenerated its samples after every KD round); false = one set drawn at start-up.
  synthetic_resample_each_round: bool = True
  generator_checkpoint_dir: str = "checkpoints/generators"
  generator_checkpoint_base_name: str = "generator"
  generator_save_checkpoint: bool = True
  generator_load_checkpoint: bool = False
  generator_checkpoint_frequency: int = 1


@dataclasses.dataclass(frozen=True)
class OutputConfig:
  """Embedding checkpoints and in-training rendering."""
  save_embeddings_instead_of_images: bool = False
  embeddings_checkpoint_dir: str = "checkpoints/embeddings"
  embeddings_save_frequency: int = 0
  generate_nodes_images_frequency: int = 0
  generate_global_images_frequency: int = 0
  images_per_class: int = 1
  render_node: int = 0
  num_inference_steps: int = 2
  guidance_scale: float = 7.5
  image_size: int = 32


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """Differential privacy (federated/privacy.py); every run without ``dp_level`` is untouched."""
  # "record": DP-SGD in every node's local training (a node's clips are the records; cross-silo). "node": DP-FedAvg,
  # each participant's whole update clipped at the server and noised on the sum (a client is the record;
  # cross-device populations, sampling rate = join_ratio).
  dp_level: Optional[Literal["record", "node"]] = None
  # Per-example gradient L2 clip.
  dp_l2_clip: float = 1.0
  # Noise std / clip; or give dp_target_epsilon and it is calibrated before round 1 (printed).
  dp_noise_multiplier: Optional[float] = None
  dp_target_epsilon: Optional[float] = None
  # delta of the reported (epsilon, delta); null = 1 / n^1.1 (n: the smallest node's train rows for "record",
  # the clients for "node").
  dp_delta: Optional[float] = None
  # "node" only: track the dp_target_quantile of the update norms with the clip (Andrew et al. 2021), learning rate
  # dp_clip_learning_rate, the clipped count noised with std dp_clipped_count_stddev (null = cohort / 20).
  dp_adaptive_clip: bool = False
  dp_target_quantile: float = 0.5
  dp_clip_learning_rate: float = 0.2
  dp_clipped_count_stddev: Optional[float] = None
  # Run 2: refuse generators trained without DP (their synthetic features would leave the nodes with no guarantee).
  # Generators get one from a generator-only Run 1 with dp_level "record" (DP-SGD of the VAEs, epsilon per node in
  # their checkpoint); Run 2 prints the epsilon of every generator it restores either way.
  dp_require_generators: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole run configuration."""
  experiment: ExperimentConfig = ExperimentConfig()
  data: DataConfig = DataConfig()
  features: FeatureConfig = FeatureConfig()
  backbones: BackboneConfig = BackboneConfig()
  text: TextConfig = TextConfig()
  heads: HeadConfig = HeadConfig()
  train: TrainConfig = TrainConfig()
  federation: FederationConfig = FederationConfig()
  generators: GeneratorConfig = GeneratorConfig()
  output: OutputConfig = OutputConfig()
  privacy: PrivacyConfig = PrivacyConfig()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def hash(self, *sections: str) -> str:
    """Content hash of the given sections (all when empty), for cache keys and checkpoint checks."""
    d = self.to_dict()
    if sections:
      d = {s: d[s] for s in sections}
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

  @property
  def branches(self) -> tuple[str, ...]:
    """Trainable head branches for this diffusion type."""
    return BRANCHES[self.heads.diffusion_type]


BRANCHES: dict[str, tuple[str, ...]] = {"sd": ("clip",), "flux": ("clip", "t5"), "cogx": ("t5",)}

SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = typing.get_type_hints(Config)
# The reference's section names, routed by key name.
REFERENCE_SECTIONS = ("feda2v", "federation", "training", "experiment", "model", "wandb", "dataset")
# Reference key names that differ from ours.
ALIASES: dict[str, str] = {
    "learning_rate": "kd_learning_rate",
    "generate_embeddings_only": "save_embeddings_instead_of_images",
    "audio_model_name": "ast_model",
    "generator_checkpoint_freq": "generator_checkpoint_frequency",
}


def _field_owner() -> dict[str, str]:
  owner: dict[str, str] = {}
  for section, cls in _SECTION_TYPES.items():
    for f in dataclasses.fields(cls):
      assert f.name not in owner, f"duplicate field name {f.name}"
      owner[f.name] = section
  return owner


FIELD_OWNER = _field_owner()


def _suggest(key: str, candidates) -> str:
  close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
  return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, tp: Any) -> Any:
  """Checks `value` against the annotation `tp`, converting JSON lists to tuples."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"config key '{key}': {value!r} is not allowed; choose one of {list(args)}")
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(key, value, a)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
    return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
  if tp is dict or origin is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"config key '{key}': expected an object, got {type(value).__name__}")
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value
  raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _flatten(raw: dict[str, Any], where: str) -> dict[str, Any]:
  """Turns a sectioned / reference-sectioned / flat mapping into {field: value}."""
  flat: dict[str, Any] = {}
  for key, value in raw.items():
    if key in SECTIONS or (key in REFERENCE_SECTIONS and isinstance(value, dict)):
      if not isinstance(value, dict):
        raise ConfigError(f"config section '{key}' in {where} must be an object")
      for k, v in value.items():
        name = ALIASES.get(k, k)
        if name not in FIELD_OWNER:
          raise ConfigError(f"unknown config key '{key}.{k}' in {where}{_suggest(name, FIELD_OWNER)}")
        if key in SECTIONS and FIELD_OWNER[name] != key:
          raise ConfigError(
              f"config key '{key}.{k}' in {where} belongs to section '{FIELD_OWNER[name]}'")
        flat[name] = v
    else:
      name = ALIASES.get(key, key)
      if name not in FIELD_OWNER:
        choices = list(FIELD_OWNER) + list(SECTIONS)
        raise ConfigError(f"unknown config key '{key}' in {where}{_suggest(name, choices)}")
      flat[name] = value
  return flat


def from_dict(raw: dict[str, Any], where: str = "config") -> Config:
  """Builds and validates a Config from a (possibly partial) mapping."""
  flat = _flatten(raw, where)
  per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
  for name, value in flat.items():
    section = FIELD_OWNER[name]
    hints = typing.get_type_hints(_SECTION_TYPES[section])
    per_section[section][name] = _coerce(name, value, hints[name])
  cfg = Config(**{s: _SECTION_TYPES[s](**kv) for s, kv in per_section.items()})
  validate(cfg)
  return cfg


def parse_override(item: str) -> tuple[str, Any]:
  """Parses ``key=value`` (value as JSON when it parses, else a string)."""
  if "=" not in item:
    raise ConfigError(f"override '{item}' must look like key=value")
  key, text = item.split("=", 1)
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    value = text
  return key.strip(), value


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
  """Loads a JSON config file and applies ``--set key=value`` overrides.

  Args:
    path: a JSON file (sectioned, reference-sectioned or flat); None = all defaults.
    overrides: ``key=value`` or ``section.key=value`` strings, values parsed as JSON.

  Returns:
    The validated Config.
  """
  raw: dict[str, Any] = {}
  where = "defaults"
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise ConfigError(f"config file not found: {path}")
    try:
      raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"config file {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
      raise ConfigError(f"config file {path} must hold a JSON object")
    where = str(path)
  flat = _flatten(raw, where)
  for item in overrides:
    key, value = parse_override(item)
    name = key.split(".")[-1]
    name = ALIASES.get(name, name)
    if name not in FIELD_OWNER:
      raise ConfigError(f"unknown config key '{key}' in --set{_suggest(name, FIELD_OWNER)}")
    if "." in key and key.split(".")[0] not in (FIELD_OWNER[name],) + REFERENCE_SECTIONS:
      raise ConfigError(f"--set {key}: '{name}' belongs to section '{FIELD_OWNER[name]}'")
    flat[name] = value
  cfg = from_dict(flat, where)
  refuse_ignored(cfg, flat)
  return cfg


def _run1(cfg: Config) -> bool:
  g = cfg.generators
  return g.use_generator and (g.generator_only_mode or bool(g.generator_training_mode))


# Keys that act only in some modes, and why. A user's config (file or --set) that gives one where it would change
# nothing is refused, naming it: a value that silently does nothing reads as a result that was not measured. (A
# run's saved config.json holds every key and is not checked: it is read with ``from_dict``.)
MODE_KEYS: tuple[tuple[tuple[str, ...], Any, str], ...] = (
    (("kd_training_epochs", "kd_samples_per_class", "kd_learning_rate"),
     lambda c: c.federation.adapter_aggregation_mode == "kd",
     "it shapes the server's distillation, which runs only with 'adapter_aggregation_mode': 'kd'"),
    (("global_model_train_epochs", "global_model_train_learning_rate"), lambda c: c.federation.global_model_train,
     "it shapes the server's global training, which is off ('global_model_train': false)"),
    (("dp_target_quantile", "dp_clip_learning_rate"),
     lambda c: c.privacy.dp_level == "node" and c.privacy.dp_adaptive_clip,
     "it shapes adaptive clipping, which runs only with 'dp_level': 'node' and 'dp_adaptive_clip': true"),
    (("dp_require_generators",), lambda c: c.generators.use_pretrained_generators,
     "it checks the generators Run 2 restores ('use_pretrained_generators': true)"),
    (("generator_training_epochs", "generator_learning_rate", "generator_batch_size", "generator_augmentation",
      "generator_augmentation_noise", "generator_kl_weight"), _run1,
     "it shapes generator training (Run 1: 'use_generator' with 'generator_training_mode' or 'generator_only_mode'), "
     "which this run does not do (Run 2 restores trained generators)"),
)


def refuse_ignored(cfg: Config, given: typing.Mapping[str, Any]) -> None:
  """Refuses keys ``given`` (by the user) that would have no effect in ``cfg``'s mode.

  Raises:
    ConfigError: naming the key and why it would change nothing.
  """
  g = cfg.generators
  for keys, active, why in MODE_KEYS:
    for key in keys:
      if key in given and not active(cfg):
        raise ConfigError(f"config key '{key}' would change nothing in this run: {why}; drop it")
  if given.get("generator_training_mode") is False and g.generator_only_mode:
    raise ConfigError("config key 'generator_training_mode' is false but 'generator_only_mode' trains generators "
                      "(Run 1: the reference sets both true); set it true or drop it")
  if given.get("generator_load_checkpoint") is False and g.use_pretrained_generators:
    raise ConfigError("config key 'generator_load_checkpoint' is false but 'use_pretrained_generators' (Run 2) "
                      "always restores the generators; set it true or drop it")
  if "shared_generator_schedule" in given and not (_run1(cfg) and g.generator_only_mode and
                                                    g.shared_generator_in_only_mode):
    raise ConfigError("config key 'shared_generator_schedule' would change nothing in this run: it orders the nodes' "
                      "visits to a shared generator, which only a generator_only_mode Run 1 with "
                      "'shared_generator_in_only_mode' trains; drop it")
  if "generator_kl_weight" in given and g.generator_type == "gan":
    raise ConfigError("config key 'generator_kl_weight' weighs a VAE's KL term; a GAN has none: drop it")
  if given.get("reset_generator_on_class_change"):
    raise ConfigError(
        "config key 'reset_generator_on_class_change' would change nothing: a node's classes are fixed for the "
        "whole run (a resumed Run 1 with other classes is refused), and a node's first visit to a shared generator "
        "is not a class change, so no generator is ever reset here (the reference re-initialised every class's "
        "generator before each round, which this project does not do: generators continue across rounds); drop it")


def validate(cfg: Config) -> None:
  """Cross-field checks: impossible combinations fail before anything runs."""
  d, f, g, t, fe = cfg.data, cfg.federation, cfg.generators, cfg.train, cfg.features
  positive = {
      "num_nodes": d.num_nodes, "global_rounds": f.global_rounds, "local_epochs": t.local_epochs,
      "batch_size": t.batch_size, "max_length": fe.max_length, "num_mel_bins": fe.num_mel_bins,
      "sample_rate": fe.sample_rate, "t5_latents": cfg.heads.t5_latents, "map_heads": cfg.heads.map_heads,
      "max_to_keep": f.max_to_keep, "generator_training_epochs": g.generator_training_epochs,
      "generator_batch_size": g.generator_batch_size, "kd_training_epochs": f.kd_training_epochs,
      "generator_hidden_dim": g.generator_hidden_dim, "generator_latent_dim": g.generator_latent_dim,
      "generator_training_sequence_length": g.generator_training_sequence_length,
      "global_model_train_epochs": f.global_model_train_epochs,
      "checkpoint_frequency": f.checkpoint_frequency, "generator_checkpoint_frequency": g.generator_checkpoint_frequency,
      "feature_batch_size": fe.feature_batch_size, "kd_samples_per_class": f.kd_samples_per_class,
      "t5_max_length": cfg.text.t5_max_length, "clip_max_length": cfg.text.clip_max_length,
      "map_mlp_ratio": cfg.heads.map_mlp_ratio, "images_per_class": cfg.output.images_per_class,
      "num_inference_steps": cfg.output.num_inference_steps, "image_size": cfg.output.image_size,
  }
  for key, value in positive.items():
    if value < 1:
      raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
  # Learning rates and a server step that must move the model; 0 or less trains nothing (or diverges) and would
  # otherwise only show after the first round.
  rates = {"clip_adapter_learning_rate": t.clip_adapter_learning_rate,
           "t5_adapter_learning_rate": t.t5_adapter_learning_rate, "server_learning_rate": f.server_learning_rate,
           "kd_learning_rate": f.kd_learning_rate, "generator_learning_rate": g.generator_learning_rate}
  for key, value in rates.items():
    if not value > 0:  # also NaN
      raise ConfigError(f"config key '{key}' must be > 0, got {value}")
  non_negative = {"eval_gap": f.eval_gap, "embeddings_save_frequency": cfg.output.embeddings_save_frequency,
                  "generate_nodes_images_frequency": cfg.output.generate_nodes_images_frequency,
                  "generate_global_images_frequency": cfg.output.generate_global_images_frequency,
                  "clip_adapter_weight_decay": t.clip_adapter_weight_decay,
                  "t5_adapter_weight_decay": t.t5_adapter_weight_decay, "server_momentum": f.server_momentum,
                  "cosine_loss_weight": t.cosine_loss_weight,
                  "generator_augmentation_noise": g.generator_augmentation_noise}
  for key, value in non_negative.items():
    if not value >= 0:
      raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
  if not f.server_momentum < 1:
    raise ConfigError(f"config key 'server_momentum' must be < 1, got {f.server_momentum}")
  if not 0.0 < f.join_ratio <= 1.0:
    raise ConfigError(f"config key 'join_ratio' must be in (0, 1], got {f.join_ratio}")
  if d.split == "stratified" and abs(d.train_ratio + d.val_ratio + d.test_ratio - 1.0) > 1e-6:
    raise ConfigError(
        "config keys 'train_ratio' + 'val_ratio' + 'test_ratio' must sum to 1, got "
        f"{d.train_ratio} + {d.val_ratio} + {d.test_ratio}")
  for key in ("train_ratio", "val_ratio", "test_ratio", "official_val_fraction"):
    if not 0.0 <= getattr(d, key) <= 1.0:
      raise ConfigError(f"config key '{key}' must be in [0, 1], got {getattr(d, key)}")
  if d.partition == "reference" and not d.reference_nodes:
    raise ConfigError("config key 'partition' is 'reference' but 'reference_nodes' is empty")
  if d.partition == "reference" and len(d.reference_nodes) != d.num_nodes:
    raise ConfigError(f"config key 'num_nodes' is {d.num_nodes} but 'reference_nodes' lists "
                      f"{len(d.reference_nodes)} nodes")
  if d.partition == "dirichlet" and d.dirichlet_alpha <= 0:
    raise ConfigError(f"config key 'dirichlet_alpha' must be > 0, got {d.dirichlet_alpha}")
  if "{}" not in cfg.text.prompt_template:
    raise ConfigError(
        f"config key 'prompt_template' must contain '{{}}' for the class name, got "
        f"{cfg.text.prompt_template!r}")
  if fe.pooled_tokens is not None and fe.pooled_tokens < 1:
    raise ConfigError(f"config key 'pooled_tokens' must be >= 1 or null, got {fe.pooled_tokens}")
  if f.fedprox_mu < 0:
    raise ConfigError(f"config key 'fedprox_mu' must be >= 0, got {f.fedprox_mu}")
  if f.client_chunk_size is not None and f.client_chunk_size < 1:
    raise ConfigError(f"config key 'client_chunk_size' must be >= 1 or null, got {f.client_chunk_size}")
  spc = g.synthetic_samples_per_class
  if spc != "auto" and not spc.isdigit():
    raise ConfigError(f"config key 'synthetic_samples_per_class' must be 'auto' or an integer, got {spc!r}")
  if spc != "auto" and int(spc) < 1:
    raise ConfigError(f"config key 'synthetic_samples_per_class' must be 'auto' or >= 1, got {spc!r}")
  sspc = g.server_synthetic_samples_per_class
  if sspc is not None:
    if sspc != "auto" and sspc < 1:
      raise ConfigError(f"config key 'server_synthetic_samples_per_class' must be 'auto', >= 1 or null, got {sspc!r}")
    if not g.use_pretrained_generators:
      raise ConfigError("config key 'server_synthetic_samples_per_class' sends the nodes synthetic rows drawn from "
                        "Run 1's generators: set 'use_pretrained_generators': true (Run 2), or drop the key")
    if f.adapter_aggregation_mode == "centralised":
      raise ConfigError("config key 'server_synthetic_samples_per_class' sends nodes the classes they lack, but "
                        "'adapter_aggregation_mode' 'centralised' has one node holding every class; drop the key")
  if g.generator_architecture == "reference_mlp" and (g.generator_type != "vae" or generator_condition(g)):
    raise ConfigError("config key 'generator_architecture' 'reference_mlp' is the reference's unconditioned "
                      "VAEGenerator: set 'generator_type': 'vae' without conditioning, or drop the key")
  if not g.generator_kl_weight > 0:
    raise ConfigError(f"config key 'generator_kl_weight' must be > 0, got {g.generator_kl_weight}")
  if g.generator_output_sequence_length is not None and g.generator_output_sequence_length < 1:
    raise ConfigError("config key 'generator_output_sequence_length' must be >= 1 or null, got "
                      f"{g.generator_output_sequence_length}")
  if g.generator_granularity == "per_group" and not g.generator_class_groups:
    raise ConfigError("config key 'generator_granularity' is 'per_group' but 'generator_class_groups' is empty")
  if g.use_pretrained_generators and g.generator_only_mode:
    raise ConfigError("config keys 'use_pretrained_generators' and 'generator_only_mode' exclude each other "
                      "(Run 2 restores what Run 1 trained)")
  if (g.generator_only_mode or g.generator_training_mode) and not g.use_generator:
    raise ConfigError("config key 'generator_only_mode'/'generator_training_mode' needs 'use_generator': true")
  if f.adapter_aggregation_mode == "kd" and not (g.use_pretrained_generators or g.use_generator):
    raise ConfigError("config key 'adapter_aggregation_mode' is 'kd', which needs generators "
                      "('use_pretrained_generators': true or 'use_generator': true)")
  if f.adapter_aggregation_mode == "kd" and f.kd_samples_per_class < 1:
    raise ConfigError(f"config key 'kd_samples_per_class' must be >= 1, got {f.kd_samples_per_class}")
  if f.adapter_aggregation_mode == "kd" and g.generator_only_mode:
    raise ConfigError("config key 'adapter_aggregation_mode' is 'kd' but 'generator_only_mode' trains no heads "
                      "to distil")
  if g.use_pretrained_generators and g.generator_training_mode:
    raise ConfigError("config keys 'use_pretrained_generators' (Run 2: restore, never train) and "
                      "'generator_training_mode' (Run 1) exclude each other; to continue an interrupted Run 1, "
                      "run its config again with --resume")
  if cfg.heads.adapter_dropout != 0.0:
    raise ConfigError(
        f"config key 'adapter_dropout' is {cfg.heads.adapter_dropout}, but dropout is not applied (fedgfe reads "
        "the key and ignores it too; it is accepted only so reference configs load); set it to 0")
  conditioned = g.generator_type == "cvae" or g.use_conditioned_vae
  if g.generator_condition is not None and not conditioned:
    raise ConfigError(f"config key 'generator_condition' is {g.generator_condition!r} but the generator is "
                      "unconditioned; set 'generator_type': 'cvae' (or 'use_conditioned_vae': true), or drop the key")
  if g.use_generator and not (g.generator_training_mode or g.generator_only_mode or g.use_pretrained_generators):
    raise ConfigError("config key 'use_generator' is true but generators are neither trained "
                      "('generator_training_mode': true, Run 1) nor restored ('use_pretrained_generators': true, "
                      "Run 2)")
  if g.generator_load_checkpoint and not g.use_pretrained_generators:
    raise ConfigError("config key 'generator_load_checkpoint' restores generators, which is what "
                      "'use_pretrained_generators': true (Run 2) does; to continue an interrupted Run 1 run its "
                      "config again with --resume")
  if f.global_model_train and not g.use_pretrained_generators:
    raise ConfigError("config key 'global_model_train' trains the server heads on the nodes' synthetic features, "
                      "which come from Run 1's generators: set 'use_pretrained_generators': true (Run 2)")
  if (g.use_pretrained_generators and not g.train_on_synthetic_features and not f.global_model_train
      and g.server_synthetic_samples_per_class is None):
    raise ConfigError("config key 'train_on_synthetic_features' is false, 'global_model_train' is off and "
                      "'server_synthetic_samples_per_class' is unset: the synthetic features Run 2 draws would be "
                      "used by nobody")
  if f.global_model_train and g.generator_only_mode:
    raise ConfigError("config key 'global_model_train' is true but 'generator_only_mode' trains no heads")
  if f.global_model_train and f.adapter_aggregation_mode not in ("avg", "weighted"):
    raise ConfigError(f"config key 'global_model_train' needs a global model averaged from the nodes "
                      f"('adapter_aggregation_mode' 'avg' or 'weighted'), got {f.adapter_aggregation_mode!r}")
  if f.global_model_train_from_nodes_adapters and not f.global_model_train:
    raise ConfigError("config key 'global_model_train_from_nodes_adapters' chooses the targets of server "
                      "global training, which is off ('global_model_train': false)")
  if f.global_model_train_learning_rate <= 0:
    raise ConfigError("config key 'global_model_train_learning_rate' must be > 0, got "
                      f"{f.global_model_train_learning_rate}")
  if cfg.heads.t5_latents != cfg.text.t5_max_length:
    raise ConfigError(f"config key 't5_latents' is {cfg.heads.t5_latents}, but the t5 branch regresses one "
                      f"latent per T5 target token ('t5_max_length' = {cfg.text.t5_max_length}); set them equal")
  if f.adapter_load_checkpoint is not None and not g.use_pretrained_generators:
    raise ConfigError("config key 'adapter_load_checkpoint' starts a generate run (trained heads + generators, "
                      "no training), which draws its features from generators: set 'use_pretrained_generators': "
                      "true")
  if f.client_state == "stateless" and (f.adapter_aggregation_mode == "none" or f.local_drift_correction == "scaffold"):
    what = ("'adapter_aggregation_mode' 'none' (no global model to start from)" if f.adapter_aggregation_mode == "none"
            else "SCAFFOLD (its client control variates must persist between rounds)")
    raise ConfigError(f"config key 'client_state' 'stateless' starts every participant from the global model; it "
                      f"cannot run with {what}")
  _validate_privacy(cfg)
  if cfg.heads.map_latents_init_std <= 0:
    raise ConfigError(f"config key 'map_latents_init_std' must be > 0, got {cfg.heads.map_latents_init_std}")


def _validate_privacy(cfg: Config) -> None:
  p, f, g = cfg.privacy, cfg.federation, cfg.generators
  if p.dp_level is None:
    for key in ("dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_clipped_count_stddev"):
      if getattr(p, key) is not None:
        raise ConfigError(f"config key '{key}' is set but 'dp_level' is not: no DP mechanism runs; set 'dp_level': "
                          "'record' or 'node', or drop the key")
    if p.dp_adaptive_clip:
      raise ConfigError("config key 'dp_adaptive_clip' is set but 'dp_level' is not 'node'; drop it")
    return
  if p.dp_level == "record" and (p.dp_adaptive_clip or p.dp_clipped_count_stddev is not None):
    raise ConfigError("config key 'dp_adaptive_clip' / 'dp_clipped_count_stddev' adapts node-level DP's clip; "
                      "'dp_level' is 'record': drop it")
  if not 0 < p.dp_target_quantile < 1 or not p.dp_clip_learning_rate > 0:
    raise ConfigError("config keys 'dp_target_quantile' must be in (0, 1) and 'dp_clip_learning_rate' > 0, got "
                      f"{p.dp_target_quantile} / {p.dp_clip_learning_rate}")
  if p.dp_level == "node" and f.adapter_aggregation_mode != "avg":
    raise ConfigError(f"config key 'dp_level' 'node' averages clipped updates uniformly into the global model: "
                      f"'adapter_aggregation_mode' must be 'avg', got {f.adapter_aggregation_mode!r}")
  if (p.dp_noise_multiplier is None) == (p.dp_target_epsilon is None):
    raise ConfigError("config key 'dp_level' needs exactly one of 'dp_noise_multiplier' (the noise) and "
                      "'dp_target_epsilon' (the noise calibrated to it)")
  for key in ("dp_l2_clip", "dp_noise_multiplier", "dp_target_epsilon"):
    v = getattr(p, key)
    if v is not None and not v > 0:
      raise ConfigError(f"config key '{key}' must be > 0, got {v}")
  if p.dp_delta is not None and not 0 < p.dp_delta < 1:
    raise ConfigError(f"config key 'dp_delta' must be in (0, 1), got {p.dp_delta}")
  if g.use_generator and g.generator_training_mode:  # Run 1: DP-SGD of the generators (generators/training.py)
    why = [what for what, on in (
        ("'dp_level' 'record' (node level protects a client's whole update; generators have none)",
         p.dp_level != "record"),
        ("'generator_only_mode': true (heads and generators trained on the same clips in one run would be two "
         "releases of them)", not g.generator_only_mode),
        ("a VAE generator ('generator_type' 'vae' or 'cvae'; a GAN's discriminator is not covered)",
         g.generator_type == "gan"),
        ("'generator_standardize_features': false (its per-token mean and std of every node's clips would be "
         "recorded without DP)", g.generator_standardize_features)) if on]
    if why:
      raise ConfigError(f"config key 'dp_level' in Run 1 trains the generators with DP-SGD, which needs {why[0]}")
  unsupported = [what for what, on in (
      ("Run 2 at node level (the generators' guarantee is record level)",
       g.use_pretrained_generators and p.dp_level == "node"),
      ("Run 2's server global training (its per-class mean real features carry no DP)",
       g.use_pretrained_generators and f.global_model_train),
      ("KD aggregation (the server distils on generator features)", f.adapter_aggregation_mode == "kd"),
      ("centralised mode (one pooled client, no node to account)", f.adapter_aggregation_mode == "centralised"),
      ("SCAFFOLD (its control variates are a second, unclipped release)", f.local_drift_correction == "scaffold"),
      ("the reference's batch-target bug", cfg.train.reference_batch_target_bug)) if on]
  if unsupported:
    raise ConfigError(f"config key 'dp_level' {p.dp_level!r} is not supported with {unsupported[0]}; drop one of "
                      "them")


def dumps(cfg: Config) -> str:
  """Pretty JSON of the resolved config, sectioned."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=False, default=list)
