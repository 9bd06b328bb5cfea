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
  clients train one after another (spec 5.4). ``unified`` + shared is ONE param set; ``per_class`` +
  shared is one per class, each still scanned over nodes (and the classes vmapped).

Both cases are the same program: ``train_slot`` scans over V *visits* (V = 1 non-shared, V = nodes
shared); a visit scans over epochs, an epoch over fixed-size batches. Rows are gathered from one feature
pool by (G, V, M) index arrays padded to a multiple of ``generator_batch_size``; padding rows carry
mask 0, a batch without valid rows leaves params and optimiser state untouched, and the epoch shuffle
draws one key per row *position*, so the result does not depend on how much padding there is: unequal
clients share one compiled program (compiled once per configuration and shape) and equal a per-client loop.

Reset (``reset_generator_on_class_change``). Our generators are trained once per slot and continue
across rounds (the reference retrained every class from scratch every round, spec 5.4). With the flag
on, a slot that has already been trained is re-initialised (params, AdamW state, epoch counter, seen
classes) when a visit brings a class it has not seen since its last (re)initialisation -- seed 003's
"reset when new classes appear". Consequences: ``per_class`` never resets (a slot serves one class);
``unified`` / ``per_group`` reset when a node's (or, shared, the next node's) class set grows; with
fixed node data nothing is ever reset after round 1. With the flag off, slots keep learning.

Schedules. The VAE loss's beta / cosine-weight schedules (spec 5.3) are evaluated at the number of
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
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from a2v_jax.config import ConfigError, GeneratorConfig
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
  weight_decay: float = WEIGHT_DECAY
  grad_clip: float = GRAD_CLIP

  @classmethod
  def from_config(cls, cfg: GeneratorConfig, feature_shape: Sequence[int], num_classes: int,
                  cond_dim: Optional[int] = None) -> "GeneratorSpec":
    """Builds the spec from the config; ``feature_shape`` = (T, D) of the cached features."""
    source_length, feature_dim = (int(v) for v in feature_shape[-2:])
    return cls(
        generator_type="gan" if cfg.generator_type == "gan" else "vae",
        conditioned=cfg.generator_type == "cvae" or cfg.use_conditioned_vae,
        feature_dim=feature_dim, seq_len=cfg.generator_training_sequence_length,
        source_length=source_length, hidden_dim=cfg.generator_hidden_dim,
        latent_dim=cfg.generator_latent_dim, num_classes=int(num_classes),
        cond_dim=int(num_classes if cond_dim is None else cond_dim), batch_size=cfg.generator_batch_size,
        learning_rate=cfg.generator_learning_rate, total_epochs=cfg.generator_training_epochs,
        noise_std=cfg.generator_augmentation_noise if cfg.generator_augmentation else 0.0,
        reset_on_new_class=cfg.reset_generator_on_class_change)

  def model_fields(self) -> dict[str, Any]:
    """The fields that fix the parameter shapes (what a checkpoint must agree on)."""
    keys = ("generator_type", "conditioned", "feature_dim", "seq_len", "hidden_dim", "latent_dim",
            "num_classes", "cond_dim")
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
  cond_table: jax.Array   # (K, cond_dim) condition of each class (one-hot unless given)
  spec: GeneratorSpec = flax.struct.field(pytree_node=False)
  layout: SlotLayout = flax.struct.field(pytree_node=False)

  def arrays(self) -> dict[str, Any]:
    """The array part (what a checkpoint stores)."""
    return {"params": self.params, "opt_state": self.opt_state, "epoch": self.epoch,
            "seen": self.seen, "cond_table": self.cond_table}


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
  """(C, K) synthetic samples per node and class (spec 5.6).

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


def slot_keys(key: PRNGKey, num_slots: int, num_visits: int) -> jax.Array:
  """(G, V) keys: ``fold_in(fold_in(key, slot), visit)`` -- a slot's randomness is its own."""
  fold = lambda s, v: jax.random.fold_in(jax.random.fold_in(key, s), v)
  return jax.vmap(lambda s: jax.vmap(lambda v: fold(s, v))(jnp.arange(num_visits)))(jnp.arange(num_slots))


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
    cls = gen.ConditionedVAEGenerator if spec.conditioned else gen.VAEGenerator
    return {"vae": cls(spec.feature_dim, spec.hidden_dim, spec.latent_dim, spec.seq_len, cond_dim)}
  return {"generator": gen.GANGenerator(spec.feature_dim, spec.hidden_dim, spec.latent_dim, spec.seq_len, cond_dim),
          "discriminator": gen.GANDiscriminator(spec.hidden_dim, spec.seq_len, cond_dim)}


