"""Image-level evaluation: CLIP zero-shot classification of rendered images over the class names.

Why: the reference judges its heads by rendering one image per clip and asking CLIP
ViT-B/32 which class name the image shows. The classifier is torch ``CLIPModel``
from a local directory (the real one, or the tiny one written by
``backbones.tiny_diffusion.write_tiny_clip_model``); the metrics are plain numpy with
sklearn's definitions (no sklearn dependency), so numbers are comparable with the reference.

Differences from the reference, on purpose: the prompt template is explicit
(default "a photo of {}", underscores in class names become spaces), and each image is
scored once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

DEFAULT_TEMPLATE = "a photo of {}"


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
  """Accuracy, balanced accuracy and macro / weighted scores, as sklearn computes them.

  Classes are the union of the labels seen in ``y_true`` and ``y_pred`` (sklearn's default).
  Per-class precision / recall / F1 whose denominator is 0 count as 0 (``zero_division=0``);
  balanced accuracy is the mean recall over classes that occur in ``y_true``.

  Args:
    y_true: (N,) true class indices.
    y_pred: (N,) predicted class indices.

  Returns:
    ``accuracy``, ``balanced_accuracy``, ``f1_score`` (macro), ``precision`` (macro),
    ``recall`` (macro), ``f1_score_weighted`` (by true support): the reference's metric names.
  """
  t = np.asarray(y_true, dtype=np.int64).reshape(-1)
  p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
  if t.shape != p.shape:
    raise ValueError(f"y_true has {t.size} labels, y_pred {p.size}")
  if t.size == 0:
    raise ValueError("no samples to score")
  labels = np.union1d(t, p)
  tp = np.array([np.sum((t == c) & (p == c)) for c in labels], dtype=np.float64)
  support = np.array([np.sum(t == c) for c in labels], dtype=np.float64)
  predicted = np.array([np.sum(p == c) for c in labels], dtype=np.float64)

  def ratio(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

  precision = ratio(tp, predicted)
  recall = ratio(tp, support)
  f1 = ratio(2 * tp, predicted + support)
  return {
      "accuracy": float(np.mean(t == p)),
      "balanced_accuracy": float(np.mean(recall[support > 0])),
      "f1_score": float(np.mean(f1)),
      "precision": float(np.mean(precision)),
      "recall": float(np.mean(recall)),
      "f1_score_weighted": float(np.sum(f1 * support) / support.sum()),
  }


def _to_uint8(images: np.ndarray) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3), got {x.shape}")
  if x.dtype == np.uint8:
    return x
  return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


class ZeroShotCLIP:
  """CLIP zero-shot image classifier over a fixed list of class names.

  Attributes:
    class_names: the candidate classes (index = label).
    prompts: the text each class is matched against.
  """

  def __init__(self, model_dir: str | Path, class_names: Sequence[str], *,
               template: str = DEFAULT_TEMPLATE, device: str = "cpu"):
    """Loads ``CLIPModel`` + ``CLIPProcessor`` and encodes the class prompts once.

    Args:
      model_dir: local Hugging Face CLIP directory (config, weights, tokenizer, processor).
      class_names: candidate classes; their order defines the label indices.
      template: prompt with one ``{}`` for the class name.
      device: torch device.
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor
    if "{}" not in template:
      raise ValueError(f"template must contain '{{}}', got {template!r}")
    self.class_names = tuple(class_names)
    self.prompts = tuple(template.format(c.replace("_", " ")) for c in self.class_names)
    self.device = device
    self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
    self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    text = self.processor(text=list(self.prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
      feats = self._features(self.model.get_text_features(
          input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device)))
    self._text = feats / feats.norm(dim=-1, keepdim=True)

  @staticmethod
  def _features(out):
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    return out if hasattr(out, "norm") else out.pooler_output

  def logits(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """(N, C) CLIP logits (scaled cosine similarity) of images against the class prompts.

    Args:
      images: (N, H, W, 3) uint8, or floats in [0, 1] (what the renderers return).
      batch_size: images per forward.
    """
    import torch
    x = _to_uint8(images)
    out = []
    scale = self.model.logit_scale.exp()
    for s in range(0, len(x), batch_size):
      pix = self.processor(images=list(x[s:s + batch_size]), return_tensors="pt").pixel_values
      with torch.no_grad():
        f = self._features(self.model.get_image_features(pixel_values=pix.to(self.device)))
        f = f / f.norm(dim=-1, keepdim=True)
        out.append((scale * f @ self._text.T).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

  def predict(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """(N,) index of the best-matching class name per image."""
    return np.argmax(self.logits(images, batch_size=batch_size), axis=-1)


def score(classifier: ZeroShotCLIP, images: np.ndarray, true_classes: Sequence[str]) -> dict[str, float]:
  """Zero-shot metrics of a set of images whose true class names are known.

  Args:
    classifier: a ZeroShotCLIP whose class_names include every true class.
    images: (N, H, W, 3).
    true_classes: (N,) class name per image.

  Returns:
    ``classification_metrics`` of the predictions, plus ``num_images``.
  """
  index = {c: i for i, c in enumerate(classifier.class_names)}
  unknown = sorted(set(true_classes) - set(index))
  if unknown:
    raise ValueError(f"classes {unknown} are not among the classifier's candidates")
  y_true = np.array([index[c] for c in true_classes])
  y_pred = classifier.predict(images)
  return {**classification_metrics(y_true, y_pred), "num_images": float(len(y_true))}


def score_groups(classifier: ZeroShotCLIP, groups: Mapping[str, tuple[np.ndarray, Sequence[str]]],
                 prefix: Optional[str] = "test") -> dict[str, float]:
  """Scores several groups (nodes, server) and names the results like the reference.

  Args:
    classifier: the zero-shot classifier.
    groups: group name ("node_0", "server") -> (images, true class names).
    prefix: leading key part; keys read ``{prefix}/{group}/{metric}``.

  Returns:
    A flat dict of metrics.
  """
  out = {}
  for group, (images, classes) in groups.items():
    for k, v in score(classifier, images, classes).items():
      out["/".join(x for x in (prefix, group, k) if x)] = v
  return out
