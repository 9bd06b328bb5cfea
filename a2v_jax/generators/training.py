"""Federated generator training (Run 1) and sampling (Run 2), every generator in one jit(vmap).

Slots. A *slot* is one generator (one param set, one AdamW state). Its *key* follows
``generator_granularity``: ``unified`` -> the single key ``all``; ``per_class`` -> one key per class;
``per_group`` -> one key per group of ``generator_class_groups`` (classes in no group -> ``other``).

* Non-shared (default): one slot per (node, key) pair present in the nodes' training data, i.e. the
  (node x key) grid flattened and compacted to the pairs that have rows (10 one-class nodes with
  ``per_class`` hold 10 slots, not 100). Slots train side by side: ``jax.jit(jax.vmap(train_slot))``.
* Shared (``generator_only_mode`` and ``shared_generator_in_only_mode``): one slot per key, shared by
  every node. Its params and optimiser state are threaded through the nodes' data in node order by a
  ``lax.scan`` over nodes -- the functional form of the reference's single server instance that all
  clients train one after another. ``unified`` + shared is ONE param set; ``per_class`` +
  shared is one per class, each still scanned over nodes (and the classes vmapped).

Both cases are the same program: ``train_slot`` scans over V *visits* (V = 1 non-shared, V = nodes
shared); a visit scans over epochs, an epoch over fixed-size batches. Rows are gathered from one feature
pool by (G, V, M) index arrays padded to a multiple of ``generator_batch_size``; padding rows carry
mask 0, a batch without valid rows leaves params and optimiser state untouched, the epoch shuffle
hashes each row's *position*, and every visit / epoch / batch key is a ``fold_in`` of indices that do
not depend on padding or on the other slots; so unequal clients share one compiled program (compiled
once per configuration and padded size) and give exactly what a per-client loop gives.

Reset (``reset_generator_on_class_change``, default off as in the design notes). Our generators are trained
once per slot and continue across rounds (the reference retrained every class from scratch every
round). With the flag on, the design notes' rule, tracked per node as its
``previously_trained_classes``: when a node that has trained before brings classes it has not trained
(``GenState.node_seen``), the generators those new classes map to are re-initialised (params, AdamW
state, epoch counter, seen classes) before that node's visit -- ``per_class``: the new classes'
generators only; ``per_group``: the generators of groups holding a new class; ``unified``: the
generator, on any new class. A node's FIRST training is not a class change: it resets nothing, so a
shared generator is joined, not wiped, by each node in turn (the reference reset it at every node's
first visit and ended knowing only the last node's classes). With fixed node data nothing is reset;
resets are for class-incremental data (a node's classes growing between calls). ``node_seen`` is part
of the checkpoint, so a resumed run resets exactly what a straight one does (the reference lost it).

Schedules. The VAE loss's beta / cosine-weight schedules are evaluated at the number of
epochs the slot has trained since its last (re)initialisation, with E = ``generator_training_epochs``:
the first call reproduces the reference exactly, later rounds continue at the schedules' floors.

Optimiser: optax ``clip_by_global_norm(5)`` then ``adamw(generator_learning_rate, weight_decay=1e-5)``
(the reference's clip and decay); a GAN has one such state for each of its two networks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from a2v_jax.config import TEXT_CONDITIONS, ConfigError, GeneratorConfig, generator_condition
from a2v_jax.federated import privacy
from a2v_jax.models import generators as gen
from a2v_jax.types import Metrics, OptState, Params, PRNGKey

WEIGHT_DECAY = 1e-5  # the reference's generator AdamW decay (no config key)
GRAD_CLIP = 5.0      # the reference's clip_grad_norm_ value


# ---------------------------------------------------------------------------------------------
# Static description: what a generator is, and which slot serves which (node, class).


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
  """Everything that fixes a generator's shapes and its training program (hashable: a jit key)."""
  generator_type: str          # "vae" or "gan"
  conditioned: bool            # class-conditioned (condition = cond_table[label])
  feature_dim: int             # D
  seq_len: int                 # S, tokens the generator models
  source_length: int           # T, token count of the features it was trained from
  hidden_dim: int
  latent_dim: int
  num_classes: int             # K
  cond_dim: int                # width of the condition table (K for one-hot)
  batch_size: int
  learning_rate: float
  total_epochs: int            # E of the VAE loss schedules
  noise_std: float             # denoising input noise (0 = no augmentation)
  reset_on_new_class: bool
  condition: str = "none"      # what cond_table holds: "onehot", "text", "t5_clip" (text embeddings) or "none"
  kl_weight: float = gen.REFERENCE_KL_WEIGHT  # ceiling of the VAE loss's beta schedule
  class_prior: bool = False    # a conditioned VAE's learned prior mean per condition (models.generators)
  architecture: str = "token"  # "token" (ours) or "reference_mlp" (the reference's flattening MLP VAE)
  weight_decay: float = WEIGHT_DECAY
  grad_clip: float = GRAD_CLIP
  # DP-SGD (record-level DP of the generators, ``privacy.dp_level: record`` in a generator-only Run 1): each
  # example's gradient clipped to dp_clip, Gaussian noise of dp_noise * dp_clip on the sum, / batch size. 0 = off.
  dp_clip: float = 0.0
  dp_noise: float = 0.0

  @classmethod
  def from_config(cls, cfg: GeneratorConfig, feature_shape: Sequence[int], num_classes: int,
                  cond_dim: Optional[int] = None) -> "GeneratorSpec":
    """Builds the spec from the config; ``feature_shape`` = (T, D) of the cached features.

    ``generator_type`` 'cvae', or 'vae' with ``use_conditioned_vae``, is a conditioned VAE;
    ``use_conditioned_vae`` with 'gan' conditions the GAN's generator and discriminator alike.
    """
    source_length, feature_dim = (int(v) for v in feature_shape[-2:])
    conditioned = cfg.generator_type == "cvae" or cfg.use_conditioned_vae
    return cls(
        generator_type="gan" if cfg.generator_type == "gan" else "vae",
        conditioned=conditioned,
        feature_dim=feature_dim, seq_len=cfg.generator_training_sequence_length,
        source_length=source_length, hidden_dim=cfg.generator_hidden_dim,
        latent_dim=cfg.generator_latent_dim, num_classes=int(num_classes),
        cond_dim=int(num_classes if cond_dim is None else cond_dim), batch_size=cfg.generator_batch_size,
        learning_rate=cfg.generator_learning_rate, total_epochs=cfg.generator_training_epochs,
        noise_std=cfg.generator_augmentation_noise if cfg.generator_augmentation else 0.0,
        reset_on_new_class=cfg.reset_generator_on_class_change,
        condition=generator_condition(cfg) or "none", kl_weight=cfg.generator_kl_weight,
        class_prior=conditioned and cfg.generator_type != "gan", architecture=cfg.generator_architecture)

  def model_fields(self) -> dict[str, Any]:
    """The fields that fix the parameter shapes (what a checkpoint must agree on)."""
    keys = ("generator_type", "conditioned", "condition", "feature_dim", "seq_len", "hidden_dim", "latent_dim",
            "num_classes", "cond_dim", "class_prior", "architecture")
    return {k: getattr(self, k) for k in keys}

  def model_hash(self) -> str:
    return hashlib.sha256(json.dumps(self.model_fields(), sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SlotLayout:
  """Which generator slot serves which (node, key); tuples only, so it is hashable and JSON-able."""
  granularity: str
  shared: bool
  keys: tuple[str, ...]            # key names, e.g. ("all",), class names, group names
  class_to_key: tuple[int, ...]    # (K,) key index of each class
  slot_node: tuple[int, ...]       # (G,) node of each slot, -1 when shared
  slot_key: tuple[int, ...]        # (G,) key index of each slot
  num_nodes: int
  class_names: Optional[tuple[str, ...]] = None

  @property
  def num_slots(self) -> int:
    return len(self.slot_key)

  def slot_of(self, node: int, key: int) -> Optional[int]:
    """Slot serving key index ``key`` on ``node`` (None when absent)."""
    for s, (n, k) in enumerate(zip(self.slot_node, self.slot_key)):
      if k == key and (self.shared or n == node):
        return s
    return None

  def slot_for_class(self, node: int, cls: int) -> Optional[int]:
    return self.slot_of(node, self.class_to_key[cls])

  def class_name(self, cls: int) -> str:
    return self.class_names[cls] if self.class_names else str(cls)

  def describe(self) -> list[dict[str, Any]]:
    """One dict per slot: node (None when shared), key, classes the key covers."""
    return [{"slot": s, "node": None if self.shared else n, "key": self.keys[k],
             "classes": [c for c, kc in enumerate(self.class_to_key) if kc == k]}
            for s, (n, k) in enumerate(zip(self.slot_node, self.slot_key))]


@flax.struct.dataclass
class GenState:
  """All generators of a run; every array leaf has a leading slot axis G except ``cond_table``."""
  params: Params          # (G, ...)
  opt_state: OptState     # (G, ...)
  epoch: jax.Array        # (G,) int32, epochs trained since (re)initialisation
  seen: jax.Array         # (G, K) bool, classes trained on since (re)initialisation
  node_seen: jax.Array    # (nodes, K) bool, classes each node has trained on (the design notes' per-node set)
  cond_table: jax.Array   # (K, cond_dim) condition of each class (one-hot unless given)
  spec: GeneratorSpec = flax.struct.field(pytree_node=False)
  layout: SlotLayout = flax.struct.field(pytree_node=False)

  def arrays(self) -> dict[str, Any]:
    """The array part (what a checkpoint stores)."""
    return {"params": self.params, "opt_state": self.opt_state, "epoch": self.epoch,
            "seen": self.seen, "node_seen": self.node_seen, "cond_table": self.cond_table}


# ---------------------------------------------------------------------------------------------
# Host-side bookkeeping: rows of each node, keys, layout, synthetic counts.


def _node_rows(labels: Any, mask: Any, index: Any = None) -> tuple[np.ndarray, list[np.ndarray]]:
  """(labels of the pool rows, valid pool rows of each node) from (C, N) or pool + index form."""
  mask = np.asarray(mask).astype(bool)
  if index is None:
    labels = np.asarray(labels)
    if labels.shape != mask.shape:
      raise ValueError(f"labels {labels.shape} and mask {mask.shape} must both be (C, N)")
    n = mask.shape[1]
    return labels.reshape(-1), [c * n + np.flatnonzero(mask[c]) for c in range(mask.shape[0])]
  index = np.asarray(index)
  if index.shape != mask.shape:
    raise ValueError(f"index {index.shape} and mask {mask.shape} must both be (C, N)")
  return np.asarray(labels).reshape(-1), [index[c][mask[c]] for c in range(mask.shape[0])]


def _keys(cfg: GeneratorConfig, num_classes: int,
          class_names: Optional[Sequence[str]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(key names, class -> key index) for the configured granularity."""
  name = (lambda c: class_names[c]) if class_names else str
  if cfg.generator_granularity == "unified":
    return ("all",), (0,) * num_classes
  if cfg.generator_granularity == "per_class":
    return tuple(name(c) for c in range(num_classes)), tuple(range(num_classes))
  groups = dict(cfg.generator_class_groups or {})
  keys, class_to_key = list(groups), [-1] * num_classes
  for g, members in enumerate(groups.values()):
    for m in members:
      if isinstance(m, int) and 0 <= m < num_classes:
        c = m
      elif class_names and m in class_names:
        c = list(class_names).index(m)
      else:
        raise ConfigError(f"config key 'generator_class_groups': group '{keys[g]}' lists unknown class {m!r}; "
                          f"classes are {list(class_names) if class_names else list(range(num_classes))}")
      if class_to_key[c] not in (-1, g):
        raise ConfigError(f"config key 'generator_class_groups': class {name(c)!r} is in groups "
                          f"'{keys[class_to_key[c]]}' and '{keys[g]}'")
      class_to_key[c] = g
  if -1 in class_to_key:
    keys.append("other")
    class_to_key = [len(keys) - 1 if k == -1 else k for k in class_to_key]
  return tuple(keys), tuple(class_to_key)


def make_layout(cfg: GeneratorConfig, labels: Any, mask: Any, num_classes: int, *,
                index: Any = None, class_names: Optional[Sequence[str]] = None) -> SlotLayout:
  """Slots for the nodes' training data: every (node, key) pair with rows, or every key when shared.

  Args:
    cfg: generator config (granularity, groups, only-mode sharing).
    labels: (C, N) class of each row, or (R,) pool labels when ``index`` is given.
    mask: (C, N) valid rows.
    num_classes: K.
    index: optional (C, N) pool row of each node row.
    class_names: optional K names (key names of per_class; names allowed in class groups).
  """
  keys, class_to_key = _keys(cfg, num_classes, class_names)
  pool_labels, rows = _node_rows(labels, mask, index)
  shared = cfg.generator_only_mode and cfg.shared_generator_in_only_mode
  present = [sorted({class_to_key[int(c)] for c in pool_labels[r]}) for r in rows]
  if shared:
    slot_key = tuple(sorted({k for p in present for k in p}))
    slot_node = (-1,) * len(slot_key)
  else:
    pairs = [(n, k) for n, p in enumerate(present) for k in p]
    slot_node, slot_key = tuple(n for n, _ in pairs), tuple(k for _, k in pairs)
  return SlotLayout(cfg.generator_granularity, shared, keys, class_to_key, slot_node, slot_key,
                    len(rows), tuple(class_names) if class_names else None)


def synthetic_counts(cfg: GeneratorConfig, labels: Any, mask: Any, num_classes: int, *,
                     index: Any = None) -> np.ndarray:
  """(C, K) synthetic samples per node and class.

  ``'auto'``: ``max(1, train rows // classes present)`` for each class the node holds; an integer:
  that count for each class the node holds (the reference used every available class; we only
  have generators for classes a node trained on).
  """
  pool_labels, rows = _node_rows(labels, mask, index)
  counts = np.zeros((len(rows), num_classes), np.int64)
  for n, r in enumerate(rows):
    present = np.unique(pool_labels[r])
    if present.size:
      spc = cfg.synthetic_samples_per_class
      counts[n, present] = max(1, len(r) // present.size) if spc == "auto" else int(spc)
  return counts


def _row_order(key: PRNGKey, valid: jax.Array) -> jax.Array:
  """A shuffle of row positions, valid rows first, from an integer hash of (key, position).

  Why a hash: the order of row i must not depend on how many padding rows follow (so padding is
  irrelevant), and a murmur3 finaliser compiles to a handful of ops where a threefry draw per row
  would cost seconds of XLA compile time on CPU.
  """
  data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  seed = data.reshape(-1).astype(jnp.uint32)

  def fmix(h):
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)

  h = fmix(fmix(jnp.arange(valid.shape[0], dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) ^ seed[0]) ^ seed[-1])
  return jnp.argsort(jnp.where(valid, h, jnp.uint32(0xFFFFFFFF)), stable=True)


# ---------------------------------------------------------------------------------------------
# Models, init and one optimisation step, for ONE slot.


def optimizer(spec: GeneratorSpec) -> optax.GradientTransformation:
  """Clip to global norm 5, then AdamW (reference decay 1e-5)."""
  return optax.chain(optax.clip_by_global_norm(spec.grad_clip),
                     optax.adamw(spec.learning_rate, weight_decay=spec.weight_decay))


def models(spec: GeneratorSpec) -> dict[str, Any]:
  """The linen modules of a slot: {"vae"} or {"generator", "discriminator"}."""
  cond_dim = spec.cond_dim if spec.conditioned else 0
  if spec.generator_type == "vae":
    cls = (gen.ReferenceVAEGenerator if spec.architecture == "reference_mlp" else
           gen.ConditionedVAEGenerator if spec.conditioned else gen.VAEGenerator)
    return {"vae": cls(feature_dim=spec.feature_dim, hidden_dim=spec.hidden_dim, latent_dim=spec.latent_dim,
                       seq_len=spec.seq_len, cond_dim=cond_dim, class_prior=spec.class_prior)}
  return {"generator": gen.GANGenerator(feature_dim=spec.feature_dim, hidden_dim=spec.hidden_dim,
                                        latent_dim=spec.latent_dim, seq_len=spec.seq_len, cond_dim=cond_dim),
          "discriminator": gen.GANDiscriminator(hidden_dim=spec.hidden_dim, seq_len=spec.seq_len, cond_dim=cond_dim)}


def _init_std(shapes: Params) -> np.ndarray:
  """Per-element std of the init draw, in ravel order: LeCun normal for kernels (linen's default,
  untruncated), 0 for biases, 1 for the token / position embedding tables."""
  def std(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    value = 0.0 if name == "bias" else 1.0 if name.endswith("embedding") else 1.0 / math.sqrt(leaf.shape[0])
    return np.full(leaf.shape, value, np.float32)
  return ravel_pytree(jax.tree_util.tree_map_with_path(std, shapes))[0]


def init_slot(spec: GeneratorSpec, key: PRNGKey) -> tuple[Params, OptState]:
  """(params, AdamW state) of one fresh generator.

  Params: the modules' shapes (``jax.eval_shape`` of ``init``) filled from ONE normal draw scaled per
  leaf (see ``_init_std``): the modules' own initialisers draw once per leaf, and each threefry draw
  costs a compile on CPU. The AdamW state is over the *raveled* params (one flat vector per network),
  so the optimiser compiles to a few fused ops rather than a few per leaf; params stay a tree.
  """
  m, tx = models(spec), optimizer(spec)
  x = jax.ShapeDtypeStruct((1, spec.seq_len, spec.feature_dim), jnp.float32)
  z = jax.ShapeDtypeStruct((1, spec.latent_dim), jnp.float32)
  cond = jax.ShapeDtypeStruct((1, spec.cond_dim), jnp.float32) if spec.conditioned else None
  k0 = jax.random.key(0)
  if spec.generator_type == "vae":
    shapes = {"vae": jax.eval_shape(m["vae"].init, k0, x, z, cond)}
  else:
    shapes = {"generator": jax.eval_shape(m["generator"].init, k0, z, cond),
              "discriminator": jax.eval_shape(m["discriminator"].init, k0, x, cond)}
  std = _init_std(shapes)
  flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes))
  nets = unravel(jax.random.normal(key, flat.shape) * std)
  opt = {k: tx.init(ravel_pytree(v)[0]) for k, v in nets.items()}
  return (nets["vae"], opt["vae"]) if spec.generator_type == "vae" else (nets, opt)


_init_slot_jit = jax.jit(init_slot, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_slots(spec: GeneratorSpec, key: PRNGKey, num_slots: int) -> tuple[Params, OptState]:
  """``init_slot`` broadcast to a leading slot axis, in one program (no per-leaf eager broadcasts)."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_slots,) + a.shape), init_slot(spec, key))


def _make_step(spec: GeneratorSpec, unravel: Any) -> Callable:
  """``step(flat, opt, xb, yb, mb, key, epoch, cond_table) -> (flat, opt, parts)`` on one batch.

  ``flat`` is the raveled params (a dict of two for the GAN), ``unravel`` its inverse. All randomness
  of a step (input noise, then the reparameterisation noise or the GAN's z) comes from one normal draw.
  """
  m, tx = models(spec), optimizer(spec)
  feat = spec.seq_len * spec.feature_dim if spec.noise_std else 0

  def draw(xb, key):
    r = jax.random.normal(key, (xb.shape[0], feat + spec.latent_dim), xb.dtype)
    x = xb + spec.noise_std * r[:, :feat].reshape(xb.shape) if feat else xb
    return x, r[:, feat:]

  vae_grads = make_vae_grads(spec, unravel) if spec.generator_type == "vae" else None

  def vae_step(flat, opt_state, xb, yb, mb, key, epoch, cond_table):
    x_in, eps = draw(xb, key)
    grads, parts = vae_grads(flat, x_in, xb, yb, mb, eps, key, epoch, cond_table)
    updates, opt_state = tx.update(grads, opt_state, flat)
    return flat + updates, opt_state, parts

  def gan_step(flat, opt_state, xb, yb, mb, key, epoch, cond_table):
    del epoch
    real, z = draw(xb, key)  # input noise on the real rows acts as instance noise for D
    cond = cond_table[yb] if spec.conditioned else None
    g = lambda f, z: m["generator"].apply(unravel["generator"](f), z, cond)
    d = lambda f, x: m["discriminator"].apply(unravel["discriminator"](f), x, cond)
    fake = jax.lax.stop_gradient(g(flat["generator"], z))

    def d_loss_fn(fd):  # discriminator step, fakes fixed
      _, parts = gen.gan_losses(d(fd, real), d(fd, fake), mb)
      return parts["d_loss"], parts

    (_, parts), gd = jax.value_and_grad(d_loss_fn, has_aux=True)(flat["discriminator"])
    ud, od = tx.update(gd, opt_state["discriminator"], flat["discriminator"])
    fd = flat["discriminator"] + ud

    def g_loss_fn(fg):  # generator step against the updated discriminator
      return gen.gan_losses(jnp.zeros(xb.shape[0]), d(fd, g(fg, z)), mb)[1]["g_loss"]

    g_loss, gg = jax.value_and_grad(g_loss_fn)(flat["generator"])
    ug, og = tx.update(gg, opt_state["generator"], flat["generator"])
    parts = dict(parts, g_loss=g_loss, loss=parts["d_loss"] + g_loss)
    return {"generator": flat["generator"] + ug, "discriminator": fd}, {"generator": og, "discriminator": od}, parts

  return vae_step if spec.generator_type == "vae" else gan_step


def make_vae_grads(spec: GeneratorSpec, unravel: Any) -> Callable:
  """``grads(flat, x_in, x, y, mask, eps, key, epoch, cond_table) -> (gradient, loss parts)`` of one VAE batch
  (``x_in`` the noisy input, ``x`` the clean target, ``eps`` the reparameterisation noise).

  Without DP: the gradient of the batch's masked mean loss. With ``spec.dp_clip`` (DP-SGD): every row's own
  gradient (its loss as a batch of one), each clipped to ``dp_clip``, summed with Gaussian noise of std
  ``dp_noise * dp_clip``, / the batch size; the noise key is folded from the step's key. The parts are the rows'
  means either way.
  """
  vae = models(spec)["vae"]

  def plain(flat, x_in, x, y, mask, eps, key, epoch, cond_table):
    cond = cond_table[y] if spec.conditioned else None

    def loss_fn(f):
      x_hat, mu, logvar = vae.apply(unravel(f), x_in, eps, cond)
      return gen.vae_loss(x_hat, x, mu, logvar, epoch, spec.total_epochs, mask, spec.kl_weight)

    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(flat)
    return grads, parts

  def dp(flat, x_in, x, y, mask, eps, key, epoch, cond_table):
    def one(f, xi, xc, yi, ei):
      cond = cond_table[yi][None] if spec.conditioned else None
      x_hat, mu, logvar = vae.apply(unravel(f), xi[None], ei[None], cond)
      return gen.vae_loss(x_hat, xc[None], mu, logvar, epoch, spec.total_epochs, None, spec.kl_weight)

    per, parts = privacy.per_example_grads(one, flat, x_in, x, y, eps)
    summed, _ = privacy.clipped_noisy_sum(per, mask, spec.dp_clip, spec.dp_noise,
                                          jax.random.fold_in(key, privacy.NOISE_SALT))
    w = mask.astype(jnp.float32)
    parts = {k: jnp.sum(v * w) / jnp.maximum(w.sum(), 1.0) for k, v in parts.items()}
    return summed / spec.batch_size, parts

  return dp if spec.dp_clip else plain


def _ravel(spec: GeneratorSpec, params: Params) -> tuple[Any, Any]:
  if spec.generator_type == "vae":
    return ravel_pytree(params)
  pairs = {k: ravel_pytree(v) for k, v in params.items()}
  return {k: f for k, (f, _) in pairs.items()}, {k: u for k, (_, u) in pairs.items()}


def _where(pred: jax.Array, a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_slot_trainer(spec: GeneratorSpec, epochs: int, with_reset: bool = False) -> Callable:
  """``train_slot(carry, pool, rows, rmask, ylab, vid, epoch0, reset, fresh, key, cond_table)`` for ONE slot.

  Args of the returned function:
    carry: (params, opt_state) of the slot.
    pool: (R, S, D) feature pool (already pooled to S tokens).
    rows, rmask, ylab: (V, M) pool row, validity and label of each row of each visit; M % B == 0.
    vid: (V,) global visit ids (slot * V + visit): visit j draws from ``fold_in(key, vid[j])``, then
      epoch e from ``fold_in(., e)`` and batch b from ``fold_in(., b)`` -- a visit's randomness is its
      own whatever other slots exist or how much padding there is (what makes vmapped == looped).
    epoch0: (V,) schedule epoch at the start of each visit.
    reset: (V,) re-initialise (to ``fresh``) before the visit; used only when ``with_reset``.
    fresh: (params, opt_state) of a fresh generator, or None.
    key: the call's PRNG key (shared by all slots).
    cond_table: (K, cond_dim).

  Returns:
    (carry, metrics), metrics {name: (V, epochs)}: means over each epoch's batches that had rows.
  """
  bsz = spec.batch_size

  def visit(carry, inp, pool, fresh, key, cond_table, step_fn):
    rows, m, y, vid, epoch0, reset = inp
    kv = jax.random.fold_in(key, vid)
    if with_reset:
      carry = _where(reset, fresh, carry)
    x, steps = pool[rows], rows.shape[0] // bsz

    def epoch_fn(c, e):
      ek = jax.random.fold_in(kv, e)
      perm = _row_order(ek, m > 0).reshape(steps, bsz)

      def batch_fn(c, inp):
        s, idx = inp
        mb = m[idx]
        p, o, parts = step_fn(*c, x[idx], y[idx], mb, jax.random.fold_in(ek, s), epoch0 + e, cond_table)
        ok = mb.sum() > 0
        return _where(ok, (p, o), c), (parts, ok)

      c, (parts, ok) = jax.lax.scan(batch_fn, c, (jnp.arange(steps), perm))
      n = jnp.maximum(ok.sum(), 1)
      return c, {k: jnp.sum(v * ok) / n for k, v in parts.items()}

    return jax.lax.scan(epoch_fn, carry, jnp.arange(epochs))

  def train_slot(carry, pool, rows, rmask, ylab, vid, epoch0, reset, fresh, key, cond_table):
    (flat, unravel), opt_state = _ravel(spec, carry[0]), carry[1]
    if with_reset:
      fresh = (_ravel(spec, fresh[0])[0], fresh[1])
    step_fn = _make_step(spec, unravel)
    (flat, opt_state), metrics = jax.lax.scan(lambda c, i: visit(c, i, pool, fresh, key, cond_table, step_fn),
                                              (flat, opt_state), (rows, rmask, ylab, vid, epoch0, reset))
    params = unravel(flat) if spec.generator_type == "vae" else {k: unravel[k](v) for k, v in flat.items()}
    return (params, opt_state), metrics

  return train_slot


@functools.lru_cache(maxsize=None)
def _compiled_train(spec: GeneratorSpec, epochs: int, backend: str, with_reset: bool) -> Callable:
  """One jitted program per (spec, epochs, backend, reset variant); shapes add cache entries only
  when the padded row count changes."""
  fn = make_slot_trainer(spec, epochs, with_reset)
  if backend == "loop":
    return jax.jit(fn)
  return jax.jit(jax.vmap(fn, in_axes=(0, None, 0, 0, 0, 0, 0, 0, None, None, None)), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Public API.


def init_generators(key: PRNGKey, cfg: GeneratorConfig, layout: SlotLayout, feature_shape: Sequence[int],
                    num_classes: int, cond_table: Optional[Any] = None) -> GenState:
  """Fresh generators for every slot of ``layout``.

  Every slot starts from the same draw of ``key``: the slots are independent models of different
  data and need no different starting points, and one small init program serves any slot count.

  Args:
    key: PRNG key.
    cfg: generator config.
    layout: from :func:`make_layout`.
    feature_shape: (T, D) of the cached features (T is recorded; the model sees S tokens).
    num_classes: K.
    cond_table: optional (K, E) class conditions (e.g. text embeddings); default one-hot (K, K).
  """
  table = jnp.eye(num_classes) if cond_table is None else jnp.asarray(cond_table, jnp.float32)
  if table.shape[0] != num_classes:
    raise ValueError(f"cond_table has {table.shape[0]} rows, expected one per class ({num_classes})")
  spec = GeneratorSpec.from_config(cfg, feature_shape, num_classes, table.shape[1])
  if spec.condition in TEXT_CONDITIONS and cond_table is None:
    raise ValueError(f"generator_condition {spec.condition!r} needs the class text embeddings as cond_table")
  return _fresh_state(spec, layout, key, table)


def _fresh_state(spec: GeneratorSpec, layout: SlotLayout, key: PRNGKey, table: jax.Array) -> GenState:
  g = layout.num_slots
  params, opt_state = _init_slots(spec, key, g)
  return GenState(params, opt_state, jnp.zeros((g,), jnp.int32), jnp.zeros((g, spec.num_classes), bool),
                  jnp.zeros((layout.num_nodes, spec.num_classes), bool), table, spec, layout)


def abstract_arrays(spec: GeneratorSpec, layout: SlotLayout) -> dict[str, Any]:
  """Shapes/dtypes of ``GenState.arrays()`` (``jax.eval_shape``; nothing allocated), for restores."""
  table = jax.ShapeDtypeStruct((spec.num_classes, spec.cond_dim), jnp.float32)
  return jax.eval_shape(lambda t: _fresh_state(spec, layout, jax.random.key(0), t).arrays(), table)


def _plan(layout: SlotLayout, pool_labels: np.ndarray, rows: list[np.ndarray], num_classes: int,
          batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(G, V, M) pool rows, masks and labels of each slot's visits."""
  if len(rows) != layout.num_nodes:
    raise ValueError(f"data has {len(rows)} nodes, the generators were laid out for {layout.num_nodes}")
  bad = [int(c) for r in rows for c in np.unique(pool_labels[r]) if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"labels {sorted(set(bad))} are outside [0, {num_classes})")
  v_count = layout.num_nodes if layout.shared else 1
  lists: dict[tuple[int, int], np.ndarray] = {}
  unknown = []
  class_to_key = np.asarray(layout.class_to_key)
  for n, r in enumerate(rows):
    keys = class_to_key[pool_labels[r]]
    for k in np.unique(keys):
      s = layout.slot_of(n, int(k))
      if s is None:
        unknown.append(f"node {n} / key '{layout.keys[k]}'")
      else:
        lists[(s, n if layout.shared else 0)] = r[keys == k]
  if unknown:
    raise ValueError(f"no generator slot for {', '.join(unknown)}; the layout has "
                     f"{[(d['node'], d['key']) for d in layout.describe()]} (rebuild it with make_layout)")
  longest = max([len(v) for v in lists.values()] + [1])
  m = -(-longest // batch_size) * batch_size
  idx = np.zeros((layout.num_slots, v_count, m), np.int32)
  msk = np.zeros((layout.num_slots, v_count, m), np.float32)
  lab = np.zeros((layout.num_slots, v_count, m), np.int32)
  for (s, v), r in lists.items():
    idx[s, v, :len(r)], msk[s, v, :len(r)], lab[s, v, :len(r)] = r, 1.0, pool_labels[r]
  return idx, msk, lab


def _bookkeeping(spec: GeneratorSpec, layout: SlotLayout, seen: np.ndarray, epoch: np.ndarray,
                 node_seen: np.ndarray, msk: np.ndarray, lab: np.ndarray, epochs: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Host-side walk over the visits: (epoch0 (G, V), reset (G, V), epoch (G,), seen (G, K),
  node_seen (nodes, K)) after this call.

  The reset rule (module docstring) and the epoch counters depend only on labels and masks, so they
  are decided here rather than traced (no init program inside the training program).
  """
  seen, epoch, before = seen.copy(), epoch.copy(), node_seen.copy()
  g, v = msk.shape[:2]
  present = np.zeros((g, v, spec.num_classes), bool)
  node_of = np.zeros((g, v), np.int64)
  for s in range(g):
    for j in range(v):
      node_of[s, j] = j if layout.shared else layout.slot_node[s]
      present[s, j, lab[s, j][msk[s, j] > 0]] = True
  brought = np.zeros_like(before)  # classes each node brings in this call (over all its slots)
  np.logical_or.at(brought, node_of.reshape(-1), present.reshape(-1, spec.num_classes))
  new = brought & ~before
  changed = before.any(1) & new.any(1)  # a node's first training is not a class change
  key_classes = np.asarray(layout.class_to_key)[None, :] == np.asarray(layout.slot_key)[:, None]  # (G, K)
  epoch0, reset = np.zeros((g, v), np.int32), np.zeros((g, v), bool)
  for s in range(g):
    for j in range(v):
      n, valid = node_of[s, j], present[s, j].any()
      if valid:
        if spec.reset_on_new_class and changed[n] and (new[n] & key_classes[s]).any() and seen[s].any():
          reset[s, j], seen[s], epoch[s] = True, False, 0
        seen[s] |= present[s, j]
        epoch[s] += epochs
      epoch0[s, j] = epoch[s] - (epochs if valid else 0)
  return epoch0, reset, epoch, seen, before | brought


RESET_SALT = 0x5EED  # fold_in salt of the key that draws re-initialised generators


def train_generators(state: GenState, features: jax.Array, labels: Any, mask: Any, key: PRNGKey,
                     epochs: Optional[int] = None, *, index: Any = None,
                     backend: str = "vmap") -> tuple[GenState, Metrics]:
  """Trains every slot for ``epochs`` epochs (default ``generator_training_epochs``) per visit.

  Args:
    state: the generators (its buffers are donated on the vmap backend: use the returned state).
    features: (C, N, T, D) node features, or an (R, T, D) pool when ``index`` is given; T is pooled
      to S tokens here (pass features already pooled with ``generators.pool_tokens`` to pool once).
    labels: (C, N) classes, or (R,) with ``index``.
    mask: (C, N) valid rows.
    key: PRNG key of this call (e.g. ``fold_in(run_key, round)``).
    epochs: epochs per visit.
    index: optional (C, N) pool rows.
    backend: "vmap" (all slots in one jitted call) or "loop" (a Python loop over slots; tests).

  Returns:
    (state, metrics): metrics {name: (G, V, epochs)} per slot, visit (V = 1, or one per node when
    shared) and epoch, plus "rows" (G, V) and "reset" (G, V).
  """
  spec, layout = state.spec, state.layout
  epochs = spec.total_epochs if epochs is None else int(epochs)
  pool_labels, rows = _node_rows(labels, mask, index)
  pool = features if index is not None else features.reshape((-1,) + tuple(features.shape[2:]))
  if pool.shape[-1] != spec.feature_dim:
    raise ValueError(f"features have dim {pool.shape[-1]}, the generators model {spec.feature_dim}")
  pool = gen.pool_tokens(jnp.asarray(pool, jnp.float32), spec.seq_len)
  idx, msk, lab = _plan(layout, pool_labels, rows, spec.num_classes, spec.batch_size)
  epoch0, reset, epoch, seen, node_seen = _bookkeeping(spec, layout, np.asarray(state.seen), np.asarray(state.epoch),
                                                       np.asarray(state.node_seen), msk, lab, epochs)
  with_reset = bool(reset.any())
  fresh = _init_slot_jit(spec, jax.random.fold_in(key, RESET_SALT)) if with_reset else None
  vid = np.arange(idx.shape[0] * idx.shape[1], dtype=np.int32).reshape(idx.shape[:2])
  fn = _compiled_train(spec, epochs, backend, with_reset)
  carry = (state.params, state.opt_state)
  if backend == "vmap":
    carry, metrics = fn(carry, pool, idx, msk, lab, vid, epoch0, reset, fresh, key, state.cond_table)
  elif backend == "loop":
    outs = [fn(jax.tree.map(lambda a: a[s], carry), pool, idx[s], msk[s], lab[s], vid[s], epoch0[s], reset[s],
               fresh, key, state.cond_table) for s in range(layout.num_slots)]
    carry, metrics = jax.tree.map(lambda *a: jnp.stack(a), *outs)
  else:
    raise ValueError(f"unknown backend {backend!r}; choose 'vmap' or 'loop'")
  metrics = dict(metrics, rows=jnp.asarray(msk.sum(-1), jnp.int32), reset=jnp.asarray(reset))
  return state.replace(params=carry[0], opt_state=carry[1], epoch=jnp.asarray(epoch),
                       seen=jnp.asarray(seen), node_seen=jnp.asarray(node_seen)), metrics


@functools.lru_cache(maxsize=None)
def _compiled_sample(spec: GeneratorSpec, target_length: Optional[int]) -> Callable:
  m = models(spec)

  def sample_slot(params, sid, labels, key, cond_table):
    key, cond = jax.random.fold_in(key, sid), (cond_table[labels] if spec.conditioned else None)
    if spec.generator_type == "vae":
      return gen.sample(m["vae"], params, key, labels.shape[0], cond, target_length)
    return gen.sample(m["generator"], params["generator"], key, labels.shape[0], cond, target_length)

  return jax.jit(jax.vmap(sample_slot, in_axes=(0, 0, 0, None, None)))


def sample_generators(state: GenState, key: PRNGKey, counts: Any, *, target_length: Optional[int] = None,
                      allow_mixture: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Synthetic features per node: ``counts[n, c]`` samples of class c for node n.

  Each (node, class) is drawn from the slot that serves it (its own, or the shared one), conditioned
  on the class when the generator is. An unconditioned slot that was trained on several classes
  (unified / per_group) cannot draw one class: that is an error unless ``allow_mixture`` (then the
  rows are labelled with the requested class, as the reference did).

  Args:
    state: trained (or restored) generators.
    key: PRNG key; slot s draws from ``fold_in(key, s)``.
    counts: (C, K) integer counts, e.g. :func:`synthetic_counts`.
    target_length: stretch the S tokens to this many (linear interpolation); None keeps S.
    allow_mixture: see above.

  Returns:
    (features (C, M, S_out, D), labels (C, M) int32, mask (C, M) bool), rows of a node ordered by class.
  """
  spec, layout = state.spec, state.layout
  counts = np.asarray(counts)
  if counts.shape != (layout.num_nodes, spec.num_classes):
    raise ValueError(f"counts must be (nodes, classes) = {(layout.num_nodes, spec.num_classes)}, got {counts.shape}")
  seen = np.asarray(state.seen)
  per_slot: list[list[int]] = [[] for _ in range(layout.num_slots)]
  per_node: list[list[tuple[int, int]]] = [[] for _ in range(layout.num_nodes)]
  errors = []
  for n, c in zip(*np.nonzero(counts > 0)):
    s = layout.slot_for_class(int(n), int(c))
    if s is None or not seen[s, c]:
      errors.append(f"node {n} / class {layout.class_name(c)!r}: "
                    + ("no generator slot" if s is None else f"slot {s} never trained on it"))
      continue
    if not spec.conditioned and seen[s].sum() > 1 and not allow_mixture:
      errors.append(f"node {n} / class {layout.class_name(c)!r}: slot {s} is unconditioned and was trained on "
                    f"{[layout.class_name(k) for k in np.flatnonzero(seen[s])]} (use per_class, a conditioned "
                    "generator, or allow_mixture=True)")
      continue
    start = len(per_slot[s])
    per_slot[s] += [int(c)] * int(counts[n, c])
    per_node[n] += [(s, j) for j in range(start, len(per_slot[s]))]
  if errors:
    raise ValueError("cannot sample: " + "; ".join(errors))
  m_slot = max([len(v) for v in per_slot] + [1])
  lab = np.zeros((layout.num_slots, m_slot), np.int32)
  for s, v in enumerate(per_slot):
    lab[s, :len(v)] = v
  sid = np.arange(layout.num_slots, dtype=np.int32)
  x = _compiled_sample(spec, target_length)(state.params, sid, lab, key, state.cond_table)
  m_node = max([len(v) for v in per_node] + [1])
  flat = np.zeros((layout.num_nodes, m_node), np.int32)
  valid = np.zeros((layout.num_nodes, m_node), bool)
  for n, v in enumerate(per_node):
    flat[n, :len(v)] = [s * m_slot + j for s, j in v]
    valid[n, :len(v)] = True
  features = x.reshape((-1,) + x.shape[2:])[flat]
  labels = np.where(valid, lab.reshape(-1)[flat], 0)
  return features, jnp.asarray(labels, jnp.int32), jnp.asarray(valid)
