"""Run 1 and Run 2 of the generator workflow, as stages the trainer calls (the reference's design notes).

Run 1 (``use_generator`` + ``generator_training_mode``; ``use_generator`` alone is refused, it would
neither train nor restore anything): every round, after the heads' round, the generators train on the nodes' TRAIN features -- rows of the cached AST features,
pooled once to S tokens -- for ``generator_training_epochs``, all slots in one ``jit(vmap)``
(``generator_training.train_generators``). Per-round losses go into the round row as
``train/node_{i}/generator_{loss,recon,kl,cos}`` (GAN: ``generator_{loss,gan_d,gan_g,d_real,d_fake}``),
last epoch, averaged over the node's slots. Checkpoints go to
``{generator_checkpoint_dir}/{generator_checkpoint_base_name}/round_XXXXX`` (``generator_checkpoint``),
recording the data and feature settings Run 2 must agree with. ``generator_only_mode`` trains no heads
and computes no text targets (the trainer's ``generators_only``, the same round loop); nodes share one generator per key when
``shared_generator_in_only_mode`` (the reference's server instance, trained by the nodes one after
another). ``shared_generator_schedule`` orders those visits: ``sequential`` (the reference's: each node all
its epochs, then the next) leaves the generator knowing mostly the last nodes' data; ``interleaved`` (the
default) visits every node for one epoch, ``generator_training_epochs`` times per round. After every round the
generators are validated (``validation.py``: reconstruction and class probe, ``val/...`` row entries).

Run 2 (``use_pretrained_generators``): the generators of the latest complete round are restored before
anything else, and every disagreement (missing / partial / corrupt directory, other classes, shapes,
nodes or data split) stops the run at start-up. The AST is never constructed: real features come from
the feature cache when one exists for these clips (``ast_features(..., cache_only=True)``: a hit reads
a ``.npy``, a miss raises instead of building the AST), or from the cache Run 1 recorded (when the AST
weights are not on this machine). Without any cache the nodes train on synthetic features only and no real
evaluation is possible (said at start-up). Synthetic features: ``synthetic_samples_per_class`` per node
and class (``'auto'`` = node train rows // classes it holds), drawn from z ~ N(0, I) at start-up and
again before every later round (``synthetic_resample_each_round``; same rows, labels and shapes, new
latents), without input noise (``generator_augmentation`` is Run 1's denoising training, as in seed
001), un-standardised with the scale Run 1 recorded (``generator_standardize_features``) and stretched
to the heads' token count; the server aggregates them per class across nodes (logged as
``server/synthetic_samples_{total,classes}``) and, with ``global_model_train``, trains the global heads on
them (``server_train.py``). They are appended to the feature array as ordinary rows
and each node's train indices point at its own synthetic rows (plus its real ones unless
``train_on_real_features`` is false), so the engine trains on them exactly as on real rows.

Across processes every function here runs replicated: each process calls it with the same features,
config and keys and computes the same result on its own devices (process-local arrays, nothing
global), so the synthetic rows and KD features agree everywhere and the trainer places them like any
other shared input; checkpoints are written by process 0 alone (``generator_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.errors import A2VError
from a2v_jax import checkpoint as ckpt_lib
from a2v_jax import features as features_lib
from a2v_jax.generators import checkpoint as gc
from a2v_jax.config import TEXT_CONDITIONS, Config, generator_condition
from a2v_jax.data.nodes import NodeData
from a2v_jax.data.records import Clip, ClipSet
from a2v_jax.generators import training as gt
from a2v_jax.generators import validation as gv
from a2v_jax.federated import privacy, server_train
from a2v_jax.federated.kd import pad_rows
from a2v_jax.models import generators as gen
from a2v_jax.types import PRNGKey

GEN_SALT, SYNTHETIC_SALT, KD_SALT, VALIDATION_SALT = 0x6E4E, 0x5A17, 0x0D15, 0x7A11
# Row names of the per-round generator metrics (generator_training's names -> ours).
METRIC_NAMES = {"loss": "generator_loss", "recon": "generator_recon", "kl": "generator_kl",
                "cos": "generator_cos", "d_loss": "generator_gan_d", "g_loss": "generator_gan_g",
                "d_real": "generator_d_real", "d_fake": "generator_d_fake"}


class GeneratorRunError(A2VError, RuntimeError):
  """Run 1 / Run 2 cannot go on (non-finite losses, checkpoints of another run, unusable data)."""


def run_key(cfg: Config, salt: int) -> PRNGKey:
  return jax.random.fold_in(jax.random.PRNGKey(cfg.experiment.seed), salt)


def _train_rows(nodes: NodeData) -> list[np.ndarray]:
  return [np.asarray(n["train"], np.int64) for n in nodes.nodes]


def _padded(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(C, N) row index and validity of ragged per-node row lists."""
  width = max([len(r) for r in rows] + [1])
  index = np.zeros((len(rows), width), np.int64)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    index[i, :len(r)], mask[i, :len(r)] = r, True
  return index, mask


