"""Rendering: tiny writers, Flax SD vs torch parity, FLUX branch mapping, CLIP metric, the CLI."""

import json

import numpy as np
import pytest
import torch

from a2v_jax.render import embeddings_io as eio
from a2v_jax.backbones import tiny_diffusion
from a2v_jax.render.image_metrics import ZeroShotCLIP, classification_metrics, score, score_groups

T5_DIM, CLIP_DIM, SD_DIM = 32, 24, 32  # different widths: a swapped FLUX call cannot pass
PARITY_ATOL = 1e-4  # max |flax - torch| over pixels in [0, 1]; observed 0.7-1.6e-5 on CPU float32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("backbones")
  return {
      "sd": tiny_diffusion.write_tiny_sd(root / "sd", cross_attention_dim=SD_DIM),
      "flux": tiny_diffusion.write_tiny_flux(root / "flux", joint_attention_dim=T5_DIM,
                                             pooled_projection_dim=CLIP_DIM),
      "clip": tiny_diffusion.write_tiny_clip_model(root / "clip"),
  }


# --- tiny writers -----------------------------------------------------------------------------------


def test_tiny_writers_deterministic_idempotent_and_safe(models, tmp_path):
  again = tiny_diffusion.write_tiny_flux(tmp_path / "flux", joint_attention_dim=T5_DIM,
                                         pooled_projection_dim=CLIP_DIM)
  rel = "transformer/diffusion_pytorch_model.safetensors"
  assert (again / rel).read_bytes() == (models["flux"] / rel).read_bytes()
  stamp = (again / rel).stat().st_mtime_ns
  tiny_diffusion.write_tiny_flux(again, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM)
  assert (again / rel).stat().st_mtime_ns == stamp  # complete: skipped
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a complete tiny model"):
    tiny_diffusion.write_tiny_sd(foreign, cross_attention_dim=8)
  assert (foreign / "notes.txt").read_text() == "keep me"
  for d in models.values():
    assert (d / tiny_diffusion.MARKER).is_file()
  assert not (models["sd"] / "text_encoder").exists()  # no text side: we feed prompt_embeds


