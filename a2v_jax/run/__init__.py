"""One experiment run, from a config to its run directory.

  experiment.py  run_experiment: a training run (trainer) or a generate run (generate), by the config
  trainer.py     train_and_evaluate: prepare data and features -> layout -> init / restore -> the round loop
                 over the stages a config asks for (heads, generators, server, KD, evaluation) -> summary
  rounds.py      the one round loop every training run goes through (progress, timing, log row, checkpoint)
  generate.py    the third step of the reference's pipeline: trained heads + generators, no training
  plan.py        --dry-run: every problem of a config at once, and what the run would do
  log.py         metrics.jsonl / csv / plot / summary of a run directory
  lock.py        one writer per run directory (flock)
  wandb_sink.py  optional mirror of the run log
"""