@dataclasses.dataclass(frozen=True)
class FeatureScale:
  """Per-(token, dim) mean and std of the features the generators model (``generator_standardize_features``).

  Computed over every node's train rows pooled to S tokens -- in a deployment, from the nodes' per-row
  sums and sums of squares (secure aggregation), no row leaving its node. Recorded in each generator
  manifest; samples are mapped back with :meth:`restore` before anything else sees them.
  """
  mean: np.ndarray  # (S, D)
  std: np.ndarray   # (S, D)

  @classmethod
  def fit(cls, pool: np.ndarray) -> "FeatureScale":
    pool = np.asarray(pool, np.float64)
    return cls(pool.mean(0).astype(np.float32), np.maximum(pool.std(0), 1e-6).astype(np.float32))

  @classmethod
  def identity(cls, seq_len: int, dim: int) -> "FeatureScale":
    return cls(np.zeros((seq_len, dim), np.float32), np.ones((seq_len, dim), np.float32))

  @classmethod
  def from_extra(cls, extra: dict, spec: gt.GeneratorSpec) -> "FeatureScale":
    """The scale a manifest recorded (identity when it recorded none)."""
    if extra.get("feature_mean") is None:
      return cls.identity(spec.seq_len, spec.feature_dim)
    scale = cls(np.asarray(extra["feature_mean"], np.float32), np.asarray(extra["feature_std"], np.float32))
    if scale.mean.shape != (spec.seq_len, spec.feature_dim) or scale.std.shape != scale.mean.shape:
      raise gc.GeneratorCheckpointError(f"feature scale of shape {scale.mean.shape} / {scale.std.shape} recorded for "
                                        f"generators of ({spec.seq_len}, {spec.feature_dim}) tokens")
    return scale

  def to_extra(self) -> dict[str, list]:
    return {"feature_mean": self.mean.tolist(), "feature_std": self.std.tolist()}

  def standardise(self, x: np.ndarray) -> np.ndarray:
    return (x - self.mean) / self.std

  def restore(self, x: np.ndarray) -> np.ndarray:
    return x * self.std + self.mean


