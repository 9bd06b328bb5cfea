"""The generate run (the reference's third step): heads + generators restored, no training, embeddings out.

One module-scoped pipeline on tiny fake data: a generator-only Run 1, a one-round heads run, a generate
run; the tests recompute its embeddings independently and check the refusals write nothing.
"""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from a2v_jax import config
from a2v_jax.render import embeddings_io as eio
from a2v_jax.run import generate as gen_lib
from a2v_jax.generators import checkpoint as gc
from a2v_jax.backbones.paths import TINY_CLIP_DIM, TINY_T5_DIM
from a2v_jax.generators import runs as grn
from a2v_jax.models.heads import make_heads
from a2v_jax.run.log import RunDirError
from a2v_jax.run.experiment import run_experiment as train_and_evaluate
from tests.fakes import synthetic_prepared

HEADS = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
         "num_nodes=3"]
GENS = ["generator_hidden_dim=16", "generator_latent_dim=4", "generator_training_sequence_length=2"]
TRAIN_GENS = ["generator_batch_size=8", "generator_training_epochs=2"]  # Run 1 only (refused where ignored)
PER_CLASS = 3


def _prep(**kw):
  # the tiny FLUX renderer's widths, so the heads' outputs can be rendered
  return synthetic_prepared(clip=TINY_CLIP_DIM, t5=(3, TINY_T5_DIM), **kw)


def _gen_cfg(pipe, out, name, *extra):
  return config.load(None, HEADS + GENS + [
      f'output_dir="{out}"', f'name="{name}"', f'generator_checkpoint_dir="{pipe}/gens"',
      "use_pretrained_generators=true", f'adapter_load_checkpoint="{pipe}/heads"',
      f'synthetic_samples_per_class="{PER_CLASS}"', f'tiny_dir="{pipe}/tiny"', *extra])


def _listing(d):
  return sorted((str(p.relative_to(d)), p.stat().st_mtime_ns) for p in Path(d).rglob("*"))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  """Step 1 (generators) and step 2 (heads with a checkpoint), then step 3 (generate, embeddings only)."""
  tmp = tmp_path_factory.mktemp("pipe")
  prep = _prep()
  common = HEADS + GENS + [f'output_dir="{tmp}"', f'generator_checkpoint_dir="{tmp}/gens"']
  train_and_evaluate(config.load(None, common + ['name="run1"', "use_generator=true", "generator_only_mode=true",
                                                 *TRAIN_GENS, "global_rounds=1"]), verbose=False, prepared=prep)
  train_and_evaluate(config.load(None, common + ['name="heads"', "global_rounds=1", "eval_gap=0"]),
                     verbose=False, prepared=prep)
  heads_before = _listing(tmp / "heads")
  cfg = _gen_cfg(tmp, tmp, "gen")
  summary = train_and_evaluate(cfg, verbose=False, prepared=prep)  # run_experiment dispatches to generate
  return dict(tmp=tmp, prep=prep, cfg=cfg, summary=summary, heads_before=heads_before)


