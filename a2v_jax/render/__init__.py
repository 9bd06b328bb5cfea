"""From conditioning embeddings to images: the files embeddings travel in, the renders, their scores.

  embeddings_io.py   the embeddings file format (safetensors + JSON header; the reference's .pt read too)
  round_outputs.py   what a training run writes every N rounds (embeddings checkpoints, in-training renders)
  offline.py         rendering embeddings files into PNGs and contact sheets (Flax SD, torch FLUX)
  image_metrics.py   CLIP zero-shot scores of rendered images
"""