def draw(state: gt.GenState, scale: FeatureScale, key: PRNGKey, counts: np.ndarray, length: int, *,
         allow_mixture: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``sample_generators`` in feature units: samples of S tokens, un-standardised, then stretched to
  ``length`` tokens. Returns numpy (features (C, M, length, D), labels (C, M), valid (C, M))."""
  x, y, valid = gt.sample_generators(state, key, counts, allow_mixture=allow_mixture)
  x = scale.restore(np.asarray(x, np.float32))
  x = np.asarray(gen.interpolate_tokens(jnp.asarray(x), length), np.float32)
  return x, np.asarray(y), np.asarray(valid)


def text_conditioned(cfg: Config) -> bool:
  """Whether the generators are conditioned on the class text embeddings (so need the text targets)."""
  return generator_condition(cfg.generators) in TEXT_CONDITIONS


def _unit_rows(t: np.ndarray) -> np.ndarray:
  return (t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def condition_table(cfg: Config, targets: dict, num_classes: int) -> Optional[np.ndarray]:
  """The (K, E) class conditions of a conditioned generator; None for one-hot (the default table).

  ``generator_condition: text`` is the design notes' "CLIP visual condition": each class's text embedding --
  the pooled CLIP target when the heads have a clip branch (SD's (77, d) token sequence is averaged
  over tokens), else the T5 target's token mean (cogx). ``t5_clip`` is the reference's FLUX condition per
  token: the class's T5 target pooled to the generator's S tokens (adaptive average pooling, as the reference)
  with the pooled CLIP vector appended to every token, flattened to S * (d_t5 + d_clip). Every row is scaled
  to unit norm like a one-hot row, so the condition's scale does not depend on the text encoder.
  """
  kind = generator_condition(cfg.generators)
  if kind not in TEXT_CONDITIONS:
    return None
  need = ("clip", "t5") if kind == "t5_clip" else ("clip",) if "clip" in targets else ("t5",)
  missing = [b for b in need if b not in targets]
  if missing:
    raise GeneratorRunError(f"generator_condition {kind!r} needs the class {' and '.join(need)} text embeddings, "
                            f"but this run has no {' / '.join(missing)} targets"
                            + (" (diffusion_type 'flux' has both)" if kind == "t5_clip" else ""))
  for b in need:
    if np.asarray(targets[b]).shape[0] != num_classes:
      raise GeneratorRunError(f"{b} text targets have {np.asarray(targets[b]).shape[0]} rows for {num_classes} "
                              "classes")
  if kind == "text":
    t = np.asarray(targets[need[0]], np.float64)
    return _unit_rows(t.reshape(num_classes, -1, t.shape[-1]).mean(1))
  s = cfg.generators.generator_training_sequence_length
  t5 = np.asarray(targets["t5"], np.float32).reshape(num_classes, -1, np.asarray(targets["t5"]).shape[-1])
  t5 = np.asarray(gen.pool_tokens(jnp.asarray(t5), s), np.float64)
  clip = np.asarray(targets["clip"], np.float64).reshape(num_classes, -1, np.asarray(targets["clip"]).shape[-1])
  clip = np.repeat(clip.mean(1, keepdims=True), s, axis=1)
  return _unit_rows(np.concatenate([t5, clip], axis=-1).reshape(num_classes, -1))


def check_condition(cfg: Config, state: gt.GenState, targets: dict, where: str) -> None:
  """A text-conditioned generator must have been trained on THESE classes' text embeddings.

  Raises:
    GeneratorCheckpointError: the checkpoint's condition table differs (another prompt template or
      text encoder), naming the classes whose conditions differ.
  """
  if state.spec.condition not in TEXT_CONDITIONS:
    return
  want = condition_table(cfg, targets, state.spec.num_classes)
  have = np.asarray(state.cond_table)
  if want.shape != have.shape:
    raise gc.GeneratorCheckpointError(f"{where}: conditioned on text embeddings of width {have.shape[1]}, this "
                                      f"run's are {want.shape[1]} wide (another text encoder)")
  off = np.flatnonzero(np.abs(want - have).max(1) > 1e-4)
  if off.size:
    names = [state.layout.class_name(int(c)) for c in off]
    raise gc.GeneratorCheckpointError(
        f"{where}: the generators were conditioned on other text embeddings for classes {names} (another "
        f"prompt_template or text encoder than this run's, prompt {cfg.text.prompt_template!r})")


# ---------------------------------------------------------------------------------------------
# Run 1.


@dataclasses.dataclass
class Run1:
  """Run 1's generators and the (fixed) data they train on."""
  state: gt.GenState
  pool: jax.Array          # (R, S, D) every node's train rows, pooled to S tokens once (standardised)
  pool_labels: np.ndarray  # (R,)
  index: np.ndarray        # (C, N) pool row of each node row
  mask: np.ndarray         # (C, N)
  key: PRNGKey
  scale: FeatureScale
  validation: Optional[gv.Validation] = None


def _validation(cfg: Config, prepared: Any, pool: np.ndarray, pool_labels: np.ndarray, index: np.ndarray,
                mask: np.ndarray, scale: FeatureScale) -> gv.Validation:
  """Every node's ``val`` rows (its train rows when no node has any), pooled and standardised like the pool."""
  nodes = prepared.nodes
  source = "val" if sum(len(n.get("val", ())) for n in nodes.nodes) else "train"
  rows = [np.asarray(n.get(source, ()), np.int64) for n in nodes.nodes]
  flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
  x = np.asarray(gen.pool_tokens(jnp.asarray(np.asarray(prepared.features[flat]), jnp.float32),
                                 cfg.generators.generator_training_sequence_length))
  return gv.make_validation(pool, pool_labels, [index[c][mask[c]] for c in range(len(rows))], scale.standardise(x),
                            nodes.clipset.labels[flat], np.repeat(np.arange(len(rows)), [len(r) for r in rows]),
                            len(nodes.clipset.class_names), source)


def run1_extra(cfg: Config, prepared: Any, run: Run1) -> dict[str, Any]:
  """What Run 2 must agree with and needs, recorded in every generator manifest."""
  d = cfg.to_dict()
  cache = getattr(prepared.features, "filename", None)
  return {"run_name": cfg.experiment.name, "data": d["data"], "features": d["features"],
          "ast_model": cfg.backbones.ast_model, "token_shape": list(prepared.features.shape[1:]),
          "feature_cache": str(Path(cache).parent) if cache else None,
          "train_rows": [len(r) for r in _train_rows(prepared.nodes)], **run.scale.to_extra()}