def test_generate_embeddings_are_the_heads_on_the_synthetic_draw(pipe):
  tmp, prep, cfg = pipe["tmp"], pipe["prep"], pipe["cfg"]
  names = prep.nodes.clipset.class_names
  # independently: the checkpoint's params (orbax alone), the generators, the same key, heads.apply
  mgr = ocp.CheckpointManager((tmp / "heads" / "state").absolute(), item_names=("state", "meta"))
  assert mgr.latest_step() == 1
  state = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mgr.close()
  server, clients = jax.tree.map(np.asarray, (state["server"]["params"], state["clients"]["params"]))
  gens, _, extra = grn.restore_pretrained(cfg, prep.nodes)
  scale = grn.FeatureScale.from_extra(extra, gens.spec)
  labels = prep.nodes.clipset.labels
  counts = np.zeros((3, 4), np.int64)  # PER_CLASS for each class a node trains on
  for n, node in enumerate(prep.nodes.nodes):
    counts[n, np.unique(labels[node["train"]])] = PER_CLASS
  np.testing.assert_array_equal(grn.synthetic_counts(cfg, prep.nodes), counts)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.experiment.seed), gen_lib.GENERATE_SALT)
  x, y, valid = grn.draw(gens, scale, key, counts, prep.features.shape[1])
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  apply = jax.jit(lambda p, xs: heads.apply({"params": p}, xs))  # whole arrays: no chunks, no padding
  emb_dir = tmp / "gen" / "embeddings"
  assert sorted(p.name for p in emb_dir.iterdir()) == [
      "node_0_embeddings_r1.safetensors", "node_1_embeddings_r1.safetensors", "node_2_embeddings_r1.safetensors",
      "server_embeddings_r1.safetensors"]
  for n in range(3):
    ef = eio.load_embeddings(emb_dir / f"node_{n}_embeddings_r1.safetensors")
    assert (ef.node, ef.round, ef.diffusion_type, ef.config_hash) == (n, 1, "flux", cfg.hash())
    assert set(ef.splits) == {"synthetic"} and len(set(ef.sample_ids)) == len(ef)
    per_class = np.bincount([names.index(c) for c in ef.class_names], minlength=4)
    np.testing.assert_array_equal(per_class, counts[n])
    want = apply(jax.tree.map(lambda a: a[n], clients), x[n][valid[n]])
    assert ef.embeddings["clip"].shape == (counts[n].sum(), TINY_CLIP_DIM)
    assert ef.embeddings["t5"].shape == (counts[n].sum(), 3, TINY_T5_DIM)
    for b in ("clip", "t5"):
      np.testing.assert_allclose(ef.embeddings[b], want[b], rtol=1e-5, atol=1e-6)
  ef = eio.load_embeddings(emb_dir / "server_embeddings_r1.safetensors")
  assert ef.node == "server" and len(ef) == counts.sum()
  np.testing.assert_array_equal(np.bincount([names.index(c) for c in ef.class_names], minlength=4), counts.sum(0))
  want = apply(server, x[valid])  # every node's rows, node-major
  for b in ("clip", "t5"):
    np.testing.assert_allclose(ef.embeddings[b], want[b], rtol=1e-5, atol=1e-6)
  s = pipe["summary"]
  assert s["synthetic_samples_total"] == counts.sum() and s["heads_round"] == 1 and s["generator_round"] == 1
  assert s["images"] == 0 and (tmp / "gen" / "config.json").is_file() and (tmp / "gen" / "summary.json").is_file()
  assert not (tmp / "gen" / "images").exists()  # no output switch asked for images
  assert _listing(tmp / "heads") == pipe["heads_before"]  # the heads run is only read


def test_a_second_generate_run_never_overwrites_the_first(pipe):
  tmp, prep, cfg = pipe["tmp"], pipe["prep"], pipe["cfg"]
  before = _listing(tmp / "gen")
  with pytest.raises(RunDirError, match="already holds a run"):
    train_and_evaluate(cfg, verbose=False, prepared=prep)
  with pytest.raises(RunDirError, match="finished run: nothing to resume"):
    train_and_evaluate(cfg, resume=True, verbose=False, prepared=prep)
  assert _listing(tmp / "gen") == before
  # another name sharing an embeddings folder with the first run's files: refused, nothing written
  shared = f'embeddings_checkpoint_dir="{tmp}/gen/embeddings"'
  with pytest.raises(RunDirError, match="exist already"):
    train_and_evaluate(_gen_cfg(tmp, tmp, "gen_shared", shared), verbose=False, prepared=prep)
  assert not (tmp / "gen_shared").exists() and _listing(tmp / "gen") == before


def test_refusals_name_what_differs_and_write_nothing(pipe, tmp_path):
  tmp, prep = pipe["tmp"], pipe["prep"]
  run = lambda *extra, p=prep: train_and_evaluate(_gen_cfg(tmp, tmp_path, "g", *extra), verbose=False, prepared=p)
  with pytest.raises(gen_lib.GenerateError, match="no run directory at .*nope.*run directories in .*'heads'"):
    run(f'adapter_load_checkpoint="{tmp}/nope"')
  with pytest.raises(gen_lib.GenerateError, match=r"no complete heads checkpoint \(generator_only_mode"):
    run(f'adapter_load_checkpoint="{tmp}/run1"')  # Run 1's run directory: config.json, no heads
  with pytest.raises(gen_lib.GenerateError, match=r"(?s)other widths.*heads\.clip_adapter_hidden: checkpoint "
                     r"\(8,\) != config \(16,\).*heads\.map_heads: checkpoint 2 != config 4"):
    run("clip_adapter_hidden=[16]", "map_heads=4")
  # the same config, text encoders of another width: caught on the checkpoint's array shapes
  with pytest.raises(gen_lib.GenerateError, match=r"other parameter shapes(?s:.*)\['server'\]\.params\['clip'\]"
                     r"\['adapter'\]\['Dense_1'\]\['bias'\]: checkpoint \[32\] != expected \[6\]"):
    run(p=synthetic_prepared(clip=6, t5=(3, TINY_T5_DIM)))
  with pytest.raises(gc.GeneratorCheckpointError, match="hidden_dim: checkpoint has 16, expected 32"):
    run("generator_hidden_dim=32")
  assert not (tmp_path / "g").exists()
  assert not any(tmp_path.iterdir())


