"""The reference's .pt checkpoints imported: its generators decode the same samples, its adapters give the same
outputs, and the generate step runs on both; other layouts and shapes are refused naming the tensor."""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from a2v_jax import config
from a2v_jax.generators import checkpoint as gc
from a2v_jax.generators import runs as grn
from a2v_jax.generators import training as gt
from a2v_jax.models.heads import head_functions, make_heads
from a2v_jax.reference import checkpoints as rc
from a2v_jax.reference.config import sectioned
from a2v_jax.reference import torch_baseline as tb
from a2v_jax.run import generate as gen_lib
from experiments.import_reference import main
from fakes import synthetic_prepared

S, D, H, Z = 3, 8, 16, 4  # generator tokens, feature dim (the fake features'), hidden, latent
HEADS = ["clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2", "num_nodes=3", "t5_max_length=3",
         "t5_latents=3"]
GENS = [f"generator_hidden_dim={H}", f"generator_latent_dim={Z}", f"generator_training_sequence_length={S}",
        'generator_architecture="reference_mlp"', 'generator_granularity="per_class"']


def _vae_file(path, torch_vae, node, cls):
  torch.save({"client_id": node, "node_id": node, "round": 10, "generator_type": "vae", "class_name": cls,
              "generator_granularity": "per_class", "sequence_length": S, "use_conditioned_vae": False,
              "generator_state_dict": torch_vae.state_dict()}, path)


def _reference_generators(d, names, rounds=(2, 10)):
  """Files of the reference's Run 1: one VAE per (node, class the node holds) per round."""
  d.mkdir()
  torch.manual_seed(0)
  vaes = {}
  for n in range(3):
    for cls in names:
      vaes[n, cls] = tb.ReferenceVAEGenerator(D, H, Z, S).eval()
      for r in rounds:
        _vae_file(d / f"vae_perclass_node{n}_class_{cls}_round_{r}.pt", vaes[n, cls], n, cls)
  return vaes


def _reference_adapters(d, heads, in_dim, rounds=(2, 10)):
  """The reference's per-type adapter files: four per node and round."""
  d.mkdir()
  torch.manual_seed(1)
  models = [tb.heads_like(heads, in_dim).eval() for _ in range(3)]
  for n, model in enumerate(models):
    for b, branch in model.branches.items():
      for part in ("adapter", "projection"):
        for r in rounds:
          torch.save({"client_id": n, "node_id": n, "round": r, "adapter_name": f"{b}_{part}",
                      "adapter_state_dict": getattr(branch, part).state_dict()},
                     d / f"sa_node{n}_{b}_{part}_round_{r}_class_c0_c1.pt")
  return models


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("import")
  prep = synthetic_prepared(tokens=6, dim=D)
  names = prep.nodes.clipset.class_names
  vaes = _reference_generators(tmp / "ref_gens", names)
  cfg = config.load(None, HEADS + GENS + [f'generator_checkpoint_dir="{tmp}/gens"', "use_pretrained_generators=true",
                                           f'output_dir="{tmp}/runs"', 'name="gen"', 'synthetic_samples_per_class="2"',
                                           f'adapter_load_checkpoint="{tmp}/heads"', f'tiny_dir="{tmp}/tiny"',
                                           "generator_output_sequence_length=6"])  # S=3 samples -> 6 tokens
  rc.import_generators(cfg, tmp / "ref_gens", "vae_perclass", class_names=names, verbose=False)
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  models = _reference_adapters(tmp / "ref_adapters", heads, D)
  rc.import_adapters(cfg, tmp / "ref_adapters", "sa", tmp / "heads", verbose=False)
  return dict(tmp=tmp, prep=prep, cfg=cfg, vaes=vaes, heads=heads, models=models, names=names)