def start_run1(cfg: Config, prepared: Any, *, resume_round: Optional[int], resume: bool) -> Run1:
  """Fresh generators, or those of ``resume_round`` when resuming.

  Raises:
    GeneratorRunError: a fresh (not resumed) run would mix its rounds into another run's checkpoints,
      or the checkpoint's slots / token count do not fit this data.
  """
  g = cfg.generators
  names = prepared.class_names
  rows = _train_rows(prepared.nodes)
  flat = np.concatenate(rows)
  starts = np.cumsum([0] + [len(r) for r in rows])
  index, mask = _padded([np.arange(starts[i], starts[i + 1]) for i in range(len(rows))])
  pool_labels = prepared.nodes.clipset.labels[flat]
  token_shape = tuple(int(v) for v in prepared.features.shape[1:])
  pool = np.asarray(gen.pool_tokens(jnp.asarray(np.asarray(prepared.features[flat]), jnp.float32),
                                    g.generator_training_sequence_length))
  scale = FeatureScale.fit(pool) if g.generator_standardize_features else FeatureScale.identity(*pool.shape[1:])
  pool = jnp.asarray(scale.standardise(pool))
  layout = gt.make_layout(g, pool_labels, mask, len(names), index=index, class_names=names)
  key = run_key(cfg, GEN_SALT)
  if resume_round is not None:
    state, _ = gc.restore_generators(g, round_num=resume_round, feature_dim=token_shape[1], num_classes=len(names),
                                     class_names=names)
    if state.layout != layout or state.spec.source_length != token_shape[0]:
      raise GeneratorRunError(
          f"generator checkpoint round {resume_round} under {gc.checkpoint_root(g)} does not fit this data: slots "
          f"{[(d['node'], d['key']) for d in state.layout.describe()]} vs "
          f"{[(d['node'], d['key']) for d in layout.describe()]}, tokens {state.spec.source_length} vs {token_shape[0]}")
    check_condition(cfg, state, prepared.targets, str(gc.round_dir(g, resume_round)))
  else:
    complete, _ = gc.scan_rounds(g)
    if complete and not resume:
      raise GeneratorRunError(
          f"{gc.checkpoint_root(g)} already holds generator rounds {complete} of another run; a new Run 1 would mix "
          "its rounds with them. Pass --resume to continue that run, or set another generator_checkpoint_base_name "
          "(or generator_checkpoint_dir), or delete the directory")
    state = gt.init_generators(key, g, layout, token_shape, len(names),
                               condition_table(cfg, prepared.targets, len(names)))
  validation = _validation(cfg, prepared, np.asarray(pool), pool_labels, index, mask, scale)
  return Run1(state, pool, pool_labels, index, mask, key, scale, validation)


def start_dp(cfg: Config, run: Run1, *, resumed: Optional[dict] = None, verbose: bool = True
             ) -> tuple[Run1, Optional[privacy.GeneratorAccountant]]:
  """Run 1 with ``dp_level: record``: the generators train with DP-SGD (``GeneratorSpec.dp_clip``/``dp_noise``,
  the noise calibrated to ``dp_target_epsilon`` over the configured rounds when that is given, and printed) and
  the accountant that states each node's epsilon. ``resumed``: the manifest extra of the round a resumed run
  continues from, which must have been trained under the same DP settings.

  Raises:
    GeneratorRunError: resuming DP training from generators trained without it (or with other noise / clip).
  """
  p, g = cfg.privacy, cfg.generators
  if p.dp_level is None:
    return run, None
  lay = run.state.layout
  counts = np.zeros((lay.num_nodes, len(lay.keys)), np.int64)
  key_of = np.asarray(lay.class_to_key)
  for c in range(run.index.shape[0]):
    np.add.at(counts[c], key_of[run.pool_labels[run.index[c][run.mask[c]]]], 1)
  b, epochs, rounds = g.generator_batch_size, g.generator_training_epochs, cfg.federation.global_rounds
  per_node = counts.sum(1)
  delta = privacy.dp_delta(p.dp_delta, int(per_node[per_node > 0].min()) if (per_node > 0).any() else 1)
  probe = privacy.GeneratorAccountant(counts, b, epochs, 1.0, delta, p.dp_l2_clip)
  live = probe.steps_per_round > 0
  sigma = p.dp_noise_multiplier
  if sigma is None:
    sigma = privacy.calibrate(p.dp_target_epsilon, list(probe.rates[live]), list(probe.steps_per_round[live] * rounds),
                              delta)
    if verbose:
      print(f"DP generators: noise multiplier {sigma:.4f} calibrated for epsilon {p.dp_target_epsilon} at delta "
            f"{delta:.3g} after {rounds} rounds")
  accountant = privacy.GeneratorAccountant(counts, b, epochs, sigma, delta, p.dp_l2_clip)
  if resumed is not None:
    old = resumed.get("dp") or {}
    if not old or abs(old.get("noise_multiplier", -1) - sigma) > 1e-9 * sigma or old.get("l2_clip") != p.dp_l2_clip:
      raise GeneratorRunError(
          "a DP Run 1 cannot resume from generators trained " + ("without DP" if not old else
          f"with noise multiplier {old.get('noise_multiplier')} and clip {old.get('l2_clip')}") + f" (this run: "
          f"{sigma:.4g}, {p.dp_l2_clip}): their guarantee would be wrong; start a new Run 1 (another "
          "generator_checkpoint_base_name)")
  spec = dataclasses.replace(run.state.spec, dp_clip=float(p.dp_l2_clip), dp_noise=float(sigma))
  if verbose:
    print(f"DP generators (record level, DP-SGD): clip {p.dp_l2_clip}, noise multiplier {sigma:.4f}, delta "
          f"{delta:.3g}; DP steps per round per (node, key) up to {int(accountant.steps_per_round.max())}; epsilon "
          f"after {rounds} rounds up to {accountant.epsilons(rounds).max():.3g}")
  return dataclasses.replace(run, state=run.state.replace(spec=spec)), accountant