def _init_slot(spec: GeneratorSpec, key: PRNGKey) -> tuple[Params, OptState]:
  m, tx = models(spec), optimizer(spec)
  x = jnp.zeros((1, spec.seq_len, spec.feature_dim))
  cond = jnp.zeros((1, spec.cond_dim)) if spec.conditioned else None
  k1, k2 = jax.random.split(key)
  if spec.generator_type == "vae":
    params = m["vae"].init(k1, x, k2, cond)
    return params, tx.init(params)
  params = {"generator": m["generator"].init(k1, jnp.zeros((1, spec.latent_dim)), cond),
            "discriminator": m["discriminator"].init(k2, x, cond)}
  return params, {k: tx.init(v) for k, v in params.items()}


def _make_step(spec: GeneratorSpec) -> Callable:
  """``step(params, opt, xb, yb, mb, key, epoch, cond_table) -> (params, opt, parts)`` on one batch."""
  m, tx = models(spec), optimizer(spec)

  def noisy(x, key):
    return x + spec.noise_std * jax.random.normal(key, x.shape, x.dtype) if spec.noise_std else x

  def vae_step(params, opt_state, xb, yb, mb, key, epoch, cond_table):
    k_noise, k_eps = jax.random.split(key)
    x_in, cond = noisy(xb, k_noise), (cond_table[yb] if spec.conditioned else None)

    def loss_fn(p):
      x_hat, mu, logvar = m["vae"].apply(p, x_in, k_eps, cond)
      return gen.vae_loss(x_hat, xb, mu, logvar, epoch, spec.total_epochs, mb)

    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, parts

  def gan_step(params, opt_state, xb, yb, mb, key, epoch, cond_table):
    del epoch
    k_noise, k_z = jax.random.split(key)
    real, cond = noisy(xb, k_noise), (cond_table[yb] if spec.conditioned else None)
    g, d = m["generator"], m["discriminator"]
    z = jax.random.normal(k_z, (xb.shape[0], spec.latent_dim))
    fake = jax.lax.stop_gradient(g.apply(params["generator"], z, cond))

    def d_loss_fn(pd):  # discriminator step, fakes fixed
      _, parts = gen.gan_losses(d.apply(pd, real, cond), d.apply(pd, fake, cond), mb)
      return parts["d_loss"], parts

    (_, parts), gd = jax.value_and_grad(d_loss_fn, has_aux=True)(params["discriminator"])
    ud, od = tx.update(gd, opt_state["discriminator"], params["discriminator"])
    pd = optax.apply_updates(params["discriminator"], ud)

    def g_loss_fn(pg):  # generator step against the updated discriminator
      _, p = gen.gan_losses(jnp.zeros(xb.shape[0]), d.apply(pd, g.apply(pg, z, cond), cond), mb)
      return p["g_loss"]

    g_loss, gg = jax.value_and_grad(g_loss_fn)(params["generator"])
    ug, og = tx.update(gg, opt_state["generator"], params["generator"])
    parts = dict(parts, g_loss=g_loss, loss=parts["d_loss"] + g_loss)
    return ({"generator": optax.apply_updates(params["generator"], ug), "discriminator": pd},
            {"generator": og, "discriminator": od}, parts)

  return vae_step if spec.generator_type == "vae" else gan_step


class SlotCarry(NamedTuple):
  params: Params
  opt_state: OptState
  epoch: jax.Array   # () int32
  seen: jax.Array    # (K,) bool


