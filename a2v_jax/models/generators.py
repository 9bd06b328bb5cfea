"""Generators of frozen AST feature sequences: VAE, class-conditioned VAE, GAN (flax.linen).

What they model: the adapters' *input*, i.e. AST hidden states of a clip, an (T, D) token
sequence (T = 1214, D = 768 for the real AST), reduced to S tokens (``generator_training_sequence_length``,
default 4) by adaptive average pooling over tokens as the reference does (:func:`pool_tokens`).
Samples can be stretched back to any token count by linear interpolation (:func:`interpolate_tokens`,
torch ``F.interpolate(mode='linear', align_corners=False)``).

Why not the reference's architecture. The reference flattens the (S, D) sequence and uses dense
layers S*D -> H and H -> S*D; at its S = 1214, D = 768, H = 1024, Z = 256 that is 1.91 B parameters
(7.65 GB fp32) per generator, per class, per round. Here tokens share one encoder and one decoder,
and positions are told apart by learned token embeddings, so S enters only through two (S, H) tables:

  encoder: Dense(D->H) per token + position embedding (S, H) -> ReLU -> mean over tokens
           [+ Dense(cond)] -> Dense(H->H) -> ReLU -> Dense(H->2Z)  (mu, log-variance)
  decoder: Dense(Z[+cond]->H) -> ReLU -> Dense(H->H) -> + token embedding (S, H) -> ReLU
           -> Dense(H->H) per token -> ReLU -> Dense(H->D) per token    (no output activation)

Parameter counts (``jax.eval_shape`` of ``init``, see :func:`param_count`; H = 1024, Z = 256):

  ====================  ===================  ==============================  =======
  feature shape (S, D)  ours (VAEGenerator)  reference VAEGenerator (MLP)    ratio
  ====================  ===================  ==============================  =======
  (1214, 768)           7,997,696            1,913,277,440                   ~239x
  (4, 768)              5,519,616            9,182,720                       ~1.7x
  ====================  ===================  ==============================  =======

(:func:`reference_vae_param_count` gives the reference's closed form; the test suite recomputes both.)
The reference's conditioned VAE used a Tanh output, which cannot represent AST features outside
[-1, 1]; ours has a linear output for every variant. Dropout (0.2 in the reference) is left out.

References:
  Kingma & Welling, Auto-Encoding Variational Bayes, 2014.
  Sohn et al., Learning Structured Output Representation using Deep Conditional Generative Models, 2015.
  Goodfellow et al., Generative Adversarial Nets, 2014 (non-saturating generator loss).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.types import Params, PRNGKey

# The reference's ConditionedVAEGenerator sizes (the reference's design notes): input 512, hidden 1024, latent 256,
# visual (condition) 768, sequence 4.
REFERENCE_CVAE = dict(feature_dim=512, hidden_dim=1024, latent_dim=256, cond_dim=768, seq_len=4)
# The reference's VAEGenerator as used in every run: 768-d tokens, hidden 1024, latent 256.
REFERENCE_VAE = dict(feature_dim=768, hidden_dim=1024, latent_dim=256, seq_len=4)

# The reference's KL weight (the ceiling of its beta schedule; config.generator_kl_weight).
REFERENCE_KL_WEIGHT = 0.01

# Reference clamps: they keep exp(logvar) and the decoder input bounded.
LOGVAR_RANGE = (-5.0, 2.0)
MU_RANGE = (-5.0, 5.0)
Z_RANGE = (-5.0, 5.0)


# ---------------------------------------------------------------------------------------------
# Token-axis resampling.


def _pool_matrix(length: int, size: int) -> np.ndarray:
  """(size, length) averaging matrix of torch ``adaptive_avg_pool1d`` (bins floor/ceil)."""
  p = np.zeros((size, length), np.float32)
  for i in range(size):
    start, end = (i * length) // size, -((-(i + 1) * length) // size)
    p[i, start:end] = 1.0 / (end - start)
  return p


def pool_tokens(x: jax.Array, size: int) -> jax.Array:
  """Adaptive average pooling of the token axis, (..., T, D) -> (..., size, D) (no-op if T == size).

  Why: the reference reduces AST sequences to S tokens this way before the generator sees them.
  """
  length = x.shape[-2]
  if length == size:
    return x
  return jnp.einsum("st,...td->...sd", jnp.asarray(_pool_matrix(length, size), x.dtype), x)


def interpolate_tokens(x: jax.Array, length: int) -> jax.Array:
  """Linear interpolation of the token axis, (..., S, D) -> (..., length, D).

  Matches torch ``F.interpolate(x.transpose(1, 2), length, mode='linear', align_corners=False)``,
  the reference's way of stretching S-token samples to the heads' token count.
  """
  size = x.shape[-2]
  if size == length:
    return x
  src = np.maximum((np.arange(length) + 0.5) * (size / length) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int32), size - 1)
  i1 = np.minimum(i0 + 1, size - 1)
  lam = jnp.asarray((src - i0)[:, None], x.dtype)
  return x[..., i0, :] * (1 - lam) + x[..., i1, :] * lam


# ---------------------------------------------------------------------------------------------
# Shared token encoder / decoder.


class TokenEncoder(nn.Module):
  """(B, S, D) [+ (B, E) condition] -> (B, out_dim); one Dense shared by all tokens."""
  seq_len: int
  hidden_dim: int
  out_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    pos = self.param("position_embedding", nn.initializers.normal(1.0), (self.seq_len, self.hidden_dim))
    h = nn.relu(nn.Dense(self.hidden_dim, name="token_in")(x) + pos).mean(axis=-2)
    if cond is not None:
      h = h + nn.Dense(self.hidden_dim, name="cond_in")(cond)
    h = nn.relu(nn.Dense(self.hidden_dim, name="hidden")(h))
    return nn.Dense(self.out_dim, name="out")(h)


class TokenDecoder(nn.Module):
  """(B, Z') -> (B, S, D): a global code broadcast to S tokens told apart by token embeddings."""
  seq_len: int
  hidden_dim: int
  feature_dim: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden_dim, name="in")(z))
    h = nn.Dense(self.hidden_dim, name="hidden")(h)
    tok = self.param("token_embedding", nn.initializers.normal(1.0), (self.seq_len, self.hidden_dim))
    t = nn.relu(h[..., None, :] + tok)
    t = nn.relu(nn.Dense(self.hidden_dim, name="token_hidden")(t))
    return nn.Dense(self.feature_dim, name="token_out")(t)


