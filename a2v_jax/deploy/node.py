"""One federated node outside the simulation: its own rows of the features, its client state, the engine's
single-client programs.

Why a program of its own: a deployed node (a Flower SuperNode at an institution) holds only its clips and
its heads' state, and must compute exactly what the vmapped engine computes for that client, so that a
deployment changes nothing. It therefore reuses the engine's pieces unchanged -- ``make_local_train`` (the
single-client local program), the client optimiser, the heads -- and mirrors the engine's initialisation
key for key. Two details keep the numbers equal: the shuffle of a local epoch draws noise over the padded
index width, which the engine takes from the LARGEST client, so the server sends that width (``steps``) each
round; and the node's rows are re-indexed into its local feature array without changing their order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.config import Config
from a2v_jax.errors import A2VError
from a2v_jax.federated import engine, optim
from a2v_jax.federated.evaluate import make_evaluator, pad_indices
from a2v_jax.federated.local import Shared, make_local_train
from a2v_jax.federated.state import ClientState
from a2v_jax.models.heads import head_functions, make_heads
from a2v_jax.types import Params

SPLITS = ("val", "test")
# Config sections whose values must agree between a node and the server (what the heads, the data
# partition and the local training are); output paths, logging and rendering may differ.
AGREED_SECTIONS = ("data", "features", "text", "heads", "train", "federation")
AGREED_EXPERIMENT = ("seed", "param_dtype")  # the seed fixes every node's initialisation, shuffles and splits
# Where things lie on each machine: never compared (the backbones are compared by content instead).
LOCAL_PATHS = (("data", "dataset_root"), ("features", "cache_dir"), ("federation", "adapter_load_checkpoint"))


def _rows_of(prepared: Any, node_id: int, *, own: bool, num_nodes: int) -> dict[str, np.ndarray]:
  """The node's part of ``prepared``, re-indexed locally (train rows, then val, then test, order kept)."""
  nodes = prepared.nodes.nodes
  if not own and len(nodes) != num_nodes:
    raise DeploymentError(f"the partition has {len(nodes)} node(s), the config {num_nodes}")
  mine = nodes[0 if own else node_id]
  parts = {k: np.asarray(mine[k], np.int64) for k in ("train",) + SPLITS}
  rows = np.concatenate(list(parts.values()))
  out, start = {}, 0
  for k, v in parts.items():
    out[k] = np.arange(start, start + len(v), dtype=np.int32)
    start += len(v)
  out["features"] = np.asarray(prepared.features[rows], np.float32)
  out["labels"] = np.asarray(prepared.nodes.clipset.labels[rows])
  out["class_names"] = np.asarray(list(prepared.class_names))
  out.update({f"target/{b}": np.asarray(t) for b, t in prepared.targets.items()})
  return out


def node_cache_path(cfg: Config, node_id: int, dataset_root: Optional[str | Path],
                    fingerprints: dict[str, str]) -> Path:
  """Where the node's prepared rows are kept: named by a hash of everything they are a function of."""
  import hashlib
  import json
  root = Path(dataset_root if dataset_root is not None else cfg.data.dataset_root)
  listing = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
  blob = json.dumps({"config": agreed_config(cfg), "node": node_id, "own": dataset_root is not None,
                     "root": str(root.resolve()), "files": listing, "backbones": fingerprints}, sort_keys=True,
                    default=str)
  return Path(cfg.features.cache_dir) / "nodes" / f"node_{node_id}_{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"


class DeploymentError(A2VError, RuntimeError):
  """A deployment cannot go on: a node that disagrees with the server, a node that failed a round."""


def agreed_config(cfg: Config) -> dict[str, Any]:
  """The part of a config that nodes and server must share (compared key by key at start-up): the sections that
  fix the heads, data handling and training, the seed; not the machine's own paths (``LOCAL_PATHS``)."""
  d = cfg.to_dict()
  out = {k: dict(d[k]) for k in AGREED_SECTIONS if k in d}
  out["experiment"] = {k: d["experiment"][k] for k in AGREED_EXPERIMENT}
  for section, key in LOCAL_PATHS:
    out.get(section, {}).pop(key, None)
  return out