def report_guarantee(cfg: Config, extra: dict, where: str, say: Any = print) -> Optional[dict]:
  """Run 2: states the epsilon of every restored node's generators (their synthetic features leave the node),
  or that they carry none; with ``dp_require_generators`` refuses the latter.

  Raises:
    GeneratorRunError: ``dp_require_generators`` and generators trained without DP.
  """
  dp = extra.get("dp")
  if not dp:
    if cfg.privacy.dp_require_generators:
      raise GeneratorRunError(f"config key 'dp_require_generators' is true but the generators of {where} were "
                              "trained without DP: their synthetic features carry no guarantee; train them with "
                              "'dp_level': 'record' in a generator-only Run 1")
    say(f"generators of {where}: trained WITHOUT differential privacy (their synthetic features carry no guarantee)")
    return None
  eps = ", ".join(f"node {i} {e:.3g}" for i, e in enumerate(dp["epsilon_per_node"]))
  say(f"generators of {where}: record-level DP, epsilon {eps} at delta {dp['delta']:.3g} (noise multiplier "
      f"{dp['noise_multiplier']:.4g}, clip {dp['l2_clip']}, {dp['rounds']} rounds)")
  return dp


def inherited_guarantee(cfg: Config, dp: Optional[dict]) -> Optional[dict]:
  """Run 2 without DP heads: when the heads see nothing of the real clips but the DP generators' synthetic features
  (no real train features, no server global training on class means), the run is post-processing of the
  generators and states their guarantee; else None."""
  g, f = cfg.generators, cfg.federation
  if dp is None or g.train_on_real_features or f.global_model_train:
    return None
  return {**dp, "inherited_from": "the generators (the heads train on their synthetic features only)"}


def generator_row(layout: gt.SlotLayout, metrics: dict[str, np.ndarray]) -> dict[str, float]:
  """Per-node round metrics: the last epoch's values, averaged over the node's slots (visits when shared)."""
  rows = np.asarray(metrics["rows"])
  out: dict[str, float] = {}
  for node in range(layout.num_nodes):
    cells = [(s, v) for s in range(rows.shape[0]) for v in range(rows.shape[1]) if rows[s, v] > 0
             and (v == node if layout.shared else layout.slot_node[s] == node)]
    if not cells:
      continue
    for k, name in METRIC_NAMES.items():
      if k in metrics:
        out[f"train/node_{node}/{name}"] = float(np.mean([np.asarray(metrics[k])[s, v, -1] for s, v in cells]))
    out[f"train/node_{node}/generator_num_samples"] = int(sum(rows[c] for c in cells))
  return out


