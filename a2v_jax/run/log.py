"""Run directory bookkeeping: metrics.jsonl / metrics.csv per round, a printed table, a final plot.

Metric names follow the reference's wandb keys (``test/node_{i}/...``, ``test/server/...``,
``train/node_{i}/...``) so dashboards built for it keep working; wandb itself is optional.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from a2v_jax.checkpoint import DiskFullError, is_disk_full
from a2v_jax.errors import A2VError
from a2v_jax.run import lock as run_lock


class RunDirError(A2VError, RuntimeError):
  """The run directory holds an earlier run that this one would overwrite."""


def run_dir_for(cfg: Any) -> Path:
  """A run's directory: ``{output_dir}/{name}``."""
  return Path(cfg.experiment.output_dir) / cfg.experiment.name


def check_output_folders(cfg: Any) -> None:
  """Every folder the run will write (run directory, caches, backbones, generator and embedding checkpoints)
  must be a folder or not exist yet: a config naming a file is refused at start-up, naming the key, instead of
  failing at the first write (after rounds of training, for a checkpoint folder).

  Raises:
    RunDirError: a key's path, or a folder above it, is a file.
  """
  keys = {"output_dir": cfg.experiment.output_dir, "cache_dir": cfg.features.cache_dir,
          "tiny_dir": cfg.backbones.tiny_dir, "generator_checkpoint_dir": cfg.generators.generator_checkpoint_dir,
          "embeddings_checkpoint_dir": cfg.output.embeddings_checkpoint_dir}
  for key, value in keys.items():
    path = Path(value)
    for p in (path, *path.parents):
      if p.exists() and not p.is_dir():
        raise RunDirError(f"config key '{key}' is {value!r}, but {p} is a file, not a folder; choose another "
                          "folder")


