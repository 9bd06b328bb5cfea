"""A markdown table of a scaling study's ``scaling.jsonl``, one row per client count (for the README).

  python -m benchmarks.summarize benchmarks/results/regime_a [more result folders]

Per client count: JAX seconds per round (process CPU seconds), rounds/s of JAX and torch and their
ratio by wall time (and by CPU time), the ratio to torch with the AST forward when it was timed, JAX
samples/s, compile time, peak host RSS, XLA's buffer figure, the JAX training FLOP rate as a fraction
of the two matmul yardsticks timed between the same rounds (2048^3, and plain dots of the step's own
shapes; wall and CPU), and the 1-minute load average.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  from experiments.cli_errors import UsageError
  path = folder / "scaling.jsonl"
  if not path.is_file():
    raise UsageError(f"no scaling.jsonl in {folder} (write one with python -m experiments.scaling --out {folder})")
  try:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
  except json.JSONDecodeError as e:
    raise UsageError(f"{path} is not a scaling study's output (line {e.lineno}: {e.msg})") from None
  if not lines or "meta" not in lines[0]:
    raise UsageError(f"{path} is not a scaling study's output (its first line holds no 'meta')")
  return lines[0]["meta"], lines[1:]


def fraction(jx: dict[str, Any], mm: dict[str, Any] | None) -> str:
  """The JAX FLOP rate as a fraction of a yardstick's: by wall time (by CPU time)."""
  if mm is None:
    return "-"
  return (f"{jx['train_gflop_s'] / mm['train_gflop_s']:.0%} "
          f"({jx['train_gflop_per_cpu_s'] / mm['train_gflop_per_cpu_s']:.0%})")


def markdown(rows: list[dict[str, Any]]) -> str:
  head = ("| clients | JAX s/round (CPU s) | JAX rounds/s | torch rounds/s | JAX / torch: wall (CPU) | vs torch+AST "
          "| JAX samples/s | compile s | peak RSS MB | XLA buffers MiB | % of 2048^3 matmul: wall (CPU) "
          "| % of step-shape matmul: wall (CPU) | load |")
  out = [head, "|" + "---|" * (head.count("|") - 1)]
  by: dict[int, dict[str, dict[str, Any]]] = {}
  for r in rows:
    by.setdefault(r["clients"], {})[r["backend"]] = r
  for c in sorted(by):
    b = by[c]
    jx = b.get("jax")
    if jx is None or "skipped" in jx:
      out.append(f"| {c} | skipped: {jx['skipped'][:120] if jx else 'no JAX row'} |" + " |" * 11)
      continue
    tr, ta = b.get("torch"), b.get("torch+ast")
    ratio = f"{tr['round_s'] / jx['round_s']:.1f}x ({tr['cpu_s_per_round'] / jx['cpu_s_per_round']:.1f}x)" if tr else "-"
    ast = f"{ta['round_s'] / jx['round_s']:.1f}x" if ta else "-"
    frac, frac_step = (fraction(jx, b.get(k)) for k in ("matmul", "matmul@step"))
    xla = f"{jx['xla_bytes'] / 2 ** 20:.0f}" if jx.get("xla_bytes") else "-"
    out.append(f"| {c} | {jx['round_s']:.4g} ({jx['cpu_s_per_round']:.3g}) | {jx['rounds_per_s']:.3g} | "
               f"{tr['rounds_per_s']:.3g} | {ratio} | {ast} | {jx['samples_per_s']:.0f} | {jx['compile_s']:.1f} | "
               f"{jx['peak_rss_mb']:.0f} | {xla} | {frac} | {frac_step} | {jx['loadavg_1min']:.1f} |"
               if tr else
               f"| {c} | {jx['round_s']:.4g} ({jx['cpu_s_per_round']:.3g}) | {jx['rounds_per_s']:.3g} | - | - | - | "
               f"{jx['samples_per_s']:.0f} | {jx['compile_s']:.1f} | {jx['peak_rss_mb']:.0f} | {xla} | {frac} | "
               f"{frac_step} | {jx['loadavg_1min']:.1f} |")
  return "\n".join(out)


def main(argv=None) -> None:
  for folder in (argv if argv is not None else sys.argv[1:]):
    meta, rows = load(Path(folder))
    print(f"{folder}: {meta.get('title', '')}")
    print(markdown(rows))
    print()


def cli(argv=None) -> int:
  """``python -m benchmarks.summarize``: exit 0, or 2 with one message (a folder without a study, ...)."""
  from experiments.cli_errors import guard
  return guard(lambda: main(argv))


if __name__ == "__main__":
  sys.exit(cli())
