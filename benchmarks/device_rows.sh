#!/usr/bin/env bash
# Issue #7's accelerator rows in one prepared run, for a lent GPU machine (the `device` tool, ~15 minutes of
# device time per task, a bare machine each time):
#   run(command="bash benchmarks/device_rows.sh", timeout_s=540)
# It uses that machine's own python3 (its image holds jax with CUDA, flax, optax, orbax, chex and torch; nothing
# is installed), runs the README's three studies at accelerator sizes, and leaves each study's scaling.jsonl
# plus one log of the tables under $OUT (or benchmarks/results/device here). A study that fails or runs past
# its share of the time is reported and skipped; the others still run.
#   QUICK=1 bash benchmarks/device_rows.sh     # a small smoke run of the same commands (CPU is fine)
#   PYTHON=.venv/bin/python                    # another interpreter
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/device}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "${QUICK:-0}" = 1 ]; then
  A=10,40; B=2,4; REF=1; ROUNDS=1; LIMIT=240; TOKENS=26
else
  A=1000,10000; B=100,1000; REF=1,4; ROUNDS=3; LIMIT=170; TOKENS=146
fi
LOG="$OUT/device_rows.log"
{
  echo "== $(date -u +%FT%TZ) $(uname -n)"
  "$PY" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__); print(jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} 2>&1 | tee "$LOG"

study() {  # name, then experiments.scaling arguments
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$LIMIT" "$PY" -m experiments.scaling --config experiments/configs/fsdd_tiny.json --rounds "$ROUNDS" \
      --out "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  grep -v -i "warning" "$WORK/$name.log" | tail -n 12 | tee -a "$LOG"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ -f "$WORK/$name/scaling.jsonl" ] && cp "$WORK/$name/scaling.jsonl" "$OUT/$name.jsonl"
}

# (a) many small clients; the torch baseline is the reference's sequential CPU loop on this machine's cores.
study regime_a --clients "$A" --local-steps 2 --batch-size 2 --epochs 1 --baseline torch --yardstick
# (b) fewer, bigger clients; the yardsticks run on the accelerator.
study regime_b --clients "$B" --samples-per-client 40 --batch-size 8 --epochs 1 --tokens "$TOKENS" \
    --baseline torch --yardstick
# The reference's head widths (315 M parameters per client): how many fit, and their round time.
study reference --preset reference --clients "$REF" --local-steps 2 --batch-size 2 --epochs 1 --baseline none

for name in regime_a regime_b reference; do
  [ -f "$WORK/$name/scaling.jsonl" ] && "$PY" -m benchmarks.summarize "$WORK/$name" 2>&1 | tee -a "$LOG"
done
rm -rf "$WORK"