def train_losses(row: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
  """(heads' train losses {node: {branch: loss}}, generator losses {node: loss}) of a round row.

  Why separate: ``train/node_i/generator_loss`` (Run 1) is on another scale (standardised features, a
  VAE/GAN objective); summed into the heads' loss it would hide how the heads train.
  """
  heads: dict[str, dict[str, float]] = {}
  gens: dict[str, float] = {}
  for k, v in row.items():
    m = re.match(r"train/(node_\d+)/(\w+)_loss$", k)
    if not m:
      continue
    node, name = m.groups()
    if name == "generator":
      gens[node] = v
    elif not name.startswith("generator"):  # other generator_* terms go in neither
      heads.setdefault(node, {})[name] = v
  return heads, gens


def best_by_val(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
  """The server's evaluated round with the highest mean validation accuracy over branches (latest on ties).

  Why: test numbers are reported at the round a user would have picked without looking at the test
  split; ``final`` alone penalises runs that peak early and then overfit (centralised training does).
  """
  scored = []
  for r in rows:
    val = [v for k, v in r.items() if k.startswith("test/server/") and k.endswith("_accuracy_on_val")]
    if val:
      scored.append((sum(val) / len(val), r["round"], r))
  if not scored:
    return None
  _, round_, row = max(scored, key=lambda t: (t[0], t[1]))
  return {"round": round_, **{k: v for k, v in row.items() if k.startswith("test/server/")}}


class RunLog:
  """Appends one row per round; rewrites the CSV from the JSONL so columns stay aligned.

  ``write=False`` (the processes other than 0 of a multi-process run) keeps the rows in memory only:
  such a process makes the same refusal as process 0 and returns the same summary, and process 0
  alone writes the run directory, so there is one set of files. The writer holds the directory's lock
  (``run_lock``: a second run of the same name is refused at once) from here to ``finish``/``close``.
  """

  def __init__(self, run_dir: Path, *, resume: bool, verbose: bool = True, write: bool = True):
    self.run_dir = Path(run_dir)
    self.jsonl = self.run_dir / "metrics.jsonl"
    self.verbose = verbose
    self.write = write
    self.lock: Optional[run_lock.RunLock] = None
    if write:  # locked before anything is read, so a second run never acts on a directory being written
      self.run_dir.mkdir(parents=True, exist_ok=True)
      self.lock = run_lock.acquire(self.run_dir)
    if self.jsonl.exists() and not resume:
      self.close()
      raise RunDirError(
          f"run directory {self.run_dir} already holds a run (metrics.jsonl); pass --resume to "
          "continue it, or choose another experiment name (--set name=...) so nothing is overwritten")
    self.rows: list[dict[str, Any]] = []
    if self.jsonl.exists():
      try:
        self.rows = self._read_rows()
      except RunDirError:
        self.close()
        raise
    self._printed_header = False

  def _read_rows(self) -> list[dict[str, Any]]:
    """The logged rows. A torn LAST line (an append cut short by a kill or a full disk) is set aside to
    ``metrics.jsonl.torn`` with a warning: its round had not been checkpointed (rows are written before the
    round's save), so ``--resume`` runs it again. Any other unreadable line stops the run, naming it."""
    text = self.jsonl.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if not isinstance(row, dict) or "round" not in row:
          raise ValueError("not a round row")
      except ValueError as e:
        if i < len(lines) - 1 or text.endswith("\n"):
          raise RunDirError(f"{self.jsonl} line {i + 1} is corrupt ({e}); it is not the last line, so it is not a "
                            "write cut short: move the run directory aside or fix the line") from e
        aside = self.jsonl.with_name(self.jsonl.name + ".torn")
        if self.write:
          with open(aside, "a") as f:
            f.write(line + "\n")
          self._replace_jsonl(rows)
        print(f"warning: the last line of {self.jsonl} is incomplete (a write cut short); set aside to {aside}; "
              "its round is run again", file=sys.stderr, flush=True)
        break
      rows.append(row)
    return rows

  def close(self) -> None:
    """Releases the run directory's lock (``finish`` does it; idempotent)."""
    if self.lock is not None:
      self.lock.release()

  def truncate_after(self, round_: int) -> None:
    """Drops rows of rounds after the restored checkpoint (they will be recomputed)."""
    self.rows = [r for r in self.rows if r["round"] <= round_]
    if self.write:
      self._rewrite()

  def _rewrite(self) -> None:
    self._replace_jsonl(self.rows)
    self._write_csv()

  @contextlib.contextmanager
  def _writing(self, path: Path, tmp: Optional[Path] = None) -> Iterator[None]:
    """A full disk while writing ``path`` ends the run with one line naming it; ``tmp`` is removed."""
    try:
      yield
    except OSError as e:
      if tmp is not None:
        tmp.unlink(missing_ok=True)
      if not is_disk_full(e):
        raise
      raise DiskFullError(f"disk full while writing {path} ({e.strerror or e}); the rows of earlier rounds and the "
                          "last round checkpoint are kept; free space and run again with --resume") from e

  def _replace_jsonl(self, rows: list[dict[str, Any]]) -> None:
    tmp = self.jsonl.with_suffix(".jsonl.tmp")
    with self._writing(self.jsonl, tmp):
      tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
      tmp.replace(self.jsonl)

  def _write_csv(self) -> None:
    keys: list[str] = []
    for r in self.rows:
      keys += [k for k in r if k not in keys]
    tmp = self.run_dir / "metrics.csv.tmp"
    with self._writing(self.run_dir / "metrics.csv", tmp):
      with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
      tmp.replace(self.run_dir / "metrics.csv")

  def append(self, row: dict[str, Any]) -> None:
    self.rows.append(row)
    if self.write:
      with self._writing(self.jsonl):
        with open(self.jsonl, "a") as f:
          f.write(json.dumps(row) + "\n")
      self._write_csv()
    if self.verbose:
      self._print(row)

  @staticmethod
  def short(row: dict[str, Any]) -> str:
    parts = [f"{k.split('/')[-1].replace('_on_test', '')}={v:.3f}" for k, v in row.items()
             if k.startswith("test/server/") and k.endswith("accuracy_on_test")]
    return " ".join(parts)

  def _print(self, row: dict[str, Any]) -> None:
    """Round table: one line per model (server, nodes), test-split accuracy / centred cosine / nmse."""
    models: dict[str, dict[str, float]] = {}
    for k, v in row.items():
      m = re.match(r"test/(server|node_\d+)/(\w+)_on_test$", k)
      if m:
        models.setdefault(m.group(1), {})[m.group(2)] = v
    losses, gen_losses = train_losses(row)
    if not models:
      parts = []
      if losses:
        parts.append("train loss " + " ".join(f"{n}:{sum(d.values()):.4f}" for n, d in losses.items()))
      if gen_losses:
        parts.append("generator loss " + " ".join(f"{n}:{v:.4f}" for n, v in gen_losses.items()))
      print(f"round {row['round']}: " + ("; ".join(parts) or "no losses"))
      return
    cols = sorted({c for d in models.values() for c in d if c.endswith(("accuracy", "centred_cosine", "nmse"))})
    gen_col = f"{'gen loss':>12}" if gen_losses else ""
    lines = [f"round {row['round']} ({row['round_seconds']:.2f} s)  test split",
             f"  {'model':<8}" + "".join(f"{c:>20}" for c in cols) + f"{'train loss':>12}" + gen_col]
    for name in sorted(models, key=lambda n: (n != "server", int(n.split('_')[1]) if '_' in n else -1)):
      vals = "".join(f"{models[name].get(c, float('nan')):>20.4f}" for c in cols)
      tl = losses.get(name)
      gen = f"{gen_losses.get(name, float('nan')):>12.4f}" if gen_losses else ""
      lines.append(f"  {name:<8}{vals}{(sum(tl.values()) if tl else float('nan')):>12.4f}{gen}")
    print("\n".join(lines))

  def finish(self, cfg, extra: Optional[dict] = None) -> dict[str, Any]:
    """Writes summary.json and plot.png; returns the summary."""
    last_eval = next((r for r in reversed(self.rows) if any(k.startswith("test/") for k in r)), {})
    summary = {"run_dir": str(self.run_dir), "rounds": len(self.rows),
               "final": {k: v for k, v in last_eval.items() if k.startswith("test/server/")},
               **(extra or {})}
    best = best_by_val(self.rows)
    if best is not None:
      summary["best_by_val"] = best
    if not self.write:
      return summary
    try:
      self._finish_files(summary, best)
    finally:
      self.close()
    return summary

  def _finish_files(self, summary: dict[str, Any], best: Optional[dict[str, Any]]) -> None:
    (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
      self.plot(self.run_dir / "plot.png")
    except Exception as e:  # a plot must never lose a finished run
      print(f"warning: plot not written: {e}")
    if self.verbose and summary["final"]:
      print("final (server, test split):")
      for k, v in summary["final"].items():
        if k.endswith("_on_test"):
          print(f"  {k.split('/')[-1]:<40} {v:.4f}")
    if self.verbose and best is not None:
      accs = " ".join(f"{k.split('/')[-1].replace('_on_test', '')}={v:.4f}" for k, v in best.items()
                       if k.endswith("accuracy_on_test"))
      print(f"best round by validation accuracy: {best['round']} (test split: {accs})")

  def plot(self, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for r in self.rows for k in r if re.match(r"test/server/\w+_accuracy_on_test$", k)}):
      pts = [(r["round"], r[key]) for r in self.rows if key in r]
      ax1.plot(*zip(*pts), marker="o", label=key.split("/")[-1].replace("_on_test", " (server)"))
    for key in sorted({k for r in self.rows for k in r if re.match(r"train/node_\d+/\w+_loss$", k)}):
      pts = [(r["round"], r[key]) for r in self.rows if key in r]
      ax2.plot(*zip(*pts), alpha=0.6, linestyle="--" if "/generator" in key else "-",
               label=key.replace("train/", ""))
    ax1.set(xlabel="round", ylabel="nearest-target accuracy (test)", ylim=(0, 1.02))
    ax2.set(xlabel="round", ylabel="train loss (last local epoch)", yscale="log")
    for ax, size in ((ax1, 7), (ax2, 6)):
      if ax.lines:  # a generator-only run has no accuracy curves
        ax.legend(fontsize=size, ncol=1 if ax is ax1 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