# ---------------------------------------------------------------------------------------------
# VAEs.


class VAEGenerator(nn.Module):
  """VAE of (S, D) token sequences; ``cond_dim > 0`` makes it class-conditioned.

  ``__call__(x, eps, cond)`` returns ``(x_hat, mu, logvar)``; ``eps`` (B, Z) is the standard-normal
  reparameterisation noise, passed in so that a training step draws all its randomness in one call
  (threefry programs are what dominates compile time on CPU).
  """
  feature_dim: int = REFERENCE_VAE["feature_dim"]
  hidden_dim: int = REFERENCE_VAE["hidden_dim"]
  latent_dim: int = REFERENCE_VAE["latent_dim"]
  seq_len: int = REFERENCE_VAE["seq_len"]
  cond_dim: int = 0
  class_prior: bool = False

  def setup(self):
    self.encoder = TokenEncoder(self.seq_len, self.hidden_dim, 2 * self.latent_dim)
    self.decoder = TokenDecoder(self.seq_len, self.hidden_dim, self.feature_dim)
    if self.class_prior:
      if self.cond_dim < 1:
        raise ValueError("a class prior needs a condition (cond_dim >= 1)")
      self.prior = nn.Dense(self.latent_dim, name="prior_mean")

  def prior_mean(self, cond: Optional[jax.Array], batch: int) -> jax.Array:
    """Mean of p(z | condition): a learned linear map of the condition with ``class_prior``, else 0."""
    cond = self._cond(cond, batch)
    return self.prior(cond) if self.class_prior else jnp.zeros((batch, self.latent_dim))

  def _cond(self, cond: Optional[jax.Array], batch: int) -> Optional[jax.Array]:
    if self.cond_dim == 0:
      return None
    if cond is None or cond.shape != (batch, self.cond_dim):
      raise ValueError(f"{type(self).__name__} needs a condition of shape ({batch}, {self.cond_dim}), got "
                       f"{None if cond is None else cond.shape}")
    return cond

  def encode(self, x: jax.Array, cond: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """(B, S, D) -> clamped (mu, logvar), each (B, Z)."""
    h = self.encoder(x, self._cond(cond, x.shape[0]))
    mu, logvar = jnp.split(h, 2, axis=-1)
    return jnp.clip(mu, *MU_RANGE), jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    """(B, Z) -> (B, S, D)."""
    cond = self._cond(cond, z.shape[0])
    return self.decoder(z if cond is None else jnp.concatenate([z, cond], axis=-1))

  def __call__(self, x: jax.Array, eps: jax.Array,
               cond: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (x_hat, mu - prior mean, logvar): the loss's KL against N(0, I) of the shifted mean is the KL
    against the (class) prior N(prior mean, I)."""
    mu, logvar = self.encode(x, cond)
    z = mu + jnp.exp(0.5 * logvar) * eps
    return self.decode(jnp.clip(z, *Z_RANGE), cond), mu - self.prior_mean(cond, x.shape[0]), logvar

  def sample(self, key: PRNGKey, n: int, cond: Optional[jax.Array] = None) -> jax.Array:
    """n draws z ~ p(z | cond) = N(prior mean, I) (unclamped, as the reference) decoded to (n, S, D)."""
    z = self.prior_mean(cond, n) + jax.random.normal(key, (n, self.latent_dim))
    return self.decode(z, cond)


class ConditionedVAEGenerator(VAEGenerator):
  """Class-conditioned VAE: the condition (a one-hot or a class embedding, (B, cond_dim)) enters
  the encoder (added to the pooled token code) and the decoder (concatenated to z).
  Defaults are the reference's sizes (``REFERENCE_CVAE``).

  ``class_prior`` (what a2v-jax's runs use) gives z a prior per condition, N(W cond + b, I), learned with the
  rest. Why: with the reference's small KL weight the encoder writes the class into z and the decoder reads it
  from there; sampling z ~ N(0, I) then draws no class in particular (the condition is ignored). With a class
  prior, the region of z the encoder uses for a class is where that class's samples are drawn.
  """
  feature_dim: int = REFERENCE_CVAE["feature_dim"]
  hidden_dim: int = REFERENCE_CVAE["hidden_dim"]
  latent_dim: int = REFERENCE_CVAE["latent_dim"]
  seq_len: int = REFERENCE_CVAE["seq_len"]
  cond_dim: int = REFERENCE_CVAE["cond_dim"]

  def setup(self):
    if self.cond_dim < 1:
      raise ValueError("ConditionedVAEGenerator needs cond_dim >= 1")
    super().setup()


class FlatEncoder(nn.Module):
  """The reference's encoder: flatten (S*D) -> Dense(H) -> ReLU -> Dense(H) -> ReLU -> Dense(out)."""
  hidden_dim: int
  out_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    del cond  # unconditioned (the only reference generator that round-trips)
    h = nn.relu(nn.Dense(self.hidden_dim, name="in")(x.reshape(x.shape[0], -1)))
    h = nn.relu(nn.Dense(self.hidden_dim, name="hidden")(h))
    return nn.Dense(self.out_dim, name="out")(h)


class FlatDecoder(nn.Module):
  """The reference's decoder: Dense(H) -> ReLU -> Dense(H) -> ReLU -> Dense(S*D) -> (S, D), no output activation."""
  seq_len: int
  hidden_dim: int
  feature_dim: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden_dim, name="in")(z))
    h = nn.relu(nn.Dense(self.hidden_dim, name="hidden")(h))
    return nn.Dense(self.seq_len * self.feature_dim, name="out")(h).reshape(z.shape[0], self.seq_len, self.feature_dim)


class ReferenceVAEGenerator(VAEGenerator):
  """The reference's ``VAEGenerator`` (flattening MLP; dropout left out, as in ours), so that its ``.pt``
  checkpoints can be imported (``reference/checkpoints.py``) and sampled by Run 2 bit for bit. Same clamps,
  loss and sampling as :class:`VAEGenerator`; ``generator_architecture: "reference_mlp"``. Unconditioned."""

  def setup(self):
    if self.cond_dim or self.class_prior:
      raise ValueError("the reference's VAEGenerator is unconditioned")
    self.encoder = FlatEncoder(self.hidden_dim, 2 * self.latent_dim)
    self.decoder = FlatDecoder(self.seq_len, self.hidden_dim, self.feature_dim)


# ---------------------------------------------------------------------------------------------
# GAN.


class GANGenerator(nn.Module):
  """z (B, Z) [+ condition] -> (B, S, D) with the same token decoder as the VAE."""
  feature_dim: int = 768
  hidden_dim: int = 512
  latent_dim: int = 128
  seq_len: int = 4
  cond_dim: int = 0

  @nn.compact
  def __call__(self, z: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    if self.cond_dim:
      z = jnp.concatenate([z, cond], axis=-1)
    return TokenDecoder(self.seq_len, self.hidden_dim, self.feature_dim, name="decoder")(z)

  def sample(self, key: PRNGKey, n: int, cond: Optional[jax.Array] = None) -> jax.Array:
    return self(jax.random.normal(key, (n, self.latent_dim)), cond)


class GANDiscriminator(nn.Module):
  """(B, S, D) [+ condition] -> real/fake logits (B,), with the VAE's token encoder."""
  hidden_dim: int = 512
  seq_len: int = 4
  cond_dim: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    h = TokenEncoder(self.seq_len, self.hidden_dim, 1, name="encoder")(x, cond if self.cond_dim else None)
    return h[..., 0]


# ---------------------------------------------------------------------------------------------
# Losses.


def _masked_mean(v: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
  if weights is None:
    return jnp.mean(v)
  return jnp.sum(v * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def vae_loss_weights(epoch: jax.Array, total_epochs: int,
                     kl_weight: float = REFERENCE_KL_WEIGHT) -> tuple[jax.Array, jax.Array]:
  """The reference's schedules: beta ramps to ``kl_weight`` (the reference's 0.01) over the first half of the
  epochs, the (1 - cos) weight decays from 0.1 to a floor of 0.01. ``epoch`` is 0-based."""
  warmup = max(1, int(0.5 * total_epochs))
  e = jnp.asarray(epoch, jnp.float32)
  beta = jnp.minimum(kl_weight, kl_weight * (e + 1) / warmup)
  w_sim = jnp.maximum(0.01, 0.1 * (1 - e / total_epochs))
  return beta, w_sim


def vae_loss(x_hat: jax.Array, x: jax.Array, mu: jax.Array, logvar: jax.Array, epoch: jax.Array,
             total_epochs: int, weights: Optional[jax.Array] = None,
             kl_weight: float = REFERENCE_KL_WEIGHT) -> tuple[jax.Array, dict[str, jax.Array]]:
  """recon MSE + beta(e) * KL + w_sim(e) * (1 - cos), as the reference's ``VAELoss`` (beta's ceiling
  ``kl_weight``: the reference's 0.01 unless given).

  Every term is a per-example mean (over S*D, over Z, one cosine per flattened example) averaged
  over the batch; ``weights`` (B,) masks padding rows (a batch of equal-size examples with unit
  weights gives the reference's plain means). The cosine uses torch's ``cosine_similarity`` on
  ``x + 1e-8`` with each norm clamped at 1e-8. The reference's NaN fallbacks are left out: a NaN
  should stop a run, not be hidden.

  Args:
    x_hat: (B, S, D) reconstruction of the *noisy* input.
    x: (B, S, D) clean target (denoising).
    mu, logvar: (B, Z) posterior parameters.
    epoch: 0-based epoch index for the schedules.
    total_epochs: E of the schedules.
    weights: optional (B,) row weights (1 valid, 0 padding).
    kl_weight: the ceiling of the beta schedule.

  Returns:
    (total, {"recon", "kl", "cos", "beta", "w_sim", "loss"}).
  """
  b = x.shape[0]
  recon = jnp.mean(jnp.square(x_hat - x).reshape(b, -1), axis=-1)
  kl = jnp.mean(-0.5 * (1 + logvar - jnp.square(mu) - jnp.exp(jnp.clip(logvar, -10.0, 10.0))), axis=-1)
  a, t = x_hat.reshape(b, -1) + 1e-8, x.reshape(b, -1) + 1e-8
  norms = jnp.maximum(jnp.linalg.norm(a, axis=-1), 1e-8) * jnp.maximum(jnp.linalg.norm(t, axis=-1), 1e-8)
  cos = 1.0 - jnp.sum(a * t, axis=-1) / norms
  beta, w_sim = vae_loss_weights(epoch, total_epochs, kl_weight)
  parts = {"recon": _masked_mean(recon, weights), "kl": _masked_mean(kl, weights),
           "cos": _masked_mean(cos, weights), "beta": beta, "w_sim": w_sim}
  total = parts["recon"] + beta * parts["kl"] + w_sim * parts["cos"]
  parts["loss"] = total
  return total, parts


def gan_losses(real_logits: jax.Array, fake_logits: jax.Array,
               weights: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Non-saturating GAN losses from BCE-with-logits (the reference's choice).

  discriminator: BCE(D(real), 1) + BCE(D(fake), 0) = softplus(-d_real) + softplus(d_fake);
  generator: BCE(D(fake), 1) = softplus(-d_fake) (the non-saturating form of Goodfellow et al.,
  which keeps gradients alive while D rejects the fakes). Differentiate ``d_loss`` w.r.t. the
  discriminator (fakes held fixed) and ``g_loss`` w.r.t. the generator.

  Returns:
    (d_loss + g_loss, {"d_loss", "g_loss", "d_real", "d_fake", "loss"}); d_real / d_fake are the
    mean probabilities D assigns to "real".
  """
  d_loss = _masked_mean(jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits), weights)
  g_loss = _masked_mean(jax.nn.softplus(-fake_logits), weights)
  parts = {"d_loss": d_loss, "g_loss": g_loss,
           "d_real": _masked_mean(jax.nn.sigmoid(real_logits), weights),
           "d_fake": _masked_mean(jax.nn.sigmoid(fake_logits), weights)}
  parts["loss"] = d_loss + g_loss
  return parts["loss"], parts


# ---------------------------------------------------------------------------------------------
# Sampling and sizes.


def sample(model: nn.Module, params: Params, key: PRNGKey, n: int, cond: Optional[jax.Array] = None,
           target_length: Optional[int] = None) -> jax.Array:
  """n samples (n, S_out, D) from a VAE (full params) or a GANGenerator (generator params).

  ``target_length`` stretches the S generated tokens to that many by linear interpolation.
  """
  x = model.apply(params, key, n, cond, method=model.sample)
  return x if target_length is None else interpolate_tokens(x, target_length)


def param_count(model: nn.Module, *args) -> int:
  """Parameters of ``model.init(key, *args)`` counted on shapes only (``jax.eval_shape``)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  return int(sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)))


def vae_param_count(seq_len: int, feature_dim: int, hidden_dim: int, latent_dim: int, cond_dim: int = 0) -> int:
  """Our VAE's parameter count for a feature shape, via ``jax.eval_shape`` (nothing allocated)."""
  model = VAEGenerator(feature_dim, hidden_dim, latent_dim, seq_len, cond_dim)
  x = jax.ShapeDtypeStruct((1, seq_len, feature_dim), jnp.float32)
  eps = jax.ShapeDtypeStruct((1, latent_dim), jnp.float32)
  cond = jax.ShapeDtypeStruct((1, cond_dim), jnp.float32) if cond_dim else None
  return param_count(model, x, eps, cond)


def reference_vae_param_count(seq_len: int, feature_dim: int, hidden_dim: int = 1024, latent_dim: int = 256) -> int:
  """Closed form of the reference's flattening ``VAEGenerator`` for comparison."""
  sf, h, z = seq_len * feature_dim, hidden_dim, latent_dim
  encoder = (sf * h + h) + (h * h + h) + (h * 2 * z + 2 * z)
  decoder = (z * h + h) + (h * h + h) + (h * sf + sf)
  return encoder + decoder
