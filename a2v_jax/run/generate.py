"""``generate``: the reference's third step -- trained heads + trained generators, no training.

The reference's pipeline is three runs: Run 1 trains the generators, a heads run trains (and
checkpoints) the heads, and a generate run loads both and turns synthetic features into conditioning
embeddings and images. Here the third run is ``run_generate``, which ``experiment.run_experiment`` calls
when ``adapter_load_checkpoint`` names a finished run directory::

  python -m experiments.run --config experiments/configs/fsdd_generate.json

It draws ``synthetic_samples_per_class`` features per node and class it holds from the restored
generators (``generator_runs.restore_pretrained`` / ``draw``, the Run 2 restore and its checks) and writes,
under its own run directory ``{output_dir}/{name}/``::

  embeddings/node_{i}_embeddings_r{R}.safetensors   node i's heads on node i's synthetic features
  embeddings/server_embeddings_r{R}.safetensors     the server heads on every node's synthetic features
  images/{file stem}/...                           rendered (``render.render_checkpoints``) when asked
  config.json, metrics.jsonl (one row), summary.json

``R`` is the round of the heads checkpoint; the files are ``embeddings_io``'s, so
``python -m experiments.render --checkpoint_dir RUN/embeddings`` renders them later as well. Sample ids
are ``synthetic_n{node}_{j}`` (row j of that node, rows ordered by class), split ``"synthetic"``.

Decisions:

* No training: ``global_rounds``, ``local_epochs``, the learning rates and ``adapter_aggregation_mode``
  of this config are not read (the heads run's own mode decides which heads exist: ``none`` has no
  trained server model, ``centralised`` no node models). ``train.batch_size`` only sizes the
  prediction chunks.
* Images: the output switches of in-training renders (``render/round_outputs.py``) decide, with a single pass
  instead of rounds: ``generate_global_images_frequency > 0`` renders the server file,
  ``generate_nodes_images_frequency > 0`` every node's file (the reference's generate step rendered every
  node), each sample of it (how many: ``synthetic_samples_per_class``), scored by CLIP zero-shot
  (``test/{server|node_i}/image_{metric}``); ``save_embeddings_instead_of_images`` renders nothing.
* Widths: the heads run's ``config.json`` must agree with this config on every key that fixes the heads'
  parameters or inputs (``HEADS_KEYS``), and its checkpoint's array shapes with the heads this config
  builds; each disagreement is listed. The text targets are read only for their shapes (and a
  text-conditioned generator's check).
* Nothing earlier is overwritten: a run directory that already holds anything is refused; ``--resume``
  re-does an unfinished generate run of the same config (the draw is deterministic, so its files come
  out the same), never a finished one. Embeddings files outside the run directory (a non-default
  ``embeddings_checkpoint_dir``) that exist already are refused unless written by this same config.

Every check runs before anything is written (a feature / target cache miss may fill its cache, as
in Run 2).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from a2v_jax import checkpoint as ckpt_lib
from a2v_jax.errors import A2VError
from a2v_jax.render import embeddings_io
from a2v_jax import features as features_lib
from a2v_jax.generators import checkpoint as gen_ckpt
from a2v_jax.config import Config
from a2v_jax.generators import runs as generator_runs
from a2v_jax.models.heads import head_functions, make_heads
from a2v_jax.run.log import RunDirError, RunLog, run_dir_for
from a2v_jax.types import Params, PRNGKey

# fold_in salt of the run key for the generate draw (generator_runs holds the other salts).
GENERATE_SALT = 0x6E7A
SPLIT = "synthetic"
# Keys of the heads run's config.json that must equal this config's: they fix the heads' parameter
# shapes (widths, latents, dtype, text-encoder widths), how they compute (map_heads), what they read
# (the AST and its token settings) and which node each set of heads belongs to (data).
HEADS_KEYS: dict[str, tuple[str, ...]] = {
    "experiment": ("param_dtype",),
    "data": ("dataset", "selected_classes", "num_nodes", "partition"),
    "features": ("sample_rate", "num_mel_bins", "max_length", "use_cls_token_only", "pooled_tokens"),
    "backbones": ("ast_model", "clip_text_model", "t5_model"),
    "text": ("t5_max_length", "clip_max_length"),
    "heads": ("diffusion_type", "clip_adapter_hidden", "t5_adapter_hidden", "map_heads", "map_mlp_ratio",
              "t5_latents"),
}
SERVER, CLIENTS = "['server'].params", "['clients'].params"


class GenerateError(A2VError, RuntimeError):
  """A generate run that cannot start: unusable heads run or checkpoint, heads of other widths."""


@dataclasses.dataclass(frozen=True)
class HeadsRun:
  """What a heads run directory offers, read without touching an array."""
  path: Path
  config: dict             # its config.json
  round: int               # its latest complete checkpoint round
  shapes: dict[str, list]  # leaf shapes the checkpoint recorded (``checkpoint._shapes`` keys)
  finished: bool           # summary.json present

  @property
  def mode(self) -> str:
    return self.config.get("federation", {}).get("adapter_aggregation_mode", "avg")

  @property
  def has_server(self) -> bool:
    return self.mode != "none"  # aggregation 'none' trains no global model

  @property
  def has_nodes(self) -> bool:
    return self.mode != "centralised"  # one pooled client, no node models


def generate_key(cfg: Config) -> PRNGKey:
  """Key of the generate run's synthetic draw."""
  return generator_runs.run_key(cfg, GENERATE_SALT)