def train_round(cfg: Config, run: Run1, round_: int) -> tuple[Run1, dict[str, float]]:
  """One round of generator training (every slot, one jitted vmapped call); returns the row entries."""
  t0 = time.time()
  key = jax.random.fold_in(run.key, round_)
  if run.state.layout.shared and cfg.generators.shared_generator_schedule == "interleaved":
    state = run.state  # every epoch visits the nodes in turn, one epoch each (the last epoch's metrics are kept)
    for e in range(cfg.generators.generator_training_epochs):
      state, metrics = gt.train_generators(state, run.pool, run.pool_labels, run.mask, jax.random.fold_in(key, e), 1,
                                           index=run.index)
  else:
    state, metrics = gt.train_generators(run.state, run.pool, run.pool_labels, run.mask, key, index=run.index)
  row = generator_row(state.layout, jax.device_get(metrics))
  bad = sorted({k.split("/")[1] for k, v in row.items() if not np.isfinite(v)})
  if bad:
    raise GeneratorRunError(f"non-finite generator losses in round {round_} at {bad}; stopping (the last "
                            "generator checkpoint is kept)")
  row["server/generator_seconds"] = round(time.time() - t0, 4)
  if run.validation is not None:
    row.update(gv.validate(state, run.validation, jax.random.fold_in(run_key(cfg, VALIDATION_SALT), round_)))
  return dataclasses.replace(run, state=state), row


# ---------------------------------------------------------------------------------------------
# Run 2.


def restore_pretrained(cfg: Config, nodes: NodeData, *, feature_dim: Optional[int] = None
                       ) -> tuple[gt.GenState, int, dict[str, Any]]:
  """Restores the latest complete generator round and checks it was trained for these nodes and data.

  Raises:
    generator_checkpoint.GeneratorCheckpointError: missing / partial / corrupt checkpoints, other generator
      settings, classes or shapes (found vs expected), another node count or data section.
  """
  g = cfg.generators
  names = nodes.clipset.class_names
  state, rnd = gc.restore_generators(g, feature_dim=feature_dim, num_classes=len(names), class_names=names)
  path = gc.round_dir(g, rnd)
  extra = json.loads((path / gc.MANIFEST).read_text()).get("extra") or {}
  problems = []
  if state.layout.num_nodes != nodes.num_nodes:
    problems.append(f"nodes: checkpoint has {state.layout.num_nodes}, expected {nodes.num_nodes}")
  if "data" in extra:
    problems += ckpt_lib.config_differences({"data": extra["data"]}, {"data": cfg.to_dict()["data"]})
  if problems:
    raise gc.GeneratorCheckpointError(
        f"{path} was written by a Run 1 on other data (its generators may have seen this run's test clips):\n  "
        + "\n  ".join(problems))
  return state, rnd, extra


def _cache_matches(cfg: Config, clipset: ClipSet, cache: Path) -> bool:
  fe = cfg.features
  try:
    m = json.loads((cache / "manifest.json").read_text())
  except (OSError, json.JSONDecodeError):
    return False
  want = {"sample_rate": fe.sample_rate, "mel": fe.num_mel_bins, "max_length": fe.max_length,
          "cls": fe.use_cls_token_only, "pooled": fe.pooled_tokens, "dtype": fe.cache_dtype, "long": fe.long_clips}
  return (all(m.get(k) == v for k, v in want.items()) and m.get("clip_ids") == [c.clip_id for c in clipset.clips]
          and m.get("clips") == features_lib.clips_digest(clipset))


def cached_features(cfg: Config, clipset: ClipSet, *, hint: Optional[str] = None,
                    verbose: bool = True) -> Optional[np.ndarray]:
  """Real AST features from the cache, or None; never constructs the AST.

  First the regular cache lookup with ``cache_only`` (its key hashes the AST weights, so this needs the AST
  directory; a miss raises instead of loading); then ``hint``, the cache Run 1 recorded, accepted if
  its manifest lists exactly these clips (ids and bytes) and feature settings.
  """
  from a2v_jax.backbones.paths import backbone_dir
  try:
    ast_dir = backbone_dir(cfg, "ast", create=False)
  except FileNotFoundError:
    ast_dir = None
  if ast_dir is not None and ast_dir.is_dir():
    try:
      return features_lib.ast_features(cfg, clipset, ast_dir=ast_dir, verbose=verbose, cache_only=True)
    except features_lib.FeatureCacheMiss as e:
      if verbose:
        print(f"AST features: {e}")
  if hint and _cache_matches(cfg, clipset, Path(hint)):
    if verbose:
      print(f"AST features: the cache Run 1 recorded, {hint}")
    return np.load(Path(hint) / "features.npy", mmap_mode="r")
  return None


