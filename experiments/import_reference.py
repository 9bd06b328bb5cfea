"""Import the reference's (fedgfe) .pt checkpoints: its node generators and its node adapters.

python -m experiments.import_reference generators --config RUN2_CONFIG --dir DIR --base vae_perclass
python -m experiments.import_reference adapters --config GENERATE_CONFIG --dir DIR --base adapter --out RUN_DIR

``generators`` writes the latest round of ``{DIR}/{base}_node{i}[_class_{c}]_round_{r}.pt`` as a generator
checkpoint under the config's ``generator_checkpoint_dir/_base_name`` (the config must say
``generator_architecture: "reference_mlp"``; its Run 2 then restores them). ``adapters`` writes the latest
round of ``{DIR}/{base}_node{i}_{clip|t5}_{adapter|projection}_round_{r}...pt`` as a heads run directory
RUN_DIR, which a generate config's ``adapter_load_checkpoint`` names. Either config may be ours or a reference
JSON. Files are read with ``torch.load(weights_only=True)``: no code is ever unpickled. Exit status 0 done,
2 refused (one message naming the file, tensor or key; nothing written).
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
  from experiments.cli_errors import guard
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("generators", "adapters"))
  p.add_argument("--config", required=True, help="the config that will use them (ours or a reference JSON)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  p.add_argument("--dir", required=True, help="the reference's checkpoint directory")
  p.add_argument("--base", required=True, help="the reference's checkpoint base name (file prefix)")
  p.add_argument("--out", help="adapters: the heads run directory to write")
  p.add_argument("--quiet", action="store_true")
  args = p.parse_args(argv)
  if args.what == "adapters" and not args.out:
    p.error("adapters needs --out RUN_DIR")
  return guard(lambda: _import(args))


def _import(args: argparse.Namespace) -> None:
  from a2v_jax.reference import checkpoints
  from a2v_jax.reference.config import load_config
  cfg = load_config(args.config, args.set)
  if args.what == "generators":
    checkpoints.import_generators(cfg, args.dir, args.base, verbose=not args.quiet)
  else:
    checkpoints.import_adapters(cfg, args.dir, args.base, args.out, verbose=not args.quiet)


if __name__ == "__main__":
  raise SystemExit(main())