def _manager(state_dir: Path):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(state_dir.absolute(), item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(create=False, read_only=True))


def inspect_heads_run(path: str | Path) -> HeadsRun:
  """Reads a heads run directory's config.json and its latest complete checkpoint's metadata.

  Raises:
    GenerateError: no such directory, not a run directory (no config.json), or no complete heads
      checkpoint under ``state/`` (a generator-only Run 1 or a generate run has none).
  """
  import orbax.checkpoint as ocp
  path = Path(path)
  if not path.is_dir():
    parent = path.parent
    runs = sorted(p.name for p in parent.iterdir() if (p / "config.json").is_file()) if parent.is_dir() else []
    raise GenerateError(f"adapter_load_checkpoint: no run directory at {path}; "
                        + (f"run directories in {parent}: {runs}" if runs else f"{parent} holds no run directory")
                        + ". Train the heads first (e.g. experiments/configs/fsdd_tiny.json) and point "
                        "adapter_load_checkpoint at its run directory")
  if not (path / "config.json").is_file():
    raise GenerateError(f"adapter_load_checkpoint: {path} is not a run directory (no config.json)")
  try:
    config = json.loads((path / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise GenerateError(f"adapter_load_checkpoint: {path}/config.json is corrupt: {e}") from e
  state_dir = path / "state"
  step = None
  if state_dir.is_dir():
    mgr = _manager(state_dir)
    try:
      step = mgr.latest_step()
      if step is not None:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # a damaged or foreign folder
      raise GenerateError(f"adapter_load_checkpoint: the heads checkpoint under {state_dir} is unreadable: "
                          f"{type(e).__name__}: {e}") from e
    finally:
      mgr.close()
  if step is None:
    what = ("generator_only_mode: a Run 1 trains no heads" if config.get("generators", {}).get("generator_only_mode")
            else "a generate run writes none" if config.get("federation", {}).get("adapter_load_checkpoint")
            else "an empty state/" if state_dir.is_dir() else "no state/ directory")
    raise GenerateError(f"adapter_load_checkpoint: {path} holds no complete heads checkpoint ({what}); "
                        "expected state/<round>/ written by a heads run (checkpoint_frequency)")
  return HeadsRun(path, config, int(step), dict(meta.get("shapes", {})), (path / "summary.json").is_file())


def heads_differences(saved: Mapping[str, Any], cfg: Config) -> list[str]:
  """``HEADS_KEYS`` on which a heads run's config (``saved``) and ``cfg`` disagree, in words."""
  mine = cfg.to_dict()
  pick = lambda d: {s: {k: (d.get(s) or {}).get(k, "<absent>") for k in keys} for s, keys in HEADS_KEYS.items()}
  return ckpt_lib.config_differences(pick(saved), pick(mine))


def expected_shapes(cfg: Config, target_shapes: Mapping[str, tuple[int, ...]],
                    token_shape: tuple[int, int]) -> dict[str, list[int]]:
  """Leaf shapes of one node's heads for ``cfg`` (``jax.eval_shape``: nothing allocated), by key path."""
  _, init = head_functions(make_heads(cfg, target_shapes), token_shape)
  abstract = jax.eval_shape(init, jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {jax.tree_util.keystr(p): [int(d) for d in x.shape] for p, x in flat}


def shape_differences(run: HeadsRun, expected: Mapping[str, list[int]], num_nodes: int) -> list[str]:
  """Disagreements between the checkpoint's recorded param shapes and ``expected`` (one node's heads).

  The clients' leaves carry a leading client axis (padded to the devices): it must hold ``num_nodes``.
  """
  diffs = []
  groups = ([(SERVER, False)] if run.has_server else []) + ([(CLIENTS, True)] if run.has_nodes else [])
  for prefix, lead in groups:
    found = {k[len(prefix):]: v for k, v in run.shapes.items() if k.startswith(prefix)}
    for k, want in expected.items():
      have = found.get(k)
      if have is None:
        diffs.append(f"{prefix}{k}: missing in the checkpoint, expected {want}")
      elif (have[1:] if lead else have) != want:
        diffs.append(f"{prefix}{k}: checkpoint {have} != expected {[num_nodes] + want if lead else want}")
      elif lead and have[0] < num_nodes:
        diffs.append(f"{prefix}{k}: checkpoint holds {have[0]} node(s), this config has {num_nodes}")
    diffs += [f"{prefix}{k}: in the checkpoint only" for k in found if k not in expected]
  return diffs


def restore_heads(run: HeadsRun) -> tuple[Params, Params]:
  """(server params, client params with the leading client axis) of the run's checkpoint, as numpy.

  Raises:
    GenerateError: the arrays cannot be read, or differ from what was saved.
  """
  mgr = _manager(run.path / "state")
  try:
    state, _ = ckpt_lib.restore_verified(mgr, run.round, f"heads checkpoint round {run.round} under {run.path}/state")
  except ckpt_lib.CheckpointError as e:
    raise GenerateError(str(e)) from e
  finally:
    mgr.close()
  return jax.tree.map(np.asarray, (state["server"]["params"], state["clients"]["params"]))


def predict(apply_fn: Callable, params: Params, x: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
  """``apply_fn(params, x)`` on fixed-size chunks of rows (the last one zero-padded): one compile per run."""
  parts = []
  for s in range(0, len(x), chunk):
    xs = np.asarray(x[s:s + chunk], np.float32)
    n = len(xs)
    if n < chunk:
      xs = np.concatenate([xs, np.zeros((chunk - n,) + xs.shape[1:], np.float32)])
    parts.append({b: np.asarray(v, np.float32)[:n] for b, v in jax.device_get(apply_fn(params, xs)).items()})
  return {b: np.concatenate([p[b] for p in parts]) for b in parts[0]}


@dataclasses.dataclass(frozen=True)
class NodeRows:
  """One node's synthetic features and what names them in an embeddings file."""
  features: np.ndarray          # (M, T, D)
  class_names: tuple[str, ...]  # (M,)
  sample_ids: tuple[str, ...]   # (M,)


def node_rows(x: np.ndarray, y: np.ndarray, valid: np.ndarray, class_names: Sequence[str]) -> list[NodeRows]:
  """``draw``'s (C, M, ...) output split into each node's valid rows (ordered by class)."""
  out = []
  for n in range(x.shape[0]):
    keep = np.asarray(valid[n], bool)
    out.append(NodeRows(x[n][keep], tuple(class_names[int(c)] for c in y[n][keep]),
                        tuple(f"synthetic_n{n}_{j}" for j in range(int(keep.sum())))))
  return out


def _check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> None:
  """Refuses to write over an earlier run (generate or not); ``resume`` re-does an unfinished one."""
  if not run_dir.exists() or not any(run_dir.iterdir()):
    return
  if not resume:
    raise RunDirError(f"run directory {run_dir} already holds a run; choose another experiment name "
                      "(--set name=...) so nothing is overwritten (--resume re-does an unfinished generate run)")
  if (run_dir / "summary.json").is_file():
    raise RunDirError(f"run directory {run_dir} holds a finished run: nothing to resume; choose another "
                      "experiment name (--set name=...)")
  try:
    saved = json.loads((run_dir / "config.json").read_text())
  except (OSError, json.JSONDecodeError):
    raise RunDirError(f"run directory {run_dir} holds no readable config.json: not a generate run to resume")
  diffs = ckpt_lib.config_differences(saved, cfg.to_dict())
  if diffs:
    raise RunDirError(f"run directory {run_dir} holds a run of another config; --resume would mix them:\n  "
                      + "\n  ".join(diffs))


def _check_files(paths: Sequence[Path], config_hash: str, resume: bool) -> None:
  """Existing target files are refused, unless resuming and written by this same config."""
  clash = []
  for p in paths:
    if not p.exists():
      continue
    try:
      ours = resume and embeddings_io.load_embeddings(p).config_hash == config_hash
    except embeddings_io.EmbeddingsFileError:
      ours = False
    if not ours:
      clash.append(str(p))
  if clash:
    raise RunDirError(f"embeddings file(s) {clash} exist already (a shared embeddings_checkpoint_dir?) and were not "
                      "written by this run; set another embeddings_checkpoint_dir, or leave it at its default "
                      "(the run directory's embeddings/)")


def _render_wanted(cfg: Config) -> tuple[bool, bool]:
  """(render the server file, render the node files)."""
  o = cfg.output
  if o.save_embeddings_instead_of_images or cfg.heads.diffusion_type not in ("sd", "flux"):
    return False, False
  return o.generate_global_images_frequency > 0, o.generate_nodes_images_frequency > 0


def render_files(cfg: Config, run_dir: Path, paths: Sequence[Path], *, overwrite: bool,
                 verbose: bool) -> tuple[int, dict[str, float]]:
  """Renders every sample of ``paths`` into ``{run_dir}/images`` with the offline renderer (``render/offline.py``),
  with the in-training renders' settings (``round_outputs``); returns (images, CLIP zero-shot metrics
  named ``test/{server|node_i}/image_{metric}``)."""
  from a2v_jax.render import offline as render
  from a2v_jax.backbones import paths as backbone_paths
  from a2v_jax.render.round_outputs import IMAGE_METRICS, RENDER_BATCH
  o, kind = cfg.output, cfg.heads.diffusion_type
  opts = render.RenderOptions(
      output_dir=str(run_dir / "images"), diffusion_type=kind, model_dir=str(backbone_paths.backbone_dir(cfg, kind)),
      batch_size=RENDER_BATCH, num_inference_steps=o.num_inference_steps, guidance_scale=o.guidance_scale,
      seed=cfg.experiment.seed, height=o.image_size, width=o.image_size, overwrite=overwrite, on_error="stop",
      clip_model_dir=str(backbone_paths.backbone_dir(cfg, "clip")), progress=verbose)
  summary = render.render_checkpoints(list(paths), opts)
  metrics = {}
  for key, v in summary.metrics.items():  # test/{label}_r{round}/{metric} -> test/{label}/image_{metric}
    group, metric = key.split("/")[1:]
    if metric in IMAGE_METRICS:  # the in-training renders' metrics
      metrics[f"test/{group.rsplit('_r', 1)[0]}/image_{metric}"] = float(v)
  return summary.images, metrics


def run_generate(cfg: Config, *, resume: bool = False, verbose: bool = True,
                 prepared: Any = None) -> dict[str, Any]:
  """The generate run: restore heads + generators, predict on synthetic features, write; returns the summary.

  Args:
    cfg: the config; ``federation.adapter_load_checkpoint`` names the heads run directory.
    resume: re-do an unfinished generate run of this config in its run directory.
    verbose: print what is loaded and written.
    prepared: a ``trainer.Prepared`` to take the nodes and text targets from (tests); None builds the
      nodes and reads the targets (their cache), never the AST.

  Raises:
    GenerateError: missing run directory, no complete heads checkpoint, heads of other widths.
    GeneratorCheckpointError / GeneratorRunError: the generators (Run 2's checks).
    RunDirError: the run directory (or an embeddings file) holds an earlier run.
  """
  t0 = time.time()
  if jax.process_count() > 1:
    raise GenerateError("a generate run is one process's work (no training); start it without --coordinator")
  heads_run = inspect_heads_run(cfg.federation.adapter_load_checkpoint)
  diffs = heads_differences(heads_run.config, cfg)
  if diffs:
    raise GenerateError(f"{heads_run.path} holds heads of other widths or data than this config describes "
                        "(its config.json vs this run's):\n  " + "\n  ".join(diffs))
  if verbose:
    offered = " + ".join((["server"] if heads_run.has_server else [])
                         + ([f"{cfg.data.num_nodes} node(s)"] if heads_run.has_nodes else []))
    print(f"generate: heads of round {heads_run.round} from {heads_run.path} ({offered}; trained with "
          f"adapter_aggregation_mode={heads_run.mode!r})"
          + ("" if heads_run.finished else " -- that run did not finish (no summary.json): its latest checkpoint")
          + "; no training (global_rounds, local_epochs, learning rates are not used)")
  from a2v_jax.data.nodes import build_nodes
  nodes = prepared.nodes if prepared is not None else build_nodes(cfg)
  feats = None if prepared is None else prepared.features
  state, gen_round, extra = generator_runs.restore_pretrained(
      cfg, nodes, feature_dim=None if feats is None else feats.shape[-1])
  where = str(gen_ckpt.round_dir(cfg.generators, gen_round))
  if verbose:
    print(f"generate: generators of round {gen_round} restored from {where} ({state.layout.num_slots} slot(s))")
  run_dir = run_dir_for(cfg)
  _check_run_dir(cfg, run_dir, resume)
  names = nodes.clipset.class_names
  if prepared is not None:
    targets = prepared.targets
  else:
    targets = features_lib.text_targets(cfg, names, verbose=verbose)
    features_lib.check_targets(targets, cfg, len(names))
  generator_runs.check_condition(cfg, state, targets, where)
  scale = generator_runs.FeatureScale.from_extra(extra, state.spec)
  length = generator_runs.check_features(cfg, state, feats)
  token_shape = (length, state.spec.feature_dim)
  target_shapes = {b: tuple(t.shape[1:]) for b, t in targets.items() if b in cfg.branches}
  shape_diffs = shape_differences(heads_run, expected_shapes(cfg, target_shapes, token_shape), nodes.num_nodes)
  if shape_diffs:
    raise GenerateError(f"heads checkpoint round {heads_run.round} under {heads_run.path}/state has other parameter "
                        "shapes than the heads this config builds:\n  " + "\n  ".join(shape_diffs[:20])
                        + (f"\n  ... {len(shape_diffs) - 20} more" if len(shape_diffs) > 20 else ""))
  counts = generator_runs.synthetic_counts(cfg, nodes)
  try:
    x, y, valid = generator_runs.draw(state, scale, generate_key(cfg), counts, length)
  except ValueError as e:
    raise generator_runs.GeneratorRunError(f"generate cannot draw the synthetic features its nodes need: {e}") from e
  rows = node_rows(x, y, valid, names)
  from a2v_jax.render.round_outputs import PREDICT_BATCHES, embeddings_dir
  target_dir = embeddings_dir(cfg, run_dir)
  files: dict[Any, Path] = {}
  if heads_run.has_nodes:
    files.update({n: target_dir / embeddings_io.embeddings_filename(n, heads_run.round)
                  for n, r in enumerate(rows) if len(r.sample_ids)})
  if heads_run.has_server:
    files["server"] = target_dir / embeddings_io.embeddings_filename("server", heads_run.round)
  _check_files(list(files.values()), cfg.hash(), resume)
  server_params, client_params = restore_heads(heads_run)
  if verbose:
    print(f"generate: {int(counts.sum())} synthetic rows of {token_shape} over {int((counts.sum(0) > 0).sum())} "
          f"classes ({', '.join(f'node_{n} {len(r.sample_ids)}' for n, r in enumerate(rows))})")

  # Everything is checked: from here on the run writes.
  log = RunLog(run_dir, resume=resume, verbose=False)
  if resume:
    log.truncate_after(-1)  # a re-done run logs its one row afresh
  ckpt_lib.write_json_atomic(run_dir / "config.json", cfg.to_dict())
  if verbose:
    print(f"run directory: {run_dir}")
  apply_fn = jax.jit(head_functions(make_heads(cfg, target_shapes), token_shape)[0])
  chunk = PREDICT_BATCHES * cfg.train.batch_size
  common = dict(round=heads_run.round, split=SPLIT, diffusion_type=cfg.heads.diffusion_type,
                config_hash=cfg.hash())
  for key, path in files.items():
    if key == "server":
      feats_k = np.concatenate([r.features for r in rows])
      cls = tuple(c for r in rows for c in r.class_names)
      ids = tuple(s for r in rows for s in r.sample_ids)
      params = server_params
    else:
      feats_k, cls, ids = rows[key].features, rows[key].class_names, rows[key].sample_ids
      params = jax.tree.map(lambda a: a[key], client_params)
    emb = predict(apply_fn, params, feats_k, chunk)
    embeddings_io.save_embeddings(path, embeddings=emb, class_names=cls, sample_ids=ids, node=key, **common)
    if verbose:
      print(f"wrote {path} ({len(ids)} rows)")
  row: dict[str, Any] = {"round": heads_run.round, "server/synthetic_samples_total": int(counts.sum()),
                         "server/synthetic_samples_classes": int((counts.sum(0) > 0).sum())}
  server_img, node_img = _render_wanted(cfg)
  to_render = [p for k, p in files.items() if (server_img if k == "server" else node_img)]
  images = 0
  if to_render:
    images, metrics = render_files(cfg, run_dir, to_render, overwrite=resume, verbose=verbose)
    row.update(metrics)
    if verbose:
      print(f"rendered {images} image(s) from {len(to_render)} file(s) into {run_dir / 'images'}")
  row["round_seconds"] = round(time.time() - t0, 4)
  log.append(row)
  return log.finish(cfg, extra={
      "generate": True, "heads_run": str(heads_run.path), "heads_round": heads_run.round,
      "heads_run_finished": heads_run.finished, "generator_round": gen_round,
      "synthetic_samples_total": int(counts.sum()),
      "synthetic_samples_per_node": [len(r.sample_ids) for r in rows],
      "embeddings_files": [str(p) for p in files.values()], "images": images,
      **{k: v for k, v in row.items() if k.startswith("test/")}})
