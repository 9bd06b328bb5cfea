"""The generator stage: generators of each node's AST features trained (Run 1), restored and drawn from
(Run 2, KD, generate), and their checkpoints.

  training.py    the slot layout (unified / per_class / per_group) and one jit(vmap) over every slot's training
  runs.py        Run 1 / Run 2 / generator-only stages as the trainer calls them; synthetic rows for the nodes
  checkpoint.py  round directories with a manifest, orbax state, and the checks a restore makes
"""