def check_features(cfg: Config, state: gt.GenState, features: Optional[np.ndarray]) -> int:
  """The synthetic token count (= the heads' input tokens); errors when the real features disagree."""
  spec = state.spec
  if features is None:
    length = cfg.generators.generator_output_sequence_length or spec.source_length
    return length
  t, d = (int(v) for v in features.shape[1:])
  if d != spec.feature_dim:
    raise gc.GeneratorCheckpointError(f"the generators model {spec.feature_dim}-d features, the feature cache holds "
                                      f"{d}-d ones")
  want = cfg.generators.generator_output_sequence_length
  if want is not None and want != t:
    raise GeneratorRunError(f"config key 'generator_output_sequence_length' is {want}, but the heads read the cached "
                            f"features' {t} tokens; set it to {t} or null")
  if spec.source_length != t and want is None:
    raise gc.GeneratorCheckpointError(
        f"the generators were trained on features of {spec.source_length} tokens, this run's cached features have "
        f"{t} (another pooled_tokens / max_length than Run 1's); their samples would have to be resampled to {t} "
        f"tokens, which is refused unless asked for: set 'generator_output_sequence_length': {t}, or train the "
        "generators on these features")
  return t


def synthetic_counts(cfg: Config, nodes: NodeData) -> np.ndarray:
  """(C, K) samples per node and class from the nodes' train labels."""
  index, mask = _padded(_train_rows(nodes))
  return gt.synthetic_counts(cfg.generators, nodes.clipset.labels, mask, len(nodes.clipset.class_names),
                             index=index)


@dataclasses.dataclass(frozen=True)
class SyntheticRows:
  """Where Run 2's extra rows sit in the features: [real | class means | synthetic]."""
  offset: int           # first synthetic row
  count: int            # synthetic rows (node-major, then class: ``draw``'s order)
  mean_offset: int      # first class-mean row (the nodes' per-class mean real features)
  mean_count: int       # class-mean rows (0 unless global training with real features)
  server_row: dict      # server/synthetic_samples_{total,classes} when every node takes part
  nodes: np.ndarray     # (count + mean_count,) the node each ``server_indices`` row comes from

  def server_indices(self) -> np.ndarray:
    """Rows the server's global training reads: every node's synthetic rows, then the class means."""
    return np.concatenate([np.arange(self.offset, self.offset + self.count),
                           np.arange(self.mean_offset, self.mean_offset + self.mean_count)]).astype(np.int64)


