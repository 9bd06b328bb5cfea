"""Evaluate a finished run on any folder of clips laid out like its training dataset.

python -m experiments.evaluate --run checkpoints/runs/fsdd_tiny --data path/to/recordings [--nodes]

For FSDD the folder holds ``{digit}_{speaker}_{take}.wav`` files, e.g. recordings of a new
speaker. Every clip of the folder is evaluated (no split), with the run's own backbones, feature
settings and class targets; results are printed and written to ``RUN/eval_<folder>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from experiments.cli_errors import non_negative_int


def main(argv=None) -> int:
  """Exit status: 0 done, 2 refused (not a run directory, no checkpoint, unreadable or empty clips, a bad
  config): one message, no traceback (``experiments.cli_errors``)."""
  from experiments.cli_errors import guard
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", required=True, help="run directory (holds config.json and state/)")
  p.add_argument("--data", required=True, help="folder of clips in the training dataset's layout")
  p.add_argument("--nodes", action="store_true", help="also evaluate every node's model")
  p.add_argument("--round", type=non_negative_int, default=None, help="checkpoint round (default: latest)")
  args = p.parse_args(argv)
  return guard(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp

  from a2v_jax import checkpoint as ckpt_lib
  from a2v_jax import config as config_lib
  from a2v_jax import features as features_lib
  from a2v_jax.data.registry import read_dataset
  from a2v_jax.federated.evaluate import make_evaluator, pad_indices
  from a2v_jax.federated.local import Shared
  from experiments.cli_errors import UsageError

  run = Path(args.run)
  if not (run / "config.json").is_file():
    raise UsageError(f"{run} is not a run directory (no config.json)")
  try:
    saved = json.loads((run / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UsageError(f"{run / 'config.json'} is corrupt (not JSON: {e}); it is the run's config, written at its start")
  if not isinstance(saved, dict):
    raise UsageError(f"{run / 'config.json'} is corrupt (a JSON {type(saved).__name__}, not an object)")
  cfg = config_lib.from_dict(saved, where=str(run / "config.json"))
  # The checkpoint first: a damaged one is refused before any feature work.
  manager = ocp.CheckpointManager((run / "state").absolute(), item_names=("state", "meta"))
  step = args.round if args.round is not None else manager.latest_step()
  if step is None:
    raise UsageError(f"no checkpoint under {run / 'state'}")
  if step not in manager.all_steps():
    raise UsageError(f"no checkpoint of round {step} under {run / 'state'} (rounds kept: "
                     f"{sorted(manager.all_steps())})")
  state, _ = ckpt_lib.restore_verified(manager, step, f"checkpoint round {step} under {run / 'state'}")

  data_cfg = dataclasses.replace(cfg.data, dataset_root=args.data)
  clipset = read_dataset(data_cfg)
  warn_short_clips(clipset, cfg.features.sample_rate)
  feats = features_lib.ast_features(cfg, clipset)
  targets = features_lib.text_targets(cfg, clipset.class_names)

  from a2v_jax.models.heads import head_functions, make_heads
  apply_fn, _ = head_functions(make_heads(cfg, {b: t.shape[1:] for b, t in targets.items()}), feats.shape[1:])
  evaluate = jax.jit(make_evaluator(apply_fn, cfg.train.batch_size))
  shared = Shared(jnp.asarray(feats), jnp.asarray(clipset.labels), {b: jnp.asarray(t) for b, t in targets.items()})
  idx, n = pad_indices(np.arange(len(clipset)), cfg.train.batch_size)
  results = {"run": str(run), "data": args.data, "round": int(step), "clips": n}
  models = {"server": state["server"]["params"]}
  if args.nodes:
    client_params = state["clients"]["params"]
    num = jax.tree.leaves(client_params)[0].shape[0]
    for i in range(num):
      models[f"node_{i}"] = jax.tree.map(lambda x: x[i], client_params)
  for name, params in models.items():
    m = evaluate(params, jnp.asarray(idx), n, shared)
    for k, v in m.items():
      results[f"test/{name}/{k}"] = float(v)
  print(f"{n} clips from {args.data}, checkpoint round {step}")
  for k, v in results.items():
    if k.startswith("test/") and ("accuracy" in k or "centred" in k):
      print(f"  {k:<45} {v:.4f}")
  out = run / f"eval_{Path(args.data).name}.json"
  out.write_text(json.dumps(results, indent=2))
  print(f"written {out}")
  return 0


def warn_short_clips(clipset, sample_rate: int) -> list[str]:
  """Warns (one line on stderr) about clips shorter than the front-end's 25 ms window: their features are all
  padding, so their scores say nothing about the model. Returns the clips named. Unreadable and empty files are
  left to the feature extraction, which refuses them naming each."""
  import soundfile as sf
  from a2v_jax.data.fbank import frame_params
  frame = frame_params(sample_rate)[0]
  short = []
  for clip in clipset.clips:
    try:
      info = sf.info(str(clip.path))
    except Exception:  # reported by the feature extraction
      continue
    if 0 < info.frames * sample_rate / info.samplerate < frame:
      short.append(f"{Path(clip.path).name} ({info.frames} sample(s) at {info.samplerate} Hz)")
  if short:
    print(f"warning: {len(short)} clip(s) shorter than the front-end's 25 ms window ({frame} samples at {sample_rate} "
          f"Hz) are scored on padding only: {', '.join(short[:5])}" + (" ..." if len(short) > 5 else ""),
          file=sys.stderr)
  return short


if __name__ == "__main__":
  sys.exit(main())
