"""End-of-round outputs: embeddings checkpoints, or rendered images scored by CLIP zero-shot.

Why a module of its own: the trainer's round loop should read "round, evaluate, outputs, log,
checkpoint", not carry the renderers, the file layout and the image metric. The trainer
builds one ``RoundOutputs`` per run and, after each round, asks ``wants(r)`` and calls it;
everything heavy (the SD/FLUX renderer, the CLIP scorer) is loaded lazily, once, on the
first round that needs it.

Two mutually exclusive modes (the reference's ``generate_embeddings_only`` switch,
6.2, 6.4):

* ``save_embeddings_instead_of_images``: every ``embeddings_save_frequency`` rounds (0 =
  never), ``node_{i}_embeddings_r{r}.safetensors`` per node (its own heads on its val+test
  clips) and ``server_embeddings_r{r}.safetensors`` (the server heads on the union of the
  nodes' val+test clips), written atomically by ``embeddings_io.save_embeddings`` for the
  offline renderer (``render/offline.py``).
* otherwise: every ``generate_global_images_frequency`` rounds the server heads, and every
  ``generate_nodes_images_frequency`` rounds node ``render_node``'s heads, render
  ``images_per_class`` images per class (PNGs + a contact sheet per class) and are scored by
  CLIP zero-shot over all class names: ``test/{server|node_i}/image_{metric}``.

Decisions (and where they differ from the reference):

* Splits: val + test (``EVAL_SPLITS``), the reference's ``save_generated_images_splits``
  default ``['test', 'val']``. Its surviving node file held every split ('all'), train
  included; train-clip predictions only show what the heads were fitted on, and are 80% of
  the volume, so they are not written.
* Directory: ``embeddings_checkpoint_dir`` left at its default ('checkpoints/embeddings')
  means ``{run_dir}/embeddings``: file names carry node and round but no run name, so two
  runs sharing the default folder would overwrite each other. Any other value is used as
  given (relative to the working directory, like every other path in the config).
* Rendered clips: per class, the first ``images_per_class`` clips (by dataset index) of the
  val+test pool, the same clips every round; clip ``j`` starts from the noise of seed
  ``experiment.seed + j``, so images differ across rounds and between server and node only
  through the embeddings.
* Aggregation ``none`` has no server model: no server outputs. ``centralised``
  has no federated nodes: only server outputs.
* ``cogx`` has no renderer: a message at construction; embeddings checkpoints still work.
* ``generator_only_mode`` (Run 1) trains no heads: nothing is written, as in the reference.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from a2v_jax.render import embeddings_io

from a2v_jax.render import offline as render
from a2v_jax.config import Config, OutputConfig
from a2v_jax.federated.evaluate import pad_indices
from a2v_jax.types import Params

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")
IMAGE_METRICS = ("accuracy", "balanced_accuracy", "f1_score")
DEFAULT_EMBEDDINGS_DIR = OutputConfig().embeddings_checkpoint_dir
RENDER_BATCH = 8  # images per renderer call (SD pads the last batch: one compile per run)
# predict_fn always sees this many batches of rows (the last chunk padded): one compile per run
# instead of one per distinct node size.
PREDICT_BATCHES = 8

# predict_fn(params, idx (PREDICT_BATCHES * train.batch_size,)) -> {branch: (len(idx), ...)}.
PredictFn = Callable[[Params, np.ndarray], Mapping[str, Any]]


def due(round_: int, frequency: int) -> bool:
  """True on rounds that are multiples of ``frequency``; 0 (or less) means never."""
  return frequency > 0 and round_ % frequency == 0


def embeddings_dir(cfg: Config, run_dir: Path) -> Path:
  """Where embeddings checkpoints go: ``{run_dir}/embeddings`` for the default, else as configured."""
  value = cfg.output.embeddings_checkpoint_dir
  return Path(run_dir) / "embeddings" if value == DEFAULT_EMBEDDINGS_DIR else Path(value)


def image_dir(run_dir: Path, round_: int, group: str) -> Path:
  """``{run_dir}/images/round_{r:03d}/{group}`` (group: "server" or "node_{i}")."""
  return Path(run_dir) / "images" / f"round_{round_:03d}" / group


def eval_rows(splits: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
  """A node's val+test clip indices (sorted) and the split of each."""
  idx = [np.asarray(splits[s], np.int64) for s in EVAL_SPLITS if s in splits]
  names = [s for s in EVAL_SPLITS if s in splits for _ in range(len(splits[s]))]
  if not idx:
    return np.zeros((0,), np.int64), []
  idx = np.concatenate(idx)
  order = np.argsort(idx, kind="stable")
  return idx[order], [names[i] for i in order]


