"""python -m experiments.run --config experiments/configs/fsdd_tiny.json [--set k=v ...] [--resume] [--dry-run]

Several processes (hosts) train one run together when each is started with ``--coordinator``:
``--coordinator HOST:PORT --num-processes N --process-id I`` (process 0's address, the same for all), or
``--coordinator auto`` under SLURM / Open MPI / on a TPU pod slice (JAX reads the job's settings).
"""

from __future__ import annotations

import argparse
import sys

from experiments.cli_errors import is_project_error, non_negative_int, positive_float, positive_int, report


def _join(args: argparse.Namespace) -> None:
  """Joins the multi-process job that ``--coordinator`` names, before any JAX computation.

  Raises:
    DistributedInitError: a process did not arrive within ``--init-timeout`` (never a hang), an
      unusable address, or ``auto`` outside a cluster JAX recognises.
  """
  from a2v_jax.federated import distributed
  auto = args.coordinator == "auto"
  try:
    distributed.initialize(None if auto else args.coordinator, args.num_processes, args.process_id,
                           timeout_s=args.init_timeout)
  except ValueError as e:  # a malformed address or id, or (auto) no cluster detected
    hint = (" (--coordinator auto found no SLURM / Open MPI / TPU pod settings; give --coordinator HOST:PORT "
            "--num-processes N --process-id I)") if auto else ""
    raise distributed.DistributedInitError(f"cannot join the job: {e}{hint}") from e


def main(argv=None) -> int:
  """Runs the CLI; returns the exit status (0 done, 2 refused or stopped with a stated reason).

  Start-up problems (config, data, backbones, missing / partial / corrupt / mismatched checkpoints, an
  existing run directory, one another run is writing), a run stopped on purpose (non-finite loss) and a
  full disk print one message on stderr and return 2, without a traceback (``experiments.cli_errors``):
  the message is the whole story. SIGTERM / SIGINT during the rounds finish and checkpoint the round in flight,
  then the run ends with "stopped by SIGTERM at round R; ... --resume continues" and status 143 (SIGTERM) or
  130 (SIGINT), every process of a multi-process job at the same round. Unexpected exceptions raise.
  In a multi-process run (``--coordinator``) both end the process at once (``_leave_job``: status 2, or
  1 after the traceback), and a finished run leaves the job together with its peers.
  """
  p = argparse.ArgumentParser(description="Federated audio-to-visual training (a2v-jax).")
  p.add_argument("--config", "-c", help="JSON config (ours, or reference-sectioned)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config key (JSON value), e.g. --set global_rounds=3")
  p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
  p.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, exit")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--coordinator", metavar="HOST:PORT|auto",
                 help="train with several processes (hosts): process 0's address, the same for every process "
                      "(its port and the next one are used), or 'auto' under SLURM / Open MPI / on a TPU pod")
  p.add_argument("--num-processes", type=positive_int, metavar="N", help="processes in the job (with --coordinator HOST:PORT)")
  p.add_argument("--process-id", type=non_negative_int, metavar="I", help="this process, 0..N-1 (with --coordinator HOST:PORT)")
  p.add_argument("--init-timeout", type=positive_float, default=120.0, metavar="SECONDS",
                 help="how long the processes wait for each other at start-up (default 120)")
  args = p.parse_args(argv)
  if args.coordinator not in (None, "auto") and (args.num_processes is None or args.process_id is None):
    p.error("--coordinator HOST:PORT needs --num-processes and --process-id")
  if args.coordinator is None and (args.num_processes is not None or args.process_id is not None):
    p.error("--num-processes and --process-id need --coordinator")
  joined = False

  from a2v_jax import config as config_lib
  from a2v_jax.reference.config import load_config
  try:
    cfg = load_config(args.config, args.overrides)
    if args.coordinator is not None and not args.dry_run:  # a dry run checks this host alone
      _join(args)
      joined = True
    if not args.quiet and (not joined or _process_index() == 0):
      print("resolved config:\n" + config_lib.dumps(cfg))
    if args.dry_run:
      from a2v_jax.run.plan import print_plan
      return print_plan(cfg)
    from a2v_jax.run.experiment import run_experiment
    run_experiment(cfg, resume=args.resume, verbose=not args.quiet)
  except KeyboardInterrupt:
    sys.stdout.flush()
    print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
    return 130
  except Exception as e:
    if not is_project_error(e):  # a bug: its traceback
      if not joined:
        raise
      import traceback
      traceback.print_exc()
      _leave_job(1)
    status = report(e)
    if joined:
      _leave_job(status)
    return status
  if joined:
    import jax
    jax.distributed.shutdown()  # a barrier: process 0's coordinator outlives every peer's last step
  return 0


def _process_index() -> int:
  import jax
  return jax.process_index()


def _leave_job(status: int) -> None:
  """Exits now with ``status``, skipping JAX's exit-time shutdown.

  Why: that shutdown is a barrier of every process; a peer that did not stop with the same error is
  blocked in a collective and would hold this process there for minutes. Leaving at once lets JAX's
  heartbeat stop the peers instead (``distributed.initialize``'s ``heartbeat_timeout_s``).
  """
  import os
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


if __name__ == "__main__":
  sys.exit(main())