def _where(pred: jax.Array, a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_slot_trainer(spec: GeneratorSpec, epochs: int) -> Callable:
  """``train_slot(carry, pool, rows, rmask, ylab, keys, cond_table) -> (carry, metrics)`` for ONE slot.

  Args of the returned function:
    carry: SlotCarry of the slot.
    pool: (R, S, D) feature pool (pooled to S tokens).
    rows, rmask, ylab: (V, M) pool row, validity and label of each row of each visit, M % B == 0.
    keys: (V,) one key per visit.
    cond_table: (K, cond_dim).

  Returns:
    (carry, metrics) with metrics {name: (V, epochs)} (means over the epoch's active batches) and
    "active": (V,) whether the visit had rows.
  """
  step_fn, bsz = _make_step(spec), spec.batch_size

  def visit(carry: SlotCarry, inp, pool, cond_table):
    rows, m, y, key = inp
    x = pool[rows]
    steps = rows.shape[0] // bsz
    active = m.sum() > 0
    present = jnp.zeros(spec.num_classes, bool).at[y].max(m > 0)
    k_reset, k_epochs = jax.random.split(key)
    if spec.reset_on_new_class:
      do_reset = active & jnp.any(present & ~carry.seen) & jnp.any(carry.seen)
      fresh = SlotCarry(*_init_slot(spec, k_reset), jnp.zeros((), jnp.int32), jnp.zeros_like(carry.seen))
      carry = _where(do_reset, fresh, carry)
    epoch0 = carry.epoch

    def epoch_fn(c, e):
      params, opt_state = c
      k_perm, k_steps = jax.random.split(jax.random.fold_in(k_epochs, e))
      prio = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k_perm, i)))(jnp.arange(rows.shape[0]))
      perm = jnp.argsort(jnp.where(m > 0, prio, 2.0)).reshape(steps, bsz)

      def batch_fn(c, inp):
        s, idx = inp
        mb = m[idx]
        p, o, parts = step_fn(*c, x[idx], y[idx], mb, jax.random.fold_in(k_steps, s), epoch0 + e, cond_table)
        ok = mb.sum() > 0
        return _where(ok, (p, o), c), (parts, ok)

      c, (parts, ok) = jax.lax.scan(batch_fn, (params, opt_state), (jnp.arange(steps), perm))
      n = jnp.maximum(ok.sum(), 1)
      return c, {k: jnp.sum(v * ok) / n for k, v in parts.items()}

    (params, opt_state), metrics = jax.lax.scan(epoch_fn, (carry.params, carry.opt_state), jnp.arange(epochs))
    carry = SlotCarry(params, opt_state, carry.epoch + epochs * active.astype(jnp.int32), carry.seen | present)
    return carry, dict(metrics, active=active)

  def train_slot(carry, pool, rows, rmask, ylab, keys, cond_table):
    return jax.lax.scan(lambda c, i: visit(c, i, pool, cond_table), carry, (rows, rmask, ylab, keys))

  return train_slot


