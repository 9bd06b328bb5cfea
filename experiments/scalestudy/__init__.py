"""The scaling study's parts, one job per module (``experiments.scaling`` is the CLI).

  workload.py  what each client holds and does; synthetic cached features; FLOP counts
  runners.py   the jitted JAX round, the sequential torch reference and the matmul yardstick
  timing.py    interleaved timing of the runners per client count; the largest count that fits
  report.py    CSV / JSONL / PNG outputs and the printed table
"""

import os

# torch's OpenMP threads spin-wait between parallel regions by default; on a shared 2-core machine (other
# processes, XLA's own pool) the spinning starves the working threads and made the torch baseline 4-5x
# slower in our measurements. Passive waiting is set (before torch is imported) so that the baseline is not
# handicapped.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