def add_synthetic(cfg: Config, prepared: Any, state: gt.GenState, scale: FeatureScale, length: int, *,
                  verbose: bool = True) -> tuple[Any, SyntheticRows]:
  """Appends every node's synthetic rows (and, for global training, its per-class mean real features)
  to the prepared data (a new Prepared; the input is kept).

  Rows are ordinary rows of ``features`` with ordinary clip records (path ``<synthetic>`` /
  ``<class mean>``, split ``train``), laid out [real | class means | synthetic] so that a redraw replaces
  one contiguous tail. Node n's train indices are its real train rows (when real features exist and
  ``train_on_real_features``) and its own synthetic rows (``train_on_synthetic_features``); the class
  means belong to no node (the server's global training reads them). Without real features only
  synthetic rows remain and val / test are empty.

  Raises:
    GeneratorRunError: the generators cannot draw what the nodes hold, or a node would have nothing
      to train on.
  """
  g, f = cfg.generators, cfg.federation
  nodes, names = prepared.nodes, prepared.class_names
  counts = synthetic_counts(cfg, nodes)
  try:
    x, y, valid = draw(state, scale, synthetic_key(cfg, 1), counts, length)
  except ValueError as e:
    raise GeneratorRunError(f"Run 2 cannot draw the synthetic features its nodes need: {e}") from e
  real = prepared.features
  info, lines = server_train.aggregate_counts(counts, names)
  means = np.zeros((0,) + x.shape[2:], np.float32)
  mnode = np.zeros((0,), np.int64)
  mean_clips: list[Clip] = []
  if real is not None and f.global_model_train and g.train_on_real_features:
    means, mlab, mnode = server_train.class_means(real, nodes.clipset.labels, _train_rows(nodes))
    mean_clips = [Clip(path="<class mean>", label=int(c), group=f"class_mean_node{n}",
                       clip_id=f"class_mean_n{n}_c{c}", split="train") for c, n in zip(mlab, mnode)]
  base = 0 if real is None else len(nodes.clipset)
  offset = base + len(means)
  clips, feats, new_nodes = [], [], []
  for n, node in enumerate(nodes.nodes):
    xs, ys = x[n][valid[n]], y[n][valid[n]]
    start = offset + sum(len(a) for a in feats)
    feats.append(xs)
    clips += [Clip(path="<synthetic>", label=int(c), group=f"synthetic_node{n}", clip_id=f"synthetic_n{n}_{j}",
                   split="train") for j, c in enumerate(ys)]
    own = np.arange(start, start + len(xs)) if g.train_on_synthetic_features else np.zeros((0,), np.int64)
    if real is None:
      empty = np.zeros((0,), np.int64)
      new_nodes.append({"train": own, "val": empty, "test": empty})
    else:
      mine = np.asarray(node["train"], np.int64) if g.train_on_real_features else np.zeros((0,), np.int64)
      new_nodes.append(dict(node, train=np.concatenate([mine, own])))
  idle = [n for n, node in enumerate(new_nodes) if len(node["train"]) == 0]
  if idle:
    raise GeneratorRunError(
        f"Run 2: node(s) {idle} would train on nothing (train_on_real_features={g.train_on_real_features}, "
        f"train_on_synthetic_features={g.train_on_synthetic_features}, real features "
        f"{'present' if real is not None else 'absent: no feature cache'})")
  syn = np.concatenate(feats)
  extra = mean_clips + clips
  if real is None:
    clipset = ClipSet(f"{nodes.clipset.name}_synthetic", names, tuple(clips))
    features = syn
  else:
    clipset = ClipSet(f"{nodes.clipset.name}+synthetic", names, nodes.clipset.clips + tuple(extra))
    features = np.concatenate([np.asarray(real, np.float32), means, syn])
  syn_nodes = np.repeat(np.arange(len(feats)), [len(a) for a in feats])
  rows = SyntheticRows(offset, len(syn), base, len(means), info,
                       np.concatenate([syn_nodes, mnode]).astype(np.int32))
  if verbose:
    real_part = (" real" if g.train_on_real_features else "") if real is not None else ""
    syn_part = " + synthetic" if g.train_on_synthetic_features else ""
    what = (real_part + syn_part).strip(" +") or "nothing"
    if real is None:
      what += " (no feature cache: real evaluation is unavailable)"
    print(f"Run 2: {info['server/synthetic_samples_total']} synthetic rows of {tuple(syn.shape[1:])} over "
          f"{info['server/synthetic_samples_classes']} classes; nodes train on {what}")
    if f.global_model_train:
      print("\n".join(lines))
      print(f"server: global training on {len(syn)} synthetic rows"
            + (f" + {len(means)} per-class mean real features" if len(means) else "")
            + f", {f.global_model_train_epochs} epoch(s) per round, targets: "
            + ("the nodes' heads' per-class mean outputs" if f.global_model_train_from_nodes_adapters
               else "the class text embeddings"))
  return dataclasses.replace(prepared, nodes=NodeData(clipset, tuple(new_nodes)), features=features), rows


def synthetic_key(cfg: Config, round_: int) -> PRNGKey:
  """Key of the synthetic rows used in ``round_`` (round 1: the start-up draw)."""
  return jax.random.fold_in(run_key(cfg, SYNTHETIC_SALT), round_)


def redraw_synthetic(cfg: Config, state: gt.GenState, scale: FeatureScale, counts: np.ndarray, length: int,
                     round_: int) -> np.ndarray:
  """Fresh synthetic rows for ``round_``, in :func:`add_synthetic`'s row order (node, then class): the
  same labels, new latents. Same shapes every round, so nothing recompiles."""
  x, _, valid = draw(state, scale, synthetic_key(cfg, round_), counts, length)
  return x[valid]


def kd_features(state: gt.GenState, scale: FeatureScale, key: PRNGKey, per_class: int, length: int,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """``per_class`` generator features per trained class for KD (split over the nodes holding it).

  Labels do not enter KD (the teacher is the clients' mean output), so an unconditioned generator of
  several classes contributes its mixture. Shapes depend only on the counts: one compile per run.

  Returns:
    (x (M, length, D), mask (M,)), M padded to a multiple of ``batch_size``.
  """
  layout, seen = state.layout, np.asarray(state.seen)
  counts = np.zeros((layout.num_nodes, state.spec.num_classes), np.int64)
  for c in range(state.spec.num_classes):
    holders = [n for n in range(layout.num_nodes)
               if (s := layout.slot_for_class(n, c)) is not None and seen[s, c]]
    holders = holders[:1] if layout.shared else holders
    for i, n in enumerate(holders):
      counts[n, c] = per_class // len(holders) + (i < per_class % len(holders))
  if not counts.any():
    raise GeneratorRunError("KD needs generator features, but no generator has been trained on any class")
  x, _, valid = draw(state, scale, key, counts, length, allow_mixture=True)
  return pad_rows(x[valid], batch_size)