def test_imported_generators_decode_the_same_samples(imported):
  cfg, names, vaes = imported["cfg"], imported["names"], imported["vaes"]
  state, rnd = gc.restore_generators(cfg.generators, feature_dim=D, num_classes=4, class_names=names)
  assert rnd == 10 and state.spec.architecture == "reference_mlp"  # the highest round, not the first file
  vae = gt.models(state.spec)["vae"]
  z = np.random.default_rng(0).normal(size=(5, Z)).astype(np.float32)
  x = np.random.default_rng(1).normal(size=(5, S, D)).astype(np.float32)
  for (n, cls), tv in vaes.items():
    slot = state.layout.slot_for_class(n, names.index(cls))
    p = jax.tree.map(lambda a: a[slot], state.params)
    with torch.no_grad():
      want = tv.decode(torch.from_numpy(z)).numpy()
      mu_t, logvar_t = tv.encode(torch.from_numpy(x))
    np.testing.assert_allclose(vae.apply(p, jnp.asarray(z), method=vae.decode), want, rtol=1e-5, atol=1e-5)
    mu, logvar = vae.apply(p, jnp.asarray(x), method=vae.encode)
    np.testing.assert_allclose(mu, mu_t.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logvar, logvar_t.numpy(), rtol=1e-5, atol=1e-5)
  assert state.layout.num_slots == 12 and not state.layout.shared


def test_imported_adapters_give_the_same_outputs_and_generate_runs(imported):
  tmp, cfg, heads, models, prep = (imported[k] for k in ("tmp", "cfg", "heads", "models", "prep"))
  run = gen_lib.inspect_heads_run(tmp / "heads")
  assert run.round == 10 and run.mode == "none"
  _, clients = gen_lib.restore_heads(run)
  apply, _ = head_functions(heads, (6, D))
  tokens = np.random.default_rng(2).normal(size=(4, 6, D)).astype(np.float32)
  for n, model in enumerate(models):
    with torch.no_grad():
      want = model(torch.from_numpy(tokens))
    got = apply(jax.tree.map(lambda a: a[n], clients), tokens)
    for b in ("clip", "t5"):
      np.testing.assert_allclose(got[b], want[b].numpy(), rtol=1e-4, atol=1e-5)
  # the generate step on both: every node's heads on its synthetic draw from the imported generators
  summary = gen_lib.run_generate(cfg, verbose=False, prepared=prep)
  assert summary["heads_round"] == 10 and summary["generator_round"] == 10
  names = sorted(p.name for p in (tmp / "runs" / "gen" / "embeddings").iterdir())
  assert names == [f"node_{n}_embeddings_r10.safetensors" for n in range(3)], names


def test_refused_naming_the_file_tensor_or_node(tmp_path, imported, capsys):
  names = imported["names"]
  d = tmp_path / "bad"
  d.mkdir()
  vae = tb.ReferenceVAEGenerator(D, H + 1, Z, S)
  _vae_file(d / f"vae_perclass_node0_class_{names[0]}_round_3.pt", vae, 0, names[0])
  cfg = config.load(None, HEADS + GENS + ["use_pretrained_generators=true", f'generator_checkpoint_dir="{tmp_path}/g"'])
  with pytest.raises(rc.ReferenceCheckpointError, match=r"tensor 'encoder.0.weight' has shape \(17, 24\), expected "
                                                         r"\(16, 24\)"):
    rc.import_generators(cfg, d, "vae_perclass", class_names=names, verbose=False)
  with pytest.raises(rc.ReferenceCheckpointError, match="no other_node"):
    rc.import_generators(cfg, d, "other", class_names=names, verbose=False)
  assert not (tmp_path / "g").exists()
  # a file holding code is never unpickled
  (d / "evil_node0_round_1.pt").write_bytes(pickle.dumps(np.ones(2), protocol=2))  # numpy reduce: a callable, refused
  with pytest.raises(rc.ReferenceCheckpointError, match="not a weights-only torch checkpoint"):
    rc.load_pt(d / "evil_node0_round_1.pt")
  # adapters: a node's files missing, named; through the CLI (exit 2, one line)
  ad = tmp_path / "ads"
  _reference_adapters(ad, imported["heads"], D, rounds=(4,))
  (ad / "sa_node2_t5_projection_round_4_class_c0_c1.pt").unlink()
  cfg_file = tmp_path / "cfg.json"
  flat = dict(config.parse_override(kv) for kv in HEADS + GENS + ["use_pretrained_generators=true"])
  cfg_file.write_text(json.dumps(sectioned(flat)))
  assert main(["adapters", "--config", str(cfg_file), "--dir", str(ad), "--base", "sa", "--out",
               str(tmp_path / "heads")]) == 2
  err = capsys.readouterr().err
  assert "node 2: missing ['t5_projection']" in err and not (tmp_path / "heads").exists()
