"""``--dry-run``: check config, data and weights, and print what a run would do, without training.

Every problem found is listed at once (missing data folder, missing backbone directories,
missing generator checkpoints...), so a run is not attempted, fixed and re-attempted one error
at a time. Nothing is computed beyond reading file headers and configs.
"""

from __future__ import annotations

from pathlib import Path


from a2v_jax.config import Config

_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024:
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} PiB"


def _backbones_needed(cfg: Config) -> list[str]:
  kinds = []
  if not cfg.generators.use_pretrained_generators:
    kinds.append("ast")
  if not (cfg.generators.generator_only_mode):
    kinds += ["clip_text" if b == "clip" else "t5" for b in cfg.branches]
  if cfg.output.generate_nodes_images_frequency or cfg.output.generate_global_images_frequency:
    kinds += ["sd" if cfg.heads.diffusion_type == "sd" else "flux", "clip"]
  return kinds


def collect_plan(cfg: Config) -> tuple[list[str], list[str]]:
  """Returns (plan lines, problems)."""
  from a2v_jax.backbones import paths
  lines, problems = [], []
  nodes = None
  try:
    from a2v_jax.data.nodes import build_nodes
    nodes = build_nodes(cfg)
    lines.append(nodes.summary())
  except Exception as e:  # listed with the others, not raised
    problems.append(f"data: {e}")

  dirs = {}
  for kind in _backbones_needed(cfg):
    try:
      value = getattr(cfg.backbones, paths._FIELD[kind])
      dirs[kind] = paths.backbone_dir(cfg, kind, create=value == "tiny")
      where = "tiny, written offline" if value == "tiny" else "local directory"
      lines.append(f"backbone {kind:<10} {dirs[kind]} ({where})")
    except Exception as e:
      problems.append(f"backbone {kind}: {e}")

  if cfg.generators.use_pretrained_generators:
    from a2v_jax.generators.checkpoint import scan_rounds
    gdir = Path(cfg.generators.generator_checkpoint_dir) / cfg.generators.generator_checkpoint_base_name
    complete, bad = scan_rounds(cfg.generators)
    if complete:
      lines.append(f"generators: round {complete[-1]} restored from {gdir}; the AST is never loaded")
    else:
      where = f"{gdir} holds no complete round ({'; '.join(bad) or 'empty'})" if gdir.is_dir() else \
          f"{gdir} does not exist"
      problems.append(f"generators: use_pretrained_generators is set but {where} "
                      "(run Run 1 with use_generator=true first)")

  token_shape = None
  if "ast" in dirs:
    try:
      from a2v_jax.backbones.ast import ASTSettings
      from a2v_jax.backbones.hf import read_config
      s = ASTSettings.from_hf_config(read_config(dirs["ast"]), cfg.features.max_length)
      tokens = 1 if cfg.features.use_cls_token_only else s.num_tokens
      if cfg.features.pooled_tokens is not None and tokens - 2 > cfg.features.pooled_tokens:
        tokens = 2 + cfg.features.pooled_tokens
      token_shape = (tokens, s.hidden_size)
      if nodes is not None:
        size = len(nodes.clipset) * tokens * s.hidden_size * _BYTES[cfg.features.cache_dtype]
        lines.append(f"AST feature cache: {len(nodes.clipset)} clips x {token_shape} "
                     f"{cfg.features.cache_dtype} = {_fmt_bytes(size)} on disk under {cfg.features.cache_dir}")
    except Exception as e:
      problems.append(f"AST config: {e}")

  if token_shape is not None and all(k in dirs for k in ("clip_text" if b == "clip" else "t5" for b in cfg.branches)):
    try:
      from a2v_jax.federated import memory
      from a2v_jax.backbones.text import target_dims
      from a2v_jax.models.heads import count_params, make_heads
      shapes = target_dims(cfg.heads.diffusion_type, dirs.get("clip_text"), dirs.get("t5"),
                           t5_max_length=cfg.text.t5_max_length, clip_max_length=cfg.text.clip_max_length)
      counts = count_params(make_heads(cfg, shapes), token_shape)
      total = sum(counts.values())
      pbytes = _BYTES[cfg.experiment.param_dtype]
      clients = 1 if cfg.federation.adapter_aggregation_mode == "centralised" else cfg.data.num_nodes
      # params + grads + AdamW moments (2) per client, f32 optimiser state; plus the drift correction's
      # params copies per client (FedProx's anchor; SCAFFOLD's control, gradient sum and correction).
      fed = cfg.federation
      drift_copies = memory.drift_copies(fed.local_drift_correction, fed.fedprox_mu)
      copies = drift_copies.kept + drift_copies.training
      state = clients * total * (pbytes + 4 * 3 + copies * pbytes)
      drift = f" with {copies} {fed.local_drift_correction} params cop{'y' if copies == 1 else 'ies'} each" \
          if copies else ""
      feats = (len(nodes.clipset) if nodes else 0) * token_shape[0] * token_shape[1] * 4
      lines.append(f"trainable parameters per node: {total:,} ({counts}); targets {shapes}")
      lines.append(f"estimated device memory: client state {_fmt_bytes(state)} for {clients} client(s){drift} "
                   f"+ features {_fmt_bytes(feats)} (+ activations of one batch per client)")
    except Exception as e:
      problems.append(f"heads: {e}")
  return lines, problems


def print_plan(cfg: Config) -> int:
  """Prints the plan; returns 0 when nothing is missing, 1 otherwise (all problems listed)."""
  lines, problems = collect_plan(cfg)
  print("plan:")
  for line in lines:
    print("  " + line.replace("\n", "\n  "))
  print(f"  rounds {cfg.federation.global_rounds} x local epochs {cfg.train.local_epochs}, batch "
        f"{cfg.train.batch_size}, aggregation {cfg.federation.adapter_aggregation_mode}, "
        f"diffusion_type {cfg.heads.diffusion_type} (branches {list(cfg.branches)})")
  if problems:
    print(f"{len(problems)} problem(s):")
    for p in problems:
      print(f"  - {p}")
    return 1
  print("dry run OK: nothing missing")
  return 0
