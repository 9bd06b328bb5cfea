"""The study's outputs: ``scaling.csv``, ``scaling.jsonl`` (first line: the run's metadata), ``scaling.png``
(time per round vs clients, log-log) and the printed table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

def write_outputs(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
  """scaling.csv, scaling.jsonl (first line: the run's metadata) and scaling.png."""
  out.mkdir(parents=True, exist_ok=True)
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(out / "scaling.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, keys)
    wr.writeheader()
    wr.writerows(rows)
  with open(out / "scaling.jsonl", "w") as f:
    f.write(json.dumps({"meta": meta}) + "\n")
    for r in rows:
      f.write(json.dumps(r) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for backend in dict.fromkeys(r["backend"] for r in rows if not r["backend"].startswith("matmul")):  # yardsticks: no rounds
    pts = sorted((r["clients"], r["round_s"]) for r in rows if r["backend"] == backend and "round_s" in r)
    if pts:
      ax.loglog(*zip(*pts), marker="o", label=backend)
  ax.set_xlabel("clients per round")
  ax.set_ylabel("seconds per round")
  ax.set_title(meta.get("title", "round time vs clients"), fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "scaling.png", dpi=120)
  plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
  head = f"{'backend':<10}{'clients':>8}{'s/round':>10}{'rounds/s':>10}{'samples/s':>11}{'GFLOP/s':>9}" \
         f"{'compile s':>10}{'RSS MB':>8}{'vs JAX':>8}"
  lines = [head, "-" * len(head)]
  for r in rows:
    if "skipped" in r:
      lines.append(f"{r['backend']:<10}{r['clients']:>8}  skipped (memory plan)")
      continue
    comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
    vs = f"{r['slowdown_vs_jax']:.1f}x" if "slowdown_vs_jax" in r else "1x"
    lines.append(f"{r['backend']:<10}{r['clients']:>8}{r['round_s']:>10.4f}{r['rounds_per_s']:>10.2f}"
                 f"{r['samples_per_s']:>11.0f}{r['train_gflop_s']:>9.2f}{comp:>10}{r['peak_rss_mb']:>8.0f}{vs:>8}")
  return "\n".join(lines)
