"""Run 1 / Run 2 / KD end to end on tiny synthetic data: checkpoints, resume, no AST, start-up errors.

One module-scoped generator-only Run 1 feeds the Run 2 tests; heads are compiled in two runs only.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from a2v_jax import config
from a2v_jax import features as features_lib
from a2v_jax.generators import checkpoint as gc
from a2v_jax.config import ConfigError
from a2v_jax.generators import runs as grn
from a2v_jax.generators import training as gt
from a2v_jax.federated import kd as kd_lib
from a2v_jax.models.heads import make_heads
from a2v_jax.run.trainer import RUN_ONCE_COMPILER_OPTIONS, Prepared, start_pretrained, train_and_evaluate
from tests.fakes import synthetic_prepared

HEADS = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
         "num_nodes=3"]
GENS = ["generator_hidden_dim=16", "generator_latent_dim=4", "generator_training_sequence_length=2"]
TRAIN_GENS = ["generator_batch_size=8", "generator_training_epochs=2"]  # Run 1 only (refused where ignored)
RUN1 = ["use_generator=true", "generator_only_mode=true", *TRAIN_GENS]


def _cfg(tmp, name, *extra, gens="gens"):
  return config.load(None, HEADS + GENS + [f'output_dir="{tmp}"', f'name="{name}"',
                                           f'generator_checkpoint_dir="{tmp}/{gens}"', *extra])


def _rows(run_dir):
  return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _forbid_ast(monkeypatch):
  def boom(*a, **k):
    raise AssertionError("Run 2 must never construct the AST")
  monkeypatch.setattr("a2v_jax.backbones.ast.load_ast", boom)


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
  """Run 1 with heads (per-node per-class generators) of 2 rounds on the fake data; Run 2 tests restore it.

  One head branch (cogx: t5) halves the heads' compile time; Run 2 tests train both branches.
  """
  tmp = tmp_path_factory.mktemp("run1")
  prep = synthetic_prepared()
  cfg = _cfg(tmp, "r1", "use_generator=true", "generator_training_mode=true", *TRAIN_GENS, "global_rounds=2", "checkpoint_frequency=5",
             "generator_checkpoint_frequency=1", "eval_gap=0", 'diffusion_type="cogx"')
  summary = train_and_evaluate(cfg, verbose=False, prepared=prep)
  return dict(tmp=tmp, prep=prep, cfg=cfg, summary=summary)


def test_run1_with_heads_logs_and_checkpoints_generators_with_the_heads(run1):
  tmp, cfg = run1["tmp"], run1["cfg"]
  rows = _rows(tmp / "r1")
  assert [r["round"] for r in rows] == [1, 2]
  for i in range(3):
    assert {f"train/node_{i}/{k}" for k in ("t5_loss", "generator_loss", "generator_recon",
                                             "generator_kl", "generator_cos", "generator_num_samples")} <= set(rows[0])
  # (generator learning itself is tested on toy clusters in test_generators.py; two rounds on this fake
  # data are too noisy to require a lower recon in round 2)
  assert all(np.isfinite(r[f"train/node_{i}/generator_recon"]) for r in rows for i in range(3))
  # heads saved at generator_checkpoint_frequency too, so a resume finds both at the same round
  assert gc.scan_rounds(cfg.generators) == ([1, 2], [])
  assert sorted(int(p.name) for p in (tmp / "r1" / "state").iterdir() if p.name.isdigit()) == [1, 2]
  assert (gc.checkpoint_root(cfg.generators) / "latest").read_text().strip() == "round_00002"
  manifest = json.loads((gc.round_dir(cfg.generators, 2) / "manifest.json").read_text())
  assert manifest["extra"]["token_shape"] == [6, 8] and manifest["extra"]["data"]["num_nodes"] == 3
  # generators model standardised features: the scale of every node's train rows (pooled to S=2 tokens)
  scale = grn.FeatureScale.from_extra(manifest["extra"], gc.restore_generators(cfg.generators)[0].spec)
  train = np.concatenate([n["train"] for n in run1["prep"].nodes.nodes])
  pooled = run1["prep"].features[train].reshape(len(train), 2, 3, 8).mean(2)
  np.testing.assert_allclose(scale.mean, pooled.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scale.std, pooled.std(0), rtol=1e-4)
  np.testing.assert_allclose(scale.restore(scale.standardise(pooled)), pooled, rtol=1e-5, atol=1e-6)
  assert manifest["num_slots"] == sum(len(np.unique(run1["prep"].nodes.clipset.labels[n["train"]]))
                                      for n in run1["prep"].nodes.nodes)
  # a fresh Run 1 must not mix its rounds into these
  with pytest.raises(grn.GeneratorRunError, match=r"already holds generator rounds \[1, 2\]"):
    train_and_evaluate(_cfg(tmp, "other", *RUN1, "global_rounds=1"), verbose=False, prepared=run1["prep"])


class _Killed(BaseException):
  """A kill -9 stand-in: not an Exception, so nothing on the way up may swallow it."""


def test_generator_only_run1_resumes_like_a_straight_run(tmp_path, monkeypatch):
  """Killed while saving round 3 (a half-written temporary round left behind), then --resume."""
  prep = synthetic_prepared()
  cfg = _cfg(tmp_path, "r1", *RUN1, "global_rounds=3")
  save = gc.save_generators

  def killed_while_saving_round_3(g, state, round_num, **kw):
    if round_num < 3:
      return save(g, state, round_num, **kw)
    (gc.checkpoint_root(g) / ".round_00003.tmp-dead" / "state").mkdir(parents=True)  # half-written
    raise _Killed()
  monkeypatch.setattr(gc, "save_generators", killed_while_saving_round_3)
  with pytest.raises(_Killed):
    train_and_evaluate(cfg, verbose=False, prepared=prep)
  monkeypatch.setattr(gc, "save_generators", save)
  assert [r["round"] for r in _rows(tmp_path / "r1")] == [1, 2, 3]  # round 3 logged, its save lost
  assert gc.latest_round(cfg.generators) == 2
  # resumed (same config, --resume) == straight 3 rounds
  train_and_evaluate(cfg, resume=True, verbose=False, prepared=prep)
  assert gc.scan_rounds(cfg.generators)[0] == [1, 2, 3]
  train_and_evaluate(_cfg(tmp_path, "straight", *RUN1, "global_rounds=3", gens="gens_straight"), verbose=False,
                     prepared=prep)
  gen_keys = lambda rows: [{k: v for k, v in r.items() if k.startswith("train/")} for r in rows]
  resumed, straight = gen_keys(_rows(tmp_path / "r1")), gen_keys(_rows(tmp_path / "straight"))
  assert len(resumed) == len(straight) == 3 and "train/node_2/generator_loss" in resumed[0]
  assert not any("clip_loss" in k for k in resumed[0])  # no heads in generator-only mode
  for a, b in zip(resumed, straight):
    assert a == pytest.approx(b, rel=1e-5)
  a, _ = gc.restore_generators(_cfg(tmp_path, "r1", *RUN1).generators)
  b, _ = gc.restore_generators(_cfg(tmp_path, "x", *RUN1, gens="gens_straight").generators)
  assert a.layout.shared and a.layout.num_slots == 4  # one shared generator per class
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.params, b.params)


def test_run2_trains_heads_on_synthetic_features_with_kd_and_no_ast(run1, tmp_path, monkeypatch):
  _forbid_ast(monkeypatch)
  prep = run1["prep"]
  cfg = _cfg(run1["tmp"], "r2", "use_pretrained_generators=true", "train_on_real_features=false",
             'adapter_aggregation_mode="kd"', "kd_training_epochs=3", "kd_samples_per_class=8", "global_rounds=2",
             "local_epochs=3", "eval_gap=0")
  cfg = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, output_dir=str(tmp_path)))
  staged, gens = start_pretrained(cfg, prep, verbose=False)
  n_real = len(prep.nodes.clipset)
  counts = grn.synthetic_counts(cfg, prep.nodes)
  for n, node in enumerate(staged.nodes.nodes):  # every train row is synthetic, of the node's own classes
    assert node["train"].min() >= n_real
    np.testing.assert_array_equal(np.bincount(staged.nodes.clipset.labels[node["train"]], minlength=4), counts[n])
    np.testing.assert_array_equal(node["test"], prep.nodes.nodes[n]["test"])
  assert staged.features.shape == (n_real + counts.sum(), 6, 8)
  np.testing.assert_array_equal(staged.features[:n_real], prep.features)
  assert gens.server_row == {"server/synthetic_samples_total": int(counts.sum()),
                             "server/synthetic_samples_classes": 4}
  again = grn.redraw_synthetic(cfg, gens.state, gens.scale, gens.counts, gens.length, 2)  # round 2's rows
  assert again.shape == staged.features[n_real:].shape and not np.allclose(again, staged.features[n_real:])
  summary = train_and_evaluate(cfg, verbose=False, prepared=prep)
  rows = _rows(tmp_path / "r2")
  assert summary["generator_round"] == 2 and summary["real_evaluation"] and summary["compiled_round_programs"] == 1
  assert rows[-1]["server/synthetic_samples_total"] == counts.sum() and rows[-1]["server/kd_samples"] == 4 * 8
  # KD of round 2, recomputed independently from the saved state: the start is the clients' mean, the
  # teacher the mean of the clients' outputs on that round's generator features, the server the result
  mgr = ocp.CheckpointManager(tmp_path / "r2" / "state", item_names=("state", "meta"))
  state = mgr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mgr.close()
  # numpy: slicing / averaging restored jax arrays eagerly would compile one program per leaf shape
  clients, server = jax.tree.map(np.asarray, (state["clients"]["params"], state["server"]["params"]))
  x, mask = grn.kd_features(gens.state, gens.scale, jax.random.fold_in(grn.run_key(cfg, grn.KD_SALT), 2), 8, 6, 4)
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  predict = jax.jit(lambda p, x: heads.apply({"params": p}, x))
  outs = [predict(jax.tree.map(lambda a: a[c], clients), x) for c in range(3)]
  mean = jax.tree.map(lambda a: a.mean(0), clients)
  for b in ("clip", "t5"):
    teacher = np.mean([o[b] for o in outs], axis=0)
    err = lambda p: float(np.mean(np.square(np.asarray(predict(p, x)[b]) - teacher)))
    assert err(mean) == pytest.approx(rows[-1][f"server/kd_{b}_loss_start"], rel=1e-3, abs=1e-9)
    assert err(server) == pytest.approx(rows[-1][f"server/kd_{b}_loss_end"], rel=1e-3, abs=1e-9)
    assert all(r[f"server/kd_{b}_loss_end"] <= r[f"server/kd_{b}_loss_start"] for r in rows)
    loss = lambda r: sum(r[f"train/node_{i}/{b}_loss"] for i in range(3))
    assert loss(rows[1]) < loss(rows[0])


def test_kd_distils_both_branches_towards_the_mean_teacher():
  cfg = config.load(None, HEADS + ["kd_training_epochs=30", "kd_learning_rate=0.01", 'adapter_aggregation_mode="kd"',
                                   "use_pretrained_generators=true"])
  heads = make_heads(cfg, {"clip": (4,), "t5": (3, 6)})
  apply_fn = lambda p, x: heads.apply({"params": p}, x)
  predict = jax.jit(apply_fn)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6, 8)), jnp.float32)
  params = jax.jit(lambda k: heads.init(k, x[:1])["params"]).lower(jax.random.key(1)).compile(
      compiler_options=RUN_ONCE_COMPILER_OPTIONS)(jax.random.key(1))
  # three clients: the same init, perturbed differently
  clients = jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.normal(size=(3,) + a.shape).astype(np.float32), params)
  weights = np.array([1.0, 1.0, 0.0], np.float32)  # client 2 is padding
  kd = kd_lib.make_kd(cfg, apply_fn, 4)
  teacher = kd.teacher(clients, weights, x)
  per_client = [predict(jax.tree.map(lambda a: a[c], clients), x) for c in range(2)]
  for b in ("clip", "t5"):  # independent mean of the two real clients' outputs
    np.testing.assert_allclose(teacher[b], (per_client[0][b] + per_client[1][b]) / 2, rtol=1e-4, atol=1e-5)
  student = jax.tree.map(lambda a: (a[0] + a[1]) / 2, clients)  # the round's FedAvg mean
  mask = (np.arange(16) < 14).astype(np.float32)
  out, metrics = kd.distill(student, x, mask, teacher, jax.random.key(2))
  kd.distill(student, x, mask, teacher, jax.random.key(3))
  assert kd.distill._cache_size() == 1  # a second round compiles nothing
  before, after = predict(student, x), predict(out, x)
  for b in ("clip", "t5"):
    changed = jax.tree.map(lambda p, q: bool(np.any(p != np.asarray(q))), student[b], out[b])
    assert all(jax.tree.leaves(changed)) and metrics[f"kd_{b}_kept"] == 1, b
    err = lambda y: float(np.mean(np.square(np.asarray(y[b])[:14] - np.asarray(teacher[b])[:14])))
    assert err(after) < 0.3 * err(before), (b, err(before), err(after))
    assert float(metrics[f"kd_{b}_loss_start"]) == pytest.approx(err(before), rel=1e-4)
    assert float(metrics[f"kd_{b}_loss_end"]) == pytest.approx(err(after), rel=1e-4)
    assert metrics[f"kd_{b}_epoch_loss"][-1] < metrics[f"kd_{b}_epoch_loss"][0]


def test_prepare_for_run2_reads_the_run1_cache_and_never_builds_the_ast(tmp_path, monkeypatch):
  """Real FSDD listing, a Run-1-recorded feature cache, no AST directory, no text encoder."""
  _forbid_ast(monkeypatch)
  common = [f'tiny_dir="{tmp_path}/no_backbones"', f'cache_dir="{tmp_path}/cache"', 'selected_classes=["zero","one"]',
            "num_nodes=5"]
  cfg1 = _cfg(tmp_path, "r1", *RUN1, *common, "global_rounds=1")
  from a2v_jax.data.nodes import build_nodes
  nodes = build_nodes(cfg1)
  cache = tmp_path / "cache" / "ast_fsdd_test"
  cache.mkdir(parents=True)
  feats = np.random.default_rng(0).normal(size=(len(nodes.clipset), 6, 8)).astype(np.float32)
  np.save(cache / "features.npy", feats)
  fe = cfg1.features
  (cache / "manifest.json").write_text(json.dumps({
      "clips": features_lib.clips_digest(nodes.clipset), "clip_ids": [c.clip_id for c in nodes.clipset.clips],
      "sample_rate": fe.sample_rate, "mel": fe.num_mel_bins, "max_length": fe.max_length,
      "cls": fe.use_cls_token_only, "pooled": fe.pooled_tokens, "dtype": fe.cache_dtype, "long": fe.long_clips}))
  prep1 = Prepared(nodes, np.load(cache / "features.npy", mmap_mode="r"), {})
  run = grn.start_run1(cfg1, prep1, resume_round=None, resume=False)  # what Run 1 writes (untrained)
  lay = run.state.layout
  seen = np.array([[lay.class_to_key[c] == k for c in range(2)] for k in lay.slot_key])
  gc.save_generators(cfg1.generators, run.state.replace(seen=jnp.asarray(seen)), 1,
                     extra=grn.run1_extra(cfg1, prep1, run))
  # One t5 latent per T5 target token (t5_latents, checked against the targets).
  targets = {"clip": np.ones((2, 4), np.float32), "t5": np.ones((2, cfg1.heads.t5_latents, 6), np.float32)}
  monkeypatch.setattr(features_lib, "text_targets", lambda *a, **k: targets)
  cfg2 = _cfg(tmp_path, "r2", "use_pretrained_generators=true", *common)
  ast = tmp_path / "no_backbones" / "ast"  # AST weights present: the regular lookup (cache_only) misses first
  ast.mkdir(parents=True)
  (ast / "config.json").write_text("{}")
  staged, _ = start_pretrained(cfg2, None, verbose=False)
  n = len(nodes.clipset)
  np.testing.assert_array_equal(staged.features[:n], feats)
  assert staged.features.shape[0] > n and staged.targets is targets
  # without any cache: synthetic only, no real split to evaluate on
  shutil.rmtree(cache)
  staged, gens = start_pretrained(cfg2, None, verbose=False)
  assert staged.features.shape == (gens.server_row["server/synthetic_samples_total"], 6, 8)
  assert all(len(node["test"]) == 0 and len(node["val"]) == 0 for node in staged.nodes.nodes)
  assert {c.path for c in staged.nodes.clipset.clips} == {"<synthetic>"}


def test_run2_startup_errors_name_found_and_expected(run1, tmp_path):
  prep = run1["prep"]
  run2 = lambda tmp, *extra, p=prep: train_and_evaluate(
      _cfg(tmp, "r2", "use_pretrained_generators=true", *extra), verbose=False, prepared=p)
  with pytest.raises(gc.GeneratorCheckpointError, match="no generator checkpoints at"):
    run2(tmp_path)
  assert not (tmp_path / "r2").exists()  # refused before the run directory was made
  shutil.copytree(run1["tmp"] / "gens", tmp_path / "gens")
  with pytest.raises(gc.GeneratorCheckpointError, match="num_classes: checkpoint has 4, expected 3"):
    run2(tmp_path, p=synthetic_prepared(classes=3))
  with pytest.raises(gc.GeneratorCheckpointError, match="feature_dim: checkpoint has 8, expected 10"):
    run2(tmp_path, p=synthetic_prepared(dim=10))
  with pytest.raises(gc.GeneratorCheckpointError, match="hidden_dim: checkpoint has 16, expected 32"):
    run2(tmp_path, "generator_hidden_dim=32")
  # generators of 6-token features in a run whose features have 9: refused unless resampling is asked for
  nine = dataclasses.replace(prep, features=np.concatenate([prep.features, prep.features[:, :3]], axis=1))
  with pytest.raises(gc.GeneratorCheckpointError, match=r"trained on features of 6 tokens, this run's cached "
                                                       r"features have 9 .*'generator_output_sequence_length': 9"):
    run2(tmp_path, p=nine)
  train_and_evaluate(_cfg(tmp_path, "r2_resampled", "use_pretrained_generators=true", "global_rounds=1",
                          "generator_output_sequence_length=9"), verbose=False, prepared=nine)
  with pytest.raises(gc.GeneratorCheckpointError, match=r"nodes: checkpoint has 3, expected 2"):
    run2(tmp_path, p=synthetic_prepared(num_nodes=2))
  with pytest.raises(gc.GeneratorCheckpointError, match=r"(?s)other data.*node_split_seed: checkpoint 42 != config 7"):
    run2(tmp_path, "node_split_seed=7")
  root = tmp_path / "gens" / "generator"
  (root / "round_00002" / "manifest.json").write_text("{corrupt")
  shutil.rmtree(root / "round_00001" / "state")
  with pytest.raises(gc.GeneratorCheckpointError, match="no complete round") as e:
    run2(tmp_path)
  assert "round_00002/manifest.json is corrupt" in str(e.value) and "partial round directory" in str(e.value)
  with pytest.raises(ConfigError, match="--resume"):
    config.load(None, ["use_pretrained_generators=true", "generator_training_mode=true", "use_generator=true"])


def test_run2_refuses_checkpoints_of_other_class_names(run1, tmp_path):
  shutil.copytree(run1["tmp"] / "gens", tmp_path / "gens")
  prep = run1["prep"]
  cs = prep.nodes.clipset
  renamed = dataclasses.replace(prep, nodes=dataclasses.replace(
      prep.nodes, clipset=dataclasses.replace(cs, class_names=("c0", "c1", "c3", "c2"))))
  found, expected = r"\['c0', 'c1', 'c2', 'c3'\]", r"\['c0', 'c1', 'c3', 'c2'\]"
  with pytest.raises(gc.GeneratorCheckpointError, match=f"class_names: checkpoint has {found}, expected {expected}"):
    train_and_evaluate(_cfg(tmp_path, "r2", "use_pretrained_generators=true"), verbose=False, prepared=renamed)
  assert not (tmp_path / "r2").exists()


def test_cli_start_up_errors_exit_2_with_one_message(tmp_path, capsys, monkeypatch):
  """Run 2 on an empty checkpoint directory: exit status 2, what was expected on stderr, no traceback."""
  from experiments import run as cli
  (tmp_path / "gens" / "fsdd_vae").mkdir(parents=True)
  config_file = Path(__file__).parents[1] / "experiments" / "configs" / "fsdd_run2_from_generators.json"
  argv = ["--config", str(config_file), "--quiet",
          "--set", f'experiment.output_dir="{tmp_path}/runs"', "--set", f'generator_checkpoint_dir="{tmp_path}/gens"',
          "--set", 'generator_checkpoint_base_name="fsdd_vae"']
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("generator checkpoint error: no complete round under ") and "Traceback" not in err
  assert "nothing (an empty directory)" in err and "Expected round_NNNNN/ directories" in err
  assert "granularity='per_class'" in err and "classes=['zero', 'one', 'two'" in err
  assert not (tmp_path / "runs").exists()
  # a config error: same status, labelled as such
  assert cli.main(["--quiet", "--set", "use_pretrained_generators=true", "--set", "generator_only_mode=true"]) == 2
  assert capsys.readouterr().err.startswith("config error: ")
  # anything unexpected is a bug and keeps its traceback
  def bug(*a, **k):
    raise ZeroDivisionError("a bug")
  monkeypatch.setattr("a2v_jax.run.trainer.train_and_evaluate", bug)
  with pytest.raises(ZeroDivisionError):
    cli.main(["--quiet", "--set", f'output_dir="{tmp_path}/runs"'])


def test_printed_train_loss_excludes_generator_metrics(tmp_path, capsys):
  from a2v_jax.run.log import RunLog
  log = RunLog(tmp_path / "run", resume=False, verbose=True)
  common = {"train/node_0/clip_loss": 0.25, "train/node_0/t5_loss": 0.5, "train/node_0/generator_loss": 40.0,
            "train/node_0/generator_recon": 30.0, "train/node_0/generator_num_samples": 12}
  log.append({"round": 1, "round_seconds": 1.0, **common})
  assert capsys.readouterr().out.strip() == "round 1: train loss node_0:0.7500; generator loss node_0:40.0000"
  log.append({"round": 2, "round_seconds": 1.0, **common, "test/server/clip_accuracy_on_test": 0.5,
              "test/node_0/clip_accuracy_on_test": 0.25})
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].split()[-4:] == ["train", "loss", "gen", "loss"]
  node = next(l for l in lines if l.strip().startswith("node_0")).split()
  assert node[1:] == ["0.2500", "0.7500", "40.0000"]  # accuracy, heads' loss, generator loss
  log.append({"round": 3, "round_seconds": 1.0, "train/node_0/generator_loss": 2.0})  # generator-only run
  assert capsys.readouterr().out.strip() == "round 3: generator loss node_0:2.0000"


def test_ast_features_cache_only_reads_the_cache_or_names_the_missing_one(tmp_path, monkeypatch):
  _forbid_ast(monkeypatch)
  from a2v_jax.data.registry import read_dataset
  cfg = config.load(None, [f'cache_dir="{tmp_path}/cache"', 'selected_classes=["zero"]'])
  clipset = read_dataset(cfg.data)
  ast = tmp_path / "ast"
  ast.mkdir()
  (ast / "config.json").write_text("{}")
  get = lambda: features_lib.ast_features(cfg, clipset, ast_dir=ast, verbose=False, cache_only=True)
  with pytest.raises(features_lib.FeatureCacheMiss, match="cache_only forbids constructing the AST") as e:
    get()
  path = e.value.path
  assert str(path) in str(e.value) and path.parent == tmp_path / "cache" and not path.exists()
  feats = np.random.default_rng(0).normal(size=(len(clipset), 3, 4)).astype(np.float32)
  path.mkdir(parents=True)
  np.save(path / "features.npy", feats)
  (path / "manifest.json").write_text("{}")
  np.testing.assert_array_equal(get(), feats)
  (ast / "config.json").write_text('{"hidden_size": 8}')  # other AST weights: another key, a miss again
  with pytest.raises(features_lib.FeatureCacheMiss):
    get()


def test_text_conditioned_cvae_trains_on_the_class_text_embeddings_and_checks_them_on_restore(tmp_path):
  """``generator_condition: text``: the condition table is each class's unit-norm CLIP text target; a Run 2
  whose text embeddings differ (another prompt or text encoder), or that asks for one-hot conditions, stops
  before its run directory exists."""
  prep = synthetic_prepared()
  text = ['generator_type="cvae"', 'generator_condition="text"']
  train_and_evaluate(_cfg(tmp_path, "r1", *RUN1, *text, "global_rounds=1"), verbose=False, prepared=prep)
  state, _ = gc.restore_generators(_cfg(tmp_path, "x", *RUN1, *text).generators)
  clip = np.asarray(prep.targets["clip"], np.float64)
  np.testing.assert_allclose(state.cond_table, clip / np.linalg.norm(clip, axis=1, keepdims=True), rtol=1e-6)
  assert state.spec.condition == "text" and state.spec.cond_dim == clip.shape[1]
  # The decoder reads the condition: two classes' text embeddings decode the same latent to different samples.
  vae = gt.models(state.spec)["vae"]
  slot0 = jax.tree.map(lambda x: x[0], state.params)
  z = jax.random.normal(jax.random.key(0), (1, state.spec.latent_dim))
  decode = lambda c: np.asarray(vae.apply(slot0, z, state.cond_table[c][None], method=vae.decode))
  assert np.abs(decode(0) - decode(1)).max() > 1e-3
  run2 = lambda p, *extra: train_and_evaluate(
      _cfg(tmp_path, "r2", "use_pretrained_generators=true", 'generator_type="cvae"', *extra), verbose=False,
      prepared=p)
  moved = dict(prep.targets, clip=np.array(prep.targets["clip"]))
  moved["clip"][2] += 0.5
  with pytest.raises(gc.GeneratorCheckpointError, match=r"conditioned on other text embeddings for classes \['c2'\]"):
    run2(dataclasses.replace(prep, targets=moved), 'generator_condition="text"')
  with pytest.raises(gc.GeneratorCheckpointError, match="condition: checkpoint has 'text', expected 'onehot'"):
    run2(prep, 'generator_condition="onehot"')
  assert not (tmp_path / "r2").exists()
  summary = run2(prep, 'generator_condition="text"', "global_rounds=1")  # the same texts: it runs
  assert 0.0 <= summary["final"]["test/server/clip_accuracy_on_test"] <= 1.0