@functools.lru_cache(maxsize=None)
def _compiled_train(spec: GeneratorSpec, epochs: int, backend: str) -> Callable:
  fn = make_slot_trainer(spec, epochs)
  if backend == "loop":
    return jax.jit(fn)
  return jax.jit(jax.vmap(fn, in_axes=(0, None, 0, 0, 0, 0, None)), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Public API.


def init_generators(key: PRNGKey, cfg: GeneratorConfig, layout: SlotLayout, feature_shape: Sequence[int],
                    num_classes: int, cond_table: Optional[Any] = None) -> GenState:
  """Fresh generators for every slot of ``layout``.

  Args:
    key: PRNG key; slot s is initialised from ``fold_in(key, s)``.
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
  return _fresh_state(spec, layout, key, table)


def _fresh_state(spec: GeneratorSpec, layout: SlotLayout, key: PRNGKey, table: jax.Array) -> GenState:
  g = layout.num_slots
  params, opt_state = jax.vmap(lambda s: _init_slot(spec, jax.random.fold_in(key, s)))(jnp.arange(g))
  return GenState(params, opt_state, jnp.zeros((g,), jnp.int32), jnp.zeros((g, spec.num_classes), bool),
                  table, spec, layout)


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


def train_generators(state: GenState, features: jax.Array, labels: Any, mask: Any, key: PRNGKey,
                     epochs: Optional[int] = None, *, index: Any = None,
                     backend: str = "vmap") -> tuple[GenState, Metrics]:
  """Trains every slot for ``epochs`` epochs (default ``generator_training_epochs``) on its rows.

  Args:
    state: the generators (donated on the vmap backend: do not reuse the input state).
    features: (C, N, T, D) node features, or an (R, T, D) pool when ``index`` is given; T is pooled
      to S tokens here (pass already pooled features, see ``generators.pool_tokens``, to pool once).
    labels: (C, N) classes, or (R,) with ``index``.
    mask: (C, N) valid rows.
    key: PRNG key of this call (e.g. ``fold_in(run_key, round)``).
    epochs: epochs per visit.
    index: optional (C, N) pool rows.
    backend: "vmap" (all slots in one jitted call) or "loop" (a Python loop over slots; tests).

  Returns:
    (state, metrics): metrics {name: (G, V, epochs)} per slot, visit (V = 1, or nodes when shared)
    and epoch, plus "active" (G, V) and "rows" (G, V).
  """
  spec, layout = state.spec, state.layout
  epochs = spec.total_epochs if epochs is None else int(epochs)
  pool_labels, rows = _node_rows(labels, mask, index)
  pool = features if index is not None else features.reshape((-1,) + features.shape[2:])
  if pool.shape[-1] != spec.feature_dim:
    raise ValueError(f"features have dim {pool.shape[-1]}, the generators model {spec.feature_dim}")
  pool = gen.pool_tokens(jnp.asarray(pool, jnp.float32), spec.seq_len)
  idx, msk, lab = _plan(layout, pool_labels, rows, spec.num_classes, spec.batch_size)
  keys = slot_keys(key, layout.num_slots, idx.shape[1])
  carry = SlotCarry(state.params, state.opt_state, state.epoch, state.seen)
  fn = _compiled_train(spec, epochs, backend)
  if backend == "vmap":
    carry, metrics = fn(carry, pool, idx, msk, lab, keys, state.cond_table)
  elif backend == "loop":
    outs = [fn(jax.tree.map(lambda a: a[s], carry), pool, idx[s], msk[s], lab[s], keys[s], state.cond_table)
            for s in range(layout.num_slots)]
    carry, metrics = jax.tree.map(lambda *a: jnp.stack(a), *outs)
  else:
    raise ValueError(f"unknown backend {backend!r}; choose 'vmap' or 'loop'")
  metrics = dict(metrics, rows=jnp.asarray(msk.sum(-1), jnp.int32))
  return state.replace(params=carry.params, opt_state=carry.opt_state, epoch=carry.epoch, seen=carry.seen), metrics


@functools.lru_cache(maxsize=None)
def _compiled_sample(spec: GeneratorSpec, target_length: Optional[int]) -> Callable:
  m = models(spec)

  def sample_slot(params, key, labels, cond_table):
    cond = cond_table[labels] if spec.conditioned else None
    if spec.generator_type == "vae":
      return gen.sample(m["vae"], params, key, labels.shape[0], cond, target_length)
    return gen.sample(m["generator"], params["generator"], key, labels.shape[0], cond, target_length)

  return jax.jit(jax.vmap(sample_slot, in_axes=(0, 0, 0, None)))


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
  keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(layout.num_slots))
  x = _compiled_sample(spec, target_length)(state.params, keys, jnp.asarray(lab), state.cond_table)
  m_node = max([len(v) for v in per_node] + [1])
  flat = np.zeros((layout.num_nodes, m_node), np.int32)
  valid = np.zeros((layout.num_nodes, m_node), bool)
  for n, v in enumerate(per_node):
    flat[n, :len(v)] = [s * m_slot + j for s, j in v]
    valid[n, :len(v)] = True
  features = x.reshape((-1,) + x.shape[2:])[flat]
  labels = np.where(valid, lab.reshape(-1)[flat], 0)
  return features, jnp.asarray(labels, jnp.int32), jnp.asarray(valid)