def backbone_fingerprints(cfg: Config) -> dict[str, str]:
  """Content fingerprints of the encoders a node runs (AST; the text encoders of its branches)."""
  from a2v_jax.backbones.fingerprint import fingerprint
  from a2v_jax.backbones.paths import backbone_dir
  kinds = ["ast"] + sorted({"clip_text" if b == "clip" else "t5" for b in cfg.branches})
  cache = Path(cfg.features.cache_dir) / "backbone_fingerprints.json"
  dirs = {k: backbone_dir(cfg, k, create=False) for k in kinds}  # (checking a tiny dir imports transformers)
  if not all(d.is_dir() for d in dirs.values()):
    dirs = {k: backbone_dir(cfg, k) for k in kinds}  # the tiny ones are written on first use
  return {k: fingerprint(d, cache) for k, d in dirs.items()}


def own_data(cfg: Config, node_id: int, dataset_root: str | Path) -> Any:
  """The node's ``NodeData`` from its own folder alone: every clip there is this node's, split as the simulation
  splits node ``node_id`` (seed ``node_split_seed + node_id``), so the rows are the ones the simulation gives that
  node when the folder holds exactly them.

  Raises:
    DeploymentError: a partition setting that would pick a subset of the node's clips.
  """
  from a2v_jax.data.nodes import NodeData
  from a2v_jax.data.partition import split
  from a2v_jax.data.registry import read_dataset
  d = dataclasses.replace(cfg.data, dataset_root=str(dataset_root))
  if d.samples_per_node is not None or d.partition == "reference":
    raise DeploymentError(f"node {node_id} reads its own folder {dataset_root}, so it uses every clip there: "
                          "'samples_per_node' and the 'reference' partition (which pick clips out of a shared "
                          "dataset) do not apply; drop them")
  clipset = read_dataset(d)
  parts = split(clipset, np.arange(len(clipset.clips)), d.split, seed=d.node_split_seed + node_id,
                train_ratio=d.train_ratio, val_ratio=d.val_ratio, test_ratio=d.test_ratio,
                official_val_fraction=d.official_val_fraction)
  return NodeData(clipset=clipset, nodes=(parts,))


