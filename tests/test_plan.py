from a2v_jax import config
from a2v_jax.run.plan import print_plan


def test_dry_run_lists_every_problem_at_once(tmp_path, capsys):
  cfg = config.load(None, [f'dataset_root="{tmp_path / "nowhere"}"', f'ast_model="{tmp_path / "no_ast"}"',
                           f't5_model="{tmp_path / "no_t5"}"', f'clip_text_model="{tmp_path / "no_clip"}"'])
  assert print_plan(cfg) == 1
  out = capsys.readouterr().out
  assert "4 problem(s)" in out
  for name in ("nowhere", "no_ast", "no_t5", "no_clip"):
    assert name in out


def test_dry_run_of_pretrained_generators_without_checkpoints(tmp_path, capsys):
  cfg = config.load(None, ["use_pretrained_generators=true", f'generator_checkpoint_dir="{tmp_path}"',
                           f'dataset_root="{tmp_path / "x"}"', f'clip_text_model="{tmp_path / "c"}"',
                           f't5_model="{tmp_path / "t"}"'])
  assert print_plan(cfg) == 1
  out = capsys.readouterr().out
  assert "use_pretrained_generators is set" in out
  assert "backbone ast" not in out  # Run 2 never needs the AST