# --- Flax SD vs torch diffusers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_sd(models):
  from diffusers import StableDiffusionPipeline
  pipe = StableDiffusionPipeline.from_pretrained(
      models["sd"], text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
      image_encoder=None, local_files_only=True)
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler"])
def test_sd_flax_matches_torch_pipeline(models, torch_sd, scheduler):
  from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
  from a2v_jax.backbones.sd_flax import load_sd_flax
  sd = load_sd_flax(models["sd"], scheduler=scheduler)
  assert sd.cross_attention_dim == SD_DIM and sd.sample_size == 32
  rs = np.random.RandomState(0)
  prompt = rs.randn(2, 77, SD_DIM).astype(np.float32)
  negative = (0.1 * rs.randn(1, 77, SD_DIM)).astype(np.float32)
  latents = np.asarray(sd.initial_latents([3, 4], 32, 32))
  kw = dict(num_inference_steps=2, guidance_scale=7.5)
  ours = np.asarray(sd.sample(prompt, negative, latents, **kw))

  cls = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
  torch_sd.scheduler = cls.from_config(torch_sd.scheduler.config)
  ref = torch_sd(prompt_embeds=torch.tensor(prompt),
                 negative_prompt_embeds=torch.tensor(negative).repeat(2, 1, 1),
                 latents=torch.tensor(latents), height=32, width=32, output_type="np", **kw).images
  assert ours.shape == ref.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(ours, ref, atol=PARITY_ATOL, rtol=0)
  # Not vacuous: another prompt moves the image far more than the tolerance.
  other = np.asarray(sd.sample(prompt[::-1], negative, latents, **kw))
  assert np.abs(other - ours).max() > 100 * PARITY_ATOL

  if scheduler == "ddim":
    # Jit once per configuration: same shapes, new values -> no new compilation.
    assert sd._sample._cache_size() == 1
    # Batched render with padding: seeds, not batch position, decide the image.
    more = np.concatenate([prompt, prompt[:1]])
    imgs = sd.render(more, negative, seeds=[3, 4, 3], batch_size=2, **kw)
    assert sd._sample._cache_size() == 1
    np.testing.assert_allclose(imgs[:2], ours, atol=1e-5)
    np.testing.assert_allclose(imgs[2], ours[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(B, L, 32\)"):
      sd.sample(prompt[..., :8], negative, latents, **kw)
    # Decoding in slices (the memory knob for real SD) changes nothing.
    sliced = load_sd_flax(models["sd"], scheduler=scheduler, decode_batch_size=1)
    np.testing.assert_allclose(np.asarray(sliced.sample(prompt, negative, latents, **kw)), ours, atol=1e-6)


# --- torch FLUX ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(models):
  from a2v_jax.backbones.flux_torch import load_flux
  return load_flux(models["flux"], device="cpu")


def test_flux_branches_map_to_the_right_inputs(flux, monkeypatch):
  assert (flux.t5_dim, flux.clip_dim, flux.dtype) == (T5_DIM, CLIP_DIM, torch.float32)
  rs = np.random.RandomState(0)
  t5 = rs.randn(2, 17, T5_DIM).astype(np.float32)
  clip = rs.randn(2, CLIP_DIM).astype(np.float32)
  calls = []
  real = flux.pipe

  def spy(**kw):
    calls.append(kw)
    return real(**kw)
  monkeypatch.setattr(flux, "pipe", spy)
  images = flux(t5, clip, seeds=[0, 1], num_inference_steps=1)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  (kw,) = calls
  np.testing.assert_array_equal(kw["prompt_embeds"].numpy(), t5)          # T5 -> prompt_embeds
  np.testing.assert_array_equal(kw["pooled_prompt_embeds"].numpy(), clip)  # CLIP -> pooled
  # The reference's swap is refused before reaching the pipeline.
  with pytest.raises(ValueError, match="swapped"):
    flux(clip, t5, seeds=[0, 1])
  assert len(calls) == 1
  # One image per seed, whatever the batching; a jax array crosses via dlpack.
  import jax.numpy as jnp
  one = flux.render(jnp.asarray(t5), jnp.asarray(clip), seeds=[0, 1], batch_size=1, num_inference_steps=1)
  np.testing.assert_allclose(one, images, atol=1e-5)


# --- image metric --------------------------------------------------------------------------------------


def test_classification_metrics_hand_computed():
  # classes 0,1,2; true [0,0,1,1,2,2], pred [0,1,1,1,0,2]
  # per class tp=(1,2,1) support=(2,2,2) predicted=(2,3,1)
  # precision=(1/2, 2/3, 1) recall=(1/2, 1, 1/2) f1=2tp/(pred+support)=(1/2, 4/5, 2/3)
  m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2])
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
  assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
  assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
  assert m["f1_score"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
  assert m["f1_score_weighted"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
  # A predicted class absent from y_true counts in macro scores (f1 0) but not in balanced accuracy.
  m = classification_metrics([0, 0, 1], [0, 2, 1])
  assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # recalls of classes 0, 1
  assert m["f1_score"] == pytest.approx((2 / 3 + 1 + 0) / 3)
  assert m["f1_score_weighted"] == pytest.approx((2 / 3 * 2 + 1 * 1) / 3)


def test_zero_shot_clip_plumbing(models, monkeypatch):
  from transformers import CLIPModel, CLIPProcessor
  classes = ["dog", "rail_transport", "cat"]
  clf = ZeroShotCLIP(models["clip"], classes)
  assert clf.prompts == ("a photo of dog", "a photo of rail transport", "a photo of cat")
  images = np.random.RandomState(0).rand(3, 40, 48, 3).astype(np.float32)
  # Logits equal CLIPModel's own logits_per_image for the same prompts and images.
  proc = CLIPProcessor.from_pretrained(models["clip"])
  model = CLIPModel.from_pretrained(models["clip"]).eval()
  inputs = proc(text=list(clf.prompts), images=list((images * 255).round().astype(np.uint8)),
                return_tensors="pt", padding=True)
  with torch.no_grad():
    expected = model(**inputs).logits_per_image.numpy()
  np.testing.assert_allclose(clf.logits(images, batch_size=2), expected, rtol=1e-4, atol=1e-4)
  # Class names -> indices -> metrics, with hand-set logits.
  fixed = np.array([[5, 0, 0], [0, 0, 5], [0, 0, 5]], np.float32)  # predicts dog, cat, cat
  monkeypatch.setattr(clf, "logits", lambda x, batch_size=32: fixed)
  m = score(clf, images, ["dog", "rail_transport", "cat"])
  assert m["accuracy"] == pytest.approx(2 / 3) and m["num_images"] == 3
  assert m["balanced_accuracy"] == pytest.approx(2 / 3)
  g = score_groups(clf, {"node_0": (images, ["dog", "cat", "cat"])})
  assert g["test/node_0/accuracy"] == 1.0
  with pytest.raises(ValueError, match="horse"):
    score(clf, images, ["horse", "dog", "cat"])


# --- the CLI, end to end -----------------------------------------------------------------------------


def _write(dirpath, node, rnd, n, t5_dim=T5_DIM, clip_dim=CLIP_DIM, seed=0, diffusion_type="flux"):
  rs = np.random.RandomState(seed)
  if diffusion_type == "flux":
    emb = {"clip": rs.randn(n, clip_dim).astype(np.float32), "t5": rs.randn(n, 17, t5_dim).astype(np.float32)}
  else:
    emb = {"clip": rs.randn(n, 77, clip_dim).astype(np.float32)}
  return eio.save_embeddings(
      dirpath / eio.embeddings_filename(node, rnd), embeddings=emb,
      class_names=[["dog", "cat"][i % 2] for i in range(n)], sample_ids=[f"val_{i}" for i in range(n)],
      node=node, round=rnd, split="val", diffusion_type=diffusion_type, config_hash="h")


def test_cli_flux_end_to_end(models, tmp_path, capsys):
  from experiments.render import main
  from tests.test_embeddings_io import reference_node_pt
  ck = tmp_path / "emb"
  _write(ck, 0, 1, 3)
  _write(ck, "server", 1, 2, seed=1)
  _write(ck, 1, 1, 2, clip_dim=16)  # wrong width for this model
  (ck / "node_2_embeddings_r1.safetensors").write_bytes(b"\x00" * 12)  # corrupt
  reference_node_pt(ck / "node_3_embeddings_r1.pt", n=2, t5=(17, T5_DIM), clip=CLIP_DIM)
  out = tmp_path / "out"
  argv = ["--checkpoint_dir", str(ck), "--output_dir", str(out), "--diffusion_type", "flux",
          "--model_dir", str(models["flux"]), "--batch_size", "2", "--num_inference_steps", "1",
          "--clip_model_dir", str(models["clip"]), "--no_progress"]
  assert main(argv) == 3  # finished, some files skipped
  printed = capsys.readouterr().out
  assert "rendered 7 image(s) from 3 file(s); skipped 2 file(s)" in printed
  summary = json.loads((out / "render_summary.json").read_text())
  reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in summary["skipped"]}
  assert "width 16" in reasons["node_1_embeddings_r1.safetensors"]
  assert "cannot read" in reasons["node_2_embeddings_r1.safetensors"]
  node0 = out / "node_0_embeddings_r1"
  assert sorted(p.name for p in node0.iterdir()) == [
      "node_0_r1_cat_val_1.png", "node_0_r1_dog_val_0.png", "node_0_r1_dog_val_2.png",
      "sheet_cat.png", "sheet_dog.png"]
  assert (out / "server_embeddings_r1" / "server_r1_dog_val_0.png").is_file()
  assert (out / "node_3_embeddings_r1" / "node_0_r5_cat_train_1.png").is_file()  # reference .pt, node_id 0
  from PIL import Image
  assert np.asarray(Image.open(node0 / "node_0_r1_dog_val_0.png")).shape == (32, 32, 3)
  assert 0 <= summary["metrics"]["test/node_0_r1/accuracy"] <= 1
  assert summary["images"] == 7 and summary["seconds_per_image"] > 0

  # An existing non-empty output dir is never silently reused.
  assert main(argv) == 2
  assert "pass --overwrite" in capsys.readouterr().err
  # --on_error stop halts at the first bad file (node_1 sorts before node_2).
  assert main(argv + ["--overwrite", "--on_error", "stop"]) == 2
  assert "node_1_embeddings_r1.safetensors" in capsys.readouterr().err
  # A pattern that matches nothing is an error.
  assert main(argv[:2] + ["--pattern", "nothing_*.pt"] + argv[2:]) == 2
  assert "no file in" in capsys.readouterr().err


def test_cli_sd_default_tiny_model(tmp_path, capsys):
  from experiments.render import main
  from a2v_jax.backbones.paths import TINY_CLIP_DIM
  ck = tmp_path / "emb"
  path = _write(ck, 0, 2, 3, clip_dim=TINY_CLIP_DIM, diffusion_type="sd")
  _write(ck, 1, 2, 1, diffusion_type="flux")  # a flux file: wrong shape for sd
  out = tmp_path / "out"
  code = main(["--checkpoint_dir", str(ck), "--output_dir", str(out), "--diffusion_type", "sd",
               "--tiny_dir", str(tmp_path / "tiny"), "--batch_size", "2", "--num_inference_steps", "1",
               "--scheduler", "pndm", "--no_progress"])
  assert code == 3
  summary = json.loads((out / "render_summary.json").read_text())
  assert [f["images"] for f in summary["files"]] == [3]
  assert "needs (N, L, d)" in summary["skipped"][0]["reason"]
  assert len(list((out / path.stem).glob("node_0_r2_*.png"))) == 3
  assert (tmp_path / "tiny" / "sd" / tiny_diffusion.MARKER).is_file()
  # Nothing renderable: exit 2 with one line, no summary, no output folder left behind.
  bad = tmp_path / "bad"
  _write(bad, 1, 2, 1, diffusion_type="flux")
  capsys.readouterr()
  code = main(["--checkpoint_dir", str(bad), "--output_dir", str(tmp_path / "out2"), "--diffusion_type", "sd",
               "--tiny_dir", str(tmp_path / "tiny"), "--num_inference_steps", "1", "--no_progress"])
  err = capsys.readouterr().err
  assert code == 2 and "none of the 1 embeddings file(s) could be rendered" in err and "Traceback" not in err
  assert not (tmp_path / "out2").exists()