@dataclasses.dataclass
class NodeProgram:
  """Node ``node_id`` of the partition ``cfg`` describes: its rows, its heads' programs."""
  cfg: Config
  node_id: int
  num_nodes: int
  shared: Shared                  # the node's own rows only: features (n, T, D), labels (n,), targets
  train_rows: np.ndarray          # local row indices
  split_rows: dict[str, np.ndarray]
  class_names: tuple[str, ...]
  apply_fn: Any
  init_fn: Any
  backbones: Optional[dict[str, str]] = None  # content fingerprints of the encoders (None: data given, no encoders)
  _programs: dict = dataclasses.field(default_factory=dict, repr=False)  # compiled programs, by kind and steps

  @classmethod
  def build(cls, cfg: Config, node_id: int, prepared: Optional[Any] = None, verbose: bool = False, *,
            dataset_root: Optional[str | Path] = None) -> "NodeProgram":
    """The node's rows of ``prepared`` (the trainer's ``Prepared``; built from ``cfg`` when None: the same
    dataset, partition and feature cache as ``experiments.run``). ``dataset_root``: the node holds only its own
    clips, in that folder (any layout the dataset's reader accepts): all of them are its rows (``own_data``), its
    features are cached under its own ``cache_dir``; the rest of the partition is never read.

    Built from the config, the node's rows (features, labels, targets, splits) are kept in one file under
    ``cache_dir/nodes`` keyed by what they depend on (agreed config, node, the folder's file listing, encoder
    fingerprints): Flower starts a fresh ClientApp process per message, which then loads that file instead of
    preparing again."""
    num_nodes = cfg.data.num_nodes
    if not 0 <= node_id < num_nodes:
      raise DeploymentError(f"node id {node_id} is outside the partition's {num_nodes} node(s) (0..{num_nodes - 1})")
    if prepared is not None and dataset_root is not None:
      raise ValueError("give the node's prepared data or its dataset_root, not both")
    if prepared is not None:
      return cls._from_rows(cfg, node_id, _rows_of(prepared, node_id, own=False, num_nodes=num_nodes), None)
    fingerprints = backbone_fingerprints(cfg)
    cache = node_cache_path(cfg, node_id, dataset_root, fingerprints)
    if cache.is_file():
      try:
        with np.load(cache, allow_pickle=False) as z:
          rows = {k: z[k] for k in z.files}
        return cls._from_rows(cfg, node_id, rows, fingerprints)
      except (OSError, ValueError, KeyError):
        pass  # unreadable: prepared again and rewritten below
    from a2v_jax.run.trainer import prepare
    if dataset_root is not None:
      prepared = prepare(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset_root=str(dataset_root))),
                         verbose=verbose, nodes=own_data(cfg, node_id, dataset_root))
    else:
      prepared = prepare(cfg, verbose=verbose)
    rows = _rows_of(prepared, node_id, own=dataset_root is not None, num_nodes=num_nodes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, **rows)
    tmp.replace(cache)
    return cls._from_rows(cfg, node_id, rows, fingerprints)

  @classmethod
  def _from_rows(cls, cfg: Config, node_id: int, rows: dict[str, np.ndarray],
                 fingerprints: Optional[dict[str, str]]) -> "NodeProgram":
    targets = {k[len("target/"):]: np.asarray(v) for k, v in rows.items() if k.startswith("target/")}
    shared = Shared(jnp.asarray(rows["features"]), jnp.asarray(rows["labels"]),
                    {b: jnp.asarray(t) for b, t in targets.items()})
    heads = make_heads(cfg, {b: t.shape[1:] for b, t in targets.items()})
    apply_fn, init_fn = head_functions(heads, rows["features"].shape[1:])
    return cls(cfg, node_id, cfg.data.num_nodes, shared, np.asarray(rows["train"], np.int32),
               {k: np.asarray(rows[k], np.int32) for k in SPLITS}, tuple(str(c) for c in rows["class_names"]),
               apply_fn, init_fn, fingerprints)

  def describe(self) -> dict[str, Any]:
    """What the server checks and needs at start-up (the query reply)."""
    return {"node_id": self.node_id, "num_nodes": self.num_nodes, "train_count": int(len(self.train_rows)),
            **{f"{k}_count": int(len(v)) for k, v in self.split_rows.items()},
            "token_shape": [int(v) for v in self.shared.features.shape[1:]],
            "target_shapes": {b: [int(v) for v in t.shape[1:]] for b, t in self.shared.targets.items()},
            "class_names": list(self.class_names), "config": agreed_config(self.cfg), "backbones": self.backbones}

  def init_state(self) -> ClientState:
    """This node's client state exactly as ``engine.fed_a2v(...).init`` makes it for client ``node_id`` (one jitted
    program: the persistent compilation cache serves it to every fresh ClientApp process)."""
    if "init" not in self._programs:
      tx = optim.client_optimizer(self.cfg)

      def init(seed_key):
        _, keys, _ = engine.init_keys(seed_key, self.num_nodes)
        return engine.init_client(self.cfg, self.init_fn, tx, keys[self.node_id])
      self._programs["init"] = jax.jit(init)
    return self._programs["init"](jax.random.PRNGKey(self.cfg.experiment.seed))

  def _local_train(self, steps: int):
    if ("train", steps) not in self._programs:
      tx = optim.client_optimizer(self.cfg)
      self._programs["train", steps] = jax.jit(
          make_local_train(self.cfg, self.apply_fn, tx, self.cfg.train.batch_size, steps))
    return self._programs["train", steps]

  def train(self, state: ClientState, global_params: Params, server_round: int, steps: int
            ) -> tuple[ClientState, dict[str, float]]:
    """One round of local training from the global heads (the engine's round for this client).

    ``server_round``: the server's round counter before this round (0 first), ``steps``: the federation's
    local steps per epoch (from its largest node).
    """
    width = steps * self.cfg.train.batch_size
    if len(self.train_rows) > width:
      raise DeploymentError(f"node {self.node_id} holds {len(self.train_rows)} train rows, more than the "
                            f"{width} the server's steps={steps} cover")
    idx = np.zeros((width,), np.int32)
    idx[:len(self.train_rows)] = self.train_rows
    state = state.replace(params=global_params)
    epoch0 = jnp.asarray(server_round * self.cfg.train.local_epochs, jnp.int32)
    state, metrics = self._local_train(steps)(state, jnp.asarray(idx), jnp.asarray(len(self.train_rows), jnp.int32),
                                              epoch0, self.shared, None)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  def evaluate(self, params: Params, split: str) -> tuple[dict[str, float], int]:
    """Metrics of ``params`` on this node's ``split`` (row means) and the row count they are means over."""
    rows = self.split_rows[split]
    if len(rows) == 0:
      return {}, 0
    if "evaluate" not in self._programs:
      self._programs["evaluate"] = jax.jit(make_evaluator(self.apply_fn, self.cfg.train.batch_size))
    idx, count = pad_indices(rows, self.cfg.train.batch_size)
    out = self._programs["evaluate"](params, jnp.asarray(idx), jnp.asarray(count, jnp.int32), self.shared)
    return {k: float(v) for k, v in jax.device_get(out).items()}, count
