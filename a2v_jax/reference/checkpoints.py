"""The reference's ``.pt`` checkpoints -> ours: node generators (Run 1) and node adapters (its heads run).

Why: a reference user has trained generators and adapters worth days of GPU time. Both are read with
``torch.load(weights_only=True)``, which unpickles tensors, numbers and strings only -- never code -- and
mapped into our Flax parameter trees, then written in our layout so that Run 2, KD and the generate step use
them like anything trained here:

* **generators** ``{dir}/{base}_node{i}_class_{c}_round_{r}.pt`` (the reference's per_class Run 1 files;
  ``{base}_node{i}_round_{r}.pt`` for unified): the reference's ``VAEGenerator`` state dict (encoder / decoder
  ``nn.Sequential``s of Linear, ReLU, Dropout: keys ``encoder.{0,3,6}``, ``decoder.{0,3,6}``) becomes a
  ``generator_architecture: "reference_mlp"`` slot of node i (``models.generators.ReferenceVAEGenerator``), all
  slots in one generator checkpoint round under the config's ``generator_checkpoint_dir/_base_name``.
* **adapters** ``{dir}/{base}_node{i}_{clip_adapter|clip_projection|t5_adapter|t5_projection}_round_{r}_class_...pt``
  (``adapter_checkpoint_per_type``): each ``adapter_state_dict`` is loaded, strictly, into the torch twin of our
  heads (``torch_baseline.Heads``: LayerNorm + Linear/GELU adapter, MAPBlock projection -- the spec's best reading
  of the reference's ``projection.Adapter``, whose exact norm is unknown), whose weights become our params; the
  result is a heads run directory (``config.json`` + ``state/<round>``) that ``adapter_load_checkpoint`` names.

The round read is the highest round number present (the reference loaded the lexicographically first file,
``round_1`` before ``round_10``: its [BUG]); a node with files of that round missing is refused. Every key, shape
and file that does not fit is refused naming it, before anything is written; nothing existing is overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import jax
import numpy as np

from a2v_jax.config import Config
from a2v_jax.errors import A2VError
from a2v_jax.types import Params


class ReferenceCheckpointError(A2VError, ValueError):
  """A reference checkpoint that cannot be imported: unreadable, of another layout, shape or round."""


GENERATOR_FILE = re.compile(r"^(?P<base>.+)_node(?P<node>\d+)(?:_class_(?P<cls>.+?))?_round_(?P<round>\d+)\.pt$")
ADAPTER_FILE = re.compile(r"^(?P<base>.+)_node(?P<node>\d+)_(?P<branch>clip|t5)_(?P<part>adapter|projection)"
                          r"_round_(?P<round>\d+)(?:_class_.*)?\.pt$")
VAE_LAYERS = {"encoder": ("0", "3", "6"), "decoder": ("0", "3", "6")}  # Linear positions in the Sequentials
FLAX_NAMES = ("in", "hidden", "out")


def load_pt(path: Path) -> dict:
  """A reference checkpoint dict, unpickled with ``weights_only=True`` (tensors, numbers, strings: no code)."""
  import pickle
  import torch
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
    raise ReferenceCheckpointError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]}); files holding code are never unpickled") from e
  if not isinstance(obj, dict):
    raise ReferenceCheckpointError(f"{path}: holds a {type(obj).__name__}, expected the reference's checkpoint dict")
  return obj


def _state_dict(obj: dict, key: str, path: Path) -> dict[str, np.ndarray]:
  sd = obj.get(key)
  if not isinstance(sd, Mapping):
    raise ReferenceCheckpointError(f"{path}: no '{key}' (keys: {sorted(obj)})")
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def latest_round(directory: Path, base: str, pattern: re.Pattern) -> tuple[int, list[tuple[Path, re.Match]]]:
  """The highest round of ``{base}_...`` files in ``directory`` and its files (with their name matches)."""
  directory = Path(directory)
  if not directory.is_dir():
    raise ReferenceCheckpointError(f"no directory {directory}")
  found = [(p, m) for p in sorted(directory.glob("*.pt")) if (m := pattern.match(p.name)) and m["base"] == base]
  if not found:
    names = sorted(p.name for p in directory.glob("*.pt"))[:5]
    raise ReferenceCheckpointError(f"no {base}_node*_round_*.pt files in {directory}"
                                   + (f" (found {names}...)" if names else " (no .pt files)"))
  r = max(int(m["round"]) for _, m in found)
  return r, [(p, m) for p, m in found if int(m["round"]) == r]


# ---------------------------------------------------------------------------------------------
# Generators.


def vae_params(sd: Mapping[str, np.ndarray], seq_len: int, feature_dim: int, hidden_dim: int, latent_dim: int,
               where: str) -> Params:
  """The reference ``VAEGenerator``'s state dict as ``ReferenceVAEGenerator`` params (kernels transposed).

  Raises:
    ReferenceCheckpointError: a missing or unexpected tensor, or one of another shape, named.
  """
  want = {}
  dims = {"encoder": (seq_len * feature_dim, hidden_dim, hidden_dim, 2 * latent_dim),
          "decoder": (latent_dim, hidden_dim, hidden_dim, seq_len * feature_dim)}
  for part, idx in VAE_LAYERS.items():
    d = dims[part]
    for j, i in enumerate(idx):
      want[f"{part}.{i}.weight"] = (d[j + 1], d[j])
      want[f"{part}.{i}.bias"] = (d[j + 1],)
  extra = sorted(set(sd) - set(want))
  missing = sorted(set(want) - set(sd))
  if extra or missing:
    raise ReferenceCheckpointError(f"{where}: not the reference's VAEGenerator layout: unexpected tensors {extra}, "
                                   f"missing {missing}")
  for k, shape in want.items():
    if tuple(sd[k].shape) != shape:
      raise ReferenceCheckpointError(f"{where}: tensor '{k}' has shape {tuple(sd[k].shape)}, expected {shape} for "
                                     f"S={seq_len} tokens x D={feature_dim}, hidden {hidden_dim}, latent {latent_dim}")
  tree = {part: {name: {"kernel": np.asarray(sd[f"{part}.{i}.weight"], np.float32).T,
                        "bias": np.asarray(sd[f"{part}.{i}.bias"], np.float32)}
                 for name, i in zip(FLAX_NAMES, idx)} for part, idx in VAE_LAYERS.items()}
  return {"params": tree}


def import_generators(cfg: Config, directory: str | Path, base: str, *, verbose: bool = True,
                      class_names: Optional[Sequence[str]] = None) -> Path:
  """Writes the reference's latest round of node generators as our generator checkpoint (round = theirs).

  ``cfg`` is the Run 2 config that will restore them: its dataset names the classes, its node count the nodes,
  its generator keys the sizes (``generator_architecture: "reference_mlp"``, hidden / latent dims, the token
  count S) and the destination (``generator_checkpoint_dir / _base_name``, which must not hold rounds yet).
  ``class_names`` overrides the dataset's (tests).
  """
  from a2v_jax.data.nodes import build_nodes
  from a2v_jax.generators import checkpoint as gc
  from a2v_jax.generators import training as gt
  g = cfg.generators
  if g.generator_architecture != "reference_mlp":
    raise ReferenceCheckpointError("the reference's generators are its flattening MLP VAE: set "
                                   "'generator_architecture': 'reference_mlp' in the config they are imported for")
  complete, partial = gc.scan_rounds(g)
  if complete or partial:
    raise ReferenceCheckpointError(f"{gc.checkpoint_root(g)} already holds generator rounds; import into an empty "
                                   "generator_checkpoint_base_name (nothing is overwritten)")
  names = tuple(class_names if class_names is not None else build_nodes(cfg).clipset.class_names)
  rnd, files = latest_round(Path(directory), base, GENERATOR_FILE)
  per_class = g.generator_granularity == "per_class"
  slots: list[tuple[int, int, Path]] = []
  for p, m in files:
    node = int(m["node"])
    if node >= cfg.data.num_nodes:
      raise ReferenceCheckpointError(f"{p.name}: node {node}, but the config has {cfg.data.num_nodes} nodes")
    if per_class != (m["cls"] is not None):
      raise ReferenceCheckpointError(f"{p.name}: a {'per_class' if m['cls'] else 'unified'} file, but the config's "
                                     f"generator_granularity is {g.generator_granularity!r}")
    if per_class and m["cls"] not in names:
      raise ReferenceCheckpointError(f"{p.name}: class {m['cls']!r} is not one of the dataset's {list(names)}")
    slots.append((node, names.index(m["cls"]) if per_class else 0, p))
  slots.sort()
  if len({(n, k) for n, k, _ in slots}) != len(slots):
    raise ReferenceCheckpointError(f"two files of round {rnd} for one (node, class) in {directory}")
  first = load_pt(slots[0][2])
  seq_len = int(first.get("sequence_length") or g.generator_training_sequence_length)
  if seq_len != g.generator_training_sequence_length:
    raise ReferenceCheckpointError(f"{slots[0][2].name}: sequence_length {seq_len}, the config's "
                                   f"generator_training_sequence_length is {g.generator_training_sequence_length}")
  enc = first.get("generator_state_dict", {}).get("encoder.0.weight")
  if enc is None or enc.shape[1] % seq_len:
    raise ReferenceCheckpointError(f"{slots[0][2].name}: no VAEGenerator 'encoder.0.weight' of width S*D")
  feature_dim = int(enc.shape[1]) // seq_len
  params = []
  for node, k, p in slots:
    obj = first if p == slots[0][2] else load_pt(p)
    if obj.get("use_conditioned_vae") or obj.get("generator_type", "vae") != "vae":
      raise ReferenceCheckpointError(f"{p.name}: a {obj.get('generator_type')} generator (conditioned: "
                                     f"{bool(obj.get('use_conditioned_vae'))}); only the unconditioned VAE imports")
    params.append(vae_params(_state_dict(obj, "generator_state_dict", p), seq_len, feature_dim,
                             g.generator_hidden_dim, g.generator_latent_dim, p.name))
  keys = names if per_class else ("all",)
  layout = gt.SlotLayout(g.generator_granularity, False, tuple(keys),
                         tuple(range(len(names))) if per_class else (0,) * len(names),
                         tuple(n for n, _, _ in slots), tuple(k for _, k, _ in slots), cfg.data.num_nodes, names)
  spec = gt.GeneratorSpec.from_config(g, (seq_len, feature_dim), len(names))
  state = gt._fresh_state(spec, layout, jax.random.PRNGKey(0), np.eye(len(names), dtype=np.float32))
  stacked = jax.tree.map(lambda *a: np.stack(a), *params)
  if jax.tree.structure(stacked) != jax.tree.structure(state.params):
    raise ReferenceCheckpointError("internal: the imported tree does not match ReferenceVAEGenerator's")
  seen = np.zeros((len(slots), len(names)), bool)
  node_seen = np.zeros((cfg.data.num_nodes, len(names)), bool)
  for s, (node, k, _) in enumerate(slots):
    classes = [k] if per_class else list(range(len(names)))
    seen[s, classes] = True
    node_seen[node, classes] = True
  state = state.replace(params=jax.tree.map(np.asarray, stacked), seen=seen, node_seen=node_seen,
                        epoch=np.full(len(slots), g.generator_training_epochs, np.int32))
  out = gc.save_generators(g, state, rnd, extra={
      "imported_from": str(Path(directory).absolute()), "reference_files": [p.name for _, _, p in slots],
      "token_shape": [seq_len, feature_dim]})
  if verbose:
    print(f"imported {len(slots)} generator(s) of round {rnd} from {directory} -> {out}")
  return out


# ---------------------------------------------------------------------------------------------
# Adapters.


@flax.struct.dataclass
class _Imported:
  """The checkpoint's server / clients entries (``.params``, as the trainer's states record them)."""
  params: Params


def import_adapters(cfg: Config, directory: str | Path, base: str, out: str | Path, *, verbose: bool = True) -> Path:
  """Writes the reference's latest round of per-node adapter files as a heads run directory ``out``.

  The run directory holds ``config.json`` (``cfg`` with ``adapter_aggregation_mode: none``: node heads only, as
  the reference's adapter files are) and ``state/<round>`` with every node's heads; a generate config whose
  ``adapter_load_checkpoint`` is ``out`` restores them.
  """
  import torch
  from a2v_jax import checkpoint as ckpt_lib
  from a2v_jax.models.heads import make_heads
  from a2v_jax.reference import torch_baseline as tb
  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise ReferenceCheckpointError(f"{out} already exists and is not empty (nothing is overwritten)")
  rnd, files = latest_round(Path(directory), base, ADAPTER_FILE)
  by_node: dict[int, dict[str, Path]] = {}
  for p, m in files:
    by_node.setdefault(int(m["node"]), {})[f"{m['branch']}_{m['part']}"] = p
  branches = cfg.branches
  want = {f"{b}_{part}" for b in branches for part in ("adapter", "projection")}
  nodes = list(range(cfg.data.num_nodes))
  problems = [f"node {n}: missing {sorted(want - set(by_node.get(n, {})))}" for n in nodes
              if want - set(by_node.get(n, {}))]
  problems += [f"node {n}: files for a node the config does not have" for n in by_node if n not in nodes]
  if problems:
    raise ReferenceCheckpointError(f"adapter files of round {rnd} in {directory} ({base}): " + "; ".join(problems))
  sds = {n: {k: _state_dict(load_pt(p), "adapter_state_dict", p) for k, p in by_node[n].items()} for n in nodes}
  first = sds[0]
  norm = first[f"{branches[0]}_adapter"].get("norm.weight")
  if norm is None:
    raise ReferenceCheckpointError(f"{by_node[0][branches[0] + '_adapter'].name}: no 'norm.weight' (the adapter's "
                                   "input LayerNorm)")
  in_dim = int(norm.shape[0])
  shapes = {}
  for b in branches:
    lat = first[f"{b}_projection"].get("latents")
    if lat is None:
      raise ReferenceCheckpointError(f"{by_node[0][b + '_projection'].name}: no 'latents' (a MAPBlock's)")
    shapes[b] = (int(lat.shape[1]),) if lat.shape[0] == 1 else tuple(int(v) for v in lat.shape)
  heads = make_heads(cfg, shapes)
  per_node = []
  for n in nodes:
    model = tb.heads_like(heads, in_dim)
    for key, sd in sds[n].items():
      b, part = key.split("_")
      module = getattr(model.branches[b], part)
      try:
        module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
      except RuntimeError as e:
        raise ReferenceCheckpointError(f"{by_node[n][key].name}: does not fit the config's heads "
                                       f"({str(e).strip().splitlines()[0]} ...): {' '.join(str(e).split())[:400]}") from e
    per_node.append(tb.flax_params(model))
  clients = jax.tree.map(lambda *a: np.stack(a), *per_node)
  server = jax.tree.map(lambda a: a.mean(0), clients)  # not read: a run of mode 'none' has no server model
  saved = dataclasses.replace(cfg.federation, adapter_aggregation_mode="none", adapter_load_checkpoint=None)
  config = dataclasses.replace(cfg, federation=saved).to_dict()
  out.mkdir(parents=True, exist_ok=True)
  checkpointer = ckpt_lib.RoundCheckpointer(out / "state", max_to_keep=1)
  try:
    checkpointer.save(rnd, {"server": _Imported(server), "clients": _Imported(clients)}, config,
                      {"imported_from": str(Path(directory).absolute())})
  finally:
    checkpointer.close()
  ckpt_lib.write_json_atomic(out / "config.json", config)
  ckpt_lib.write_json_atomic(out / "summary.json", {"imported_from": str(Path(directory).absolute()), "round": rnd,
                                                    "files": sorted(p.name for n in nodes for p in by_node[n].values())})
  if verbose:
    print(f"imported the adapters of {len(nodes)} node(s), round {rnd}, from {directory} -> {out}")
  return out