def test_resume_redoes_an_unfinished_generate_run_with_rendered_images(pipe, tmp_path):
  """Images when asked (every sample of the server file, the offline renderer); killed before its summary,
  --resume re-does it bit for bit."""
  tmp, prep = pipe["tmp"], pipe["prep"]
  cfg = _gen_cfg(tmp, tmp_path, "g", "generate_global_images_frequency=1", "num_inference_steps=1",
                 "guidance_scale=0.0")
  s1 = train_and_evaluate(cfg, verbose=False, prepared=prep)
  n = s1["synthetic_samples_total"]
  images = tmp_path / "g" / "images" / "server_embeddings_r1"
  assert s1["images"] == n and len(list(images.glob("server_r1_*.png"))) == n
  assert set(s1["final"]) == {f"test/server/image_{k}" for k in ("accuracy", "balanced_accuracy", "f1_score")}
  emb = tmp_path / "g" / "embeddings"
  tensors = lambda: {p.name: dict(eio.load_embeddings(p).embeddings) for p in sorted(emb.iterdir())}
  first = tensors()
  (tmp_path / "g" / "summary.json").unlink()  # killed before the end
  s2 = train_and_evaluate(cfg, resume=True, verbose=False, prepared=prep)
  again = tensors()
  assert set(first) == set(again) == {"server_embeddings_r1.safetensors"} | {
      f"node_{i}_embeddings_r1.safetensors" for i in range(3)}
  for name in first:  # the same draw, the same heads (the headers' timestamps may differ)
    for b in ("clip", "t5"):
      np.testing.assert_array_equal(first[name][b], again[name][b])
  assert s2["images"] == n and (tmp_path / "g" / "summary.json").is_file()
  assert len((tmp_path / "g" / "metrics.jsonl").read_text().splitlines()) == 1  # one row, not two

def test_cli_generate_config_without_heads_exits_2_before_writing(tmp_path, capsys):
  from experiments import run as cli
  config_file = Path(__file__).parents[1] / "experiments" / "configs" / "fsdd_generate.json"
  argv = ["--config", str(config_file), "--quiet", "--set", f'output_dir="{tmp_path}/runs"',
          "--set", f'adapter_load_checkpoint="{tmp_path}/runs/fsdd_tiny"']
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "adapter_load_checkpoint: no run directory at" in err and "Traceback" not in err
  assert not (tmp_path / "runs").exists()


def test_trained_pipeline_embeddings_land_nearest_their_own_class_target(tmp_path):
  """The three steps with enough training to learn separable clusters: the generate step's server
  embeddings of synthetic features are nearest (by cosine) to their own class's text target far more often
  than chance (1/4), on both branches."""
  prep = synthetic_prepared(seed=3)
  common = HEADS + GENS + [f'output_dir="{tmp_path}"', f'generator_checkpoint_dir="{tmp_path}/gens"']
  train_and_evaluate(config.load(None, common + ['name="run1"', "use_generator=true", "generator_only_mode=true",
                                                 "generator_batch_size=8", "global_rounds=3",
                                                 "generator_training_epochs=20"]),
                     verbose=False, prepared=prep)
  train_and_evaluate(config.load(None, common + ['name="heads"', "global_rounds=30", "eval_gap=0"]),
                     verbose=False, prepared=prep)
  cfg = config.load(None, common + ['name="gen"', "use_pretrained_generators=true",
                                    f'adapter_load_checkpoint="{tmp_path}/heads"', 'synthetic_samples_per_class="10"'])
  train_and_evaluate(cfg, verbose=False, prepared=prep)
  server = eio.load_embeddings(tmp_path / "gen" / "embeddings" / "server_embeddings_r30.safetensors")
  names = prep.nodes.clipset.class_names
  labels = np.array([names.index(c) for c in server.class_names])
  assert len(set(labels)) == 4
  for b, t in prep.targets.items():
    e = np.asarray(server.embeddings[b]).reshape(len(server), -1)
    t = np.asarray(t).reshape(len(t), -1)
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    # chance is 0.25; over 120 samples its spread is 0.04, so 0.45 is 5 standard deviations above it
    assert np.mean(cos.argmax(1) == labels) > 0.45, (b, np.mean(cos.argmax(1) == labels))