def pick_per_class(idx: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """The first ``k`` entries of ``idx`` of each class, classes in label order."""
  idx = np.asarray(idx, np.int64)
  lab = np.asarray(labels)[idx]
  return np.concatenate([idx[lab == c][:k] for c in np.unique(lab)] or [np.zeros((0,), np.int64)])


def client_slice(client_params: Params, i: int) -> Params:
  """Row ``i`` of a pytree whose leaves carry a leading client axis."""
  return jax.tree.map(lambda x: x[i], client_params)


class RoundOutputs:
  """What a run writes at the end of a round besides metrics and state checkpoints.

  Attributes:
    cfg: the run config.
    run_dir: the run directory.
    class_names: class name per label.
    clip_ids: unique id per dataset clip (row of the features), used as sample ids.
    config_hash: stored in embeddings files (``Config.hash()``).
  """

  def __init__(self, cfg: Config, run_dir: Path, class_names: Sequence[str],
               clip_ids: Sequence[str], config_hash: str):
    self.cfg, self.run_dir = cfg, Path(run_dir)
    self.class_names = tuple(class_names)
    self.clip_ids = tuple(str(c) for c in clip_ids)
    self.config_hash = config_hash
    o, mode = cfg.output, cfg.federation.adapter_aggregation_mode
    self.diffusion_type = cfg.heads.diffusion_type
    self.embeddings_only = o.save_embeddings_instead_of_images
    self.has_server = mode != "none"
    self.has_nodes = mode != "centralised"
    self.can_render = self.diffusion_type in ("sd", "flux")
    self._renderer: Optional[render._Renderer] = None
    self._classifier = None
    if self.embeddings_only and o.embeddings_save_frequency <= 0:
      log.warning("save_embeddings_instead_of_images is true but embeddings_save_frequency is %d: "
                  "no embeddings checkpoint will be written", o.embeddings_save_frequency)
    rendering = not self.embeddings_only and (o.generate_global_images_frequency > 0
                                              or o.generate_nodes_images_frequency > 0)
    if rendering and not self.can_render:
      log.warning("diffusion_type %r has no renderer: in-training images are skipped (set "
                  "save_embeddings_instead_of_images to keep the predicted embeddings instead)",
                  self.diffusion_type)
    if (rendering and o.generate_nodes_images_frequency > 0
        and not 0 <= o.render_node < cfg.data.num_nodes):
      raise ValueError(f"config key 'render_node' is {o.render_node}, but there are "
                       f"{cfg.data.num_nodes} node(s)")

  # --- what is due -----------------------------------------------------------------------------

  def _due(self, round_: int) -> dict[str, bool]:
    o = self.cfg.output
    if self.cfg.generators.generator_only_mode:  # Run 1 trains no heads: nothing to show
      return {"embeddings": False, "server_images": False, "node_images": False}
    if self.embeddings_only:
      save = due(round_, o.embeddings_save_frequency)
      return {"embeddings": save, "server_images": False, "node_images": False}
    render_ok = self.can_render
    return {"embeddings": False,
            "server_images": render_ok and self.has_server and due(round_, o.generate_global_images_frequency),
            "node_images": render_ok and self.has_nodes and due(round_, o.generate_nodes_images_frequency)}

  def wants(self, round_: int) -> bool:
    """Whether round ``round_`` has anything to write (so the trainer can skip the call)."""
    return any(self._due(round_).values())

  # --- the call ---------------------------------------------------------------------------------

  def __call__(self, round_: int, *, predict_fn: PredictFn, server_params: Optional[Params],
               client_params: Params, node_splits: Sequence[Mapping[str, np.ndarray]],
               labels: np.ndarray) -> dict[str, float]:
    """Writes this round's outputs; returns metrics for the round's log row.

    Args:
      round_: the round just finished (1-based).
      predict_fn: ``(params, idx) -> {branch: (len(idx), ...)}``, the heads' predicted
        conditioning embeddings for clip rows ``idx``. ``len(idx)`` is always
        ``PREDICT_BATCHES * cfg.train.batch_size`` (padding rows are dropped here), so a
        jitted ``federated.evaluate.predict`` closure fits as is and compiles once.
      server_params: the server heads (None: no server outputs).
      client_params: the nodes' heads, leading client axis; row i belongs to node_splits[i]
        (rows past ``len(node_splits)`` are padding and ignored).
      node_splits: per node, split -> clip indices (``NodeData.nodes``).
      labels: (N_all,) label per clip.

    Returns:
      ``test/{server|node_i}/image_{accuracy,balanced_accuracy,f1_score}`` for rendered
      groups, and ``outputs_seconds`` when anything was done; {} otherwise.
    """
    todo = self._due(round_)
    if not any(todo.values()):
      return {}
    t0 = time.perf_counter()
    labels = np.asarray(labels)
    nodes = [eval_rows(s) for s in node_splits]
    server_rows = eval_rows({s: np.concatenate([np.asarray(n.get(s, ()), np.int64) for n in node_splits])
                             for s in EVAL_SPLITS})
    server = self.has_server and server_params is not None
    out: dict[str, float] = {}
    if todo["embeddings"]:
      target = embeddings_dir(self.cfg, self.run_dir)
      if self.has_nodes:
        for i, (idx, splits) in enumerate(nodes):
          self._save(target, i, round_, predict_fn, client_slice(client_params, i), idx, splits, labels)
      if server:
        self._save(target, "server", round_, predict_fn, server_params, *server_rows, labels)
    if todo["server_images"] and server:
      out.update(self._render(round_, "server", predict_fn, server_params, server_rows[0], labels))
    if todo["node_images"]:
      i = self.cfg.output.render_node
      if i >= len(nodes):
        raise ValueError(f"config key 'render_node' is {i}, but the run has {len(nodes)} node(s)")
      out.update(self._render(round_, f"node_{i}", predict_fn, client_slice(client_params, i),
                              nodes[i][0], labels))
    out["outputs_seconds"] = time.perf_counter() - t0
    return out

  # --- pieces -----------------------------------------------------------------------------------

  def _predict(self, predict_fn: PredictFn, params: Params, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Runs predict_fn on fixed-size chunks of idx (the last one padded); numpy rows of idx."""
    chunk = PREDICT_BATCHES * self.cfg.train.batch_size
    parts = []
    for s in range(0, len(idx), chunk):
      padded, n = pad_indices(idx[s:s + chunk], chunk)
      parts.append({b: np.asarray(v, np.float32)[:n]
                    for b, v in jax.device_get(predict_fn(params, padded)).items()})
    return {b: np.concatenate([p[b] for p in parts]) for b in parts[0]}

  def _save(self, target: Path, node: int | str, round_: int, predict_fn: PredictFn, params: Params,
            idx: np.ndarray, splits: Sequence[str], labels: np.ndarray) -> Optional[Path]:
    if len(idx) == 0:
      log.info("%s has no val/test clips: no embeddings file in round %d", node, round_)
      return None
    emb = self._predict(predict_fn, params, idx)
    return embeddings_io.save_embeddings(
        target / embeddings_io.embeddings_filename(node, round_), embeddings=emb,
        class_names=[self.class_names[labels[j]] for j in idx],
        sample_ids=[self.clip_ids[j] for j in idx], node=node, round=round_, split=list(splits),
        diffusion_type=self.diffusion_type, config_hash=self.config_hash)

  def _render(self, round_: int, group: str, predict_fn: PredictFn, params: Params,
              pool: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Renders, saves and scores ``images_per_class`` clips per class of ``pool``."""
    from PIL import Image
    from a2v_jax.render.image_metrics import score
    idx = pick_per_class(pool, labels, self.cfg.output.images_per_class)
    if len(idx) == 0:
      log.info("%s has no val/test clips: no images in round %d", group, round_)
      return {}
    renderer = self.renderer
    emb = self._predict(predict_fn, params, idx)
    embeddings_io.check_branches(emb, self.diffusion_type, dims=renderer.dims,
                                 where=f"round {round_} {group} predictions")
    seeds = [self.cfg.experiment.seed + int(j) for j in idx]
    images = np.concatenate([
        render._to_uint8(renderer.render({b: emb[b][s:s + RENDER_BATCH] for b in renderer.dims},
                                         seeds[s:s + RENDER_BATCH]))
        for s in range(0, len(idx), RENDER_BATCH)])
    classes = [self.class_names[labels[j]] for j in idx]
    out_dir = image_dir(self.run_dir, round_, group)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheets: dict[str, list[tuple[np.ndarray, str]]] = {}
    for j, cls, img in zip(idx, classes, images):
      cid = self.clip_ids[j]
      Image.fromarray(img).save(out_dir / f"{render._safe(cls)}_{render._safe(cid)}.png")
      sheets.setdefault(cls, []).append((render.thumbnail(img), cid))
    for cls, items in sheets.items():
      render.contact_sheet([t for t, _ in items], [c for _, c in items],
                           f"{cls} - {group} round {round_}").save(out_dir / f"sheet_{render._safe(cls)}.png")
    m = score(self.classifier, images, classes)
    return {f"test/{group}/image_{k}": float(m[k]) for k in IMAGE_METRICS}

  @property
  def renderer(self) -> render._Renderer:
    """The SD (Flax) or FLUX (torch) renderer, loaded on first use."""
    if self._renderer is None:
      from a2v_jax.backbones import paths
      o = self.cfg.output
      kind = self.diffusion_type
      opts = render.RenderOptions(
          output_dir=str(self.run_dir / "images"), diffusion_type=kind,
          model_dir=str(paths.backbone_dir(self.cfg, kind)),
          batch_size=min(RENDER_BATCH, max(1, len(self.class_names) * o.images_per_class)),
          num_inference_steps=o.num_inference_steps, guidance_scale=o.guidance_scale,
          seed=self.cfg.experiment.seed, height=o.image_size, width=o.image_size, progress=False)
      t0 = time.perf_counter()
      self._renderer = render.make_renderer(opts)
      log.info("loaded the %s renderer in %.1f s", kind, time.perf_counter() - t0)
    return self._renderer

  @property
  def classifier(self):
    """The CLIP zero-shot scorer over all class names, loaded on first use."""
    if self._classifier is None:
      import torch
      from a2v_jax.backbones import paths
      from a2v_jax.render.image_metrics import ZeroShotCLIP
      device = "cuda" if torch.cuda.is_available() else "cpu"
      self._classifier = ZeroShotCLIP(paths.backbone_dir(self.cfg, "clip"), self.class_names,
                                      device=device)
    return self._classifier
