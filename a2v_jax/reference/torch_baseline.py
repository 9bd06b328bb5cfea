"""A sequential PyTorch reference of the heads and the FedAvg round, the yardstick for speed claims.

Why: the reference (fedgfe) trains nodes one after another in torch. A speed-up claim is honest only
against the same arithmetic written the way the reference runs it: one ``nn.Module`` copy and one
AdamW per branch for every client, clients in a Python loop, FedAvg of ``state_dict``s. The modules
mirror ``a2v_jax.models.heads`` operation by operation (flax defaults included: LayerNorm eps 1e-6,
tanh-approximated GELU, kernels stored (in, out)), and load their weights from the JAX params, so
``tests/test_torch_baseline.py`` can check that both follow the same loss trajectory.

The baseline is deliberately *optimistic* for torch: features are indexed from an in-memory tensor
(no DataLoader, no audio decoding, no CPU<->GPU moves of the reference, spec section 9 items 16-19).
``AstFeatures`` adds back one waste of the reference, the AST forward of every sample in every local
epoch, to show what the feature cache buys end to end.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Batches = Sequence[Sequence[np.ndarray]]  # one client's rounds: [epoch][step] -> row indices


class RMSNorm(nn.Module):
  """x / max(rms(x), eps) * g, as ``heads.RMSNorm``."""

  def __init__(self, dim: int, eps: float = 1e-8):
    super().__init__()
    self.eps = eps
    self.scale = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    rms = x.square().mean(-1, keepdim=True).sqrt()
    return x / rms.clamp_min(self.eps) * self.scale


class Adapter(nn.Module):
  """LayerNorm -> [Linear -> GELU(tanh)]* -> Linear, token-wise."""

  def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int):
    super().__init__()
    self.norm = nn.LayerNorm(in_dim, eps=1e-6)
    widths = [in_dim, *hidden, out_dim]
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.norm(x)
    for layer in self.layers[:-1]:
      x = F.gelu(layer(x), approximate="tanh")
    return self.layers[-1](x)


class MAPBlock(nn.Module):
  """Attention pooling into K learned latents, post-RMSNorm, SwishGLU MLP (``heads.MAPBlock``)."""

  def __init__(self, n_latents: int, dim: int, n_heads: int, mlp_ratio: int):
    super().__init__()
    if dim % n_heads:
      raise ValueError(f"MAPBlock dim {dim} is not divisible by n_heads {n_heads}")
    self.k, self.d, self.h = n_latents, dim, n_heads
    self.projection = nn.Linear(dim, dim)
    self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)
    self.q = nn.Linear(dim, dim, bias=False)
    self.kv = nn.Linear(dim, 2 * dim, bias=False)
    self.proj_out = nn.Linear(dim, dim)
    self.norm1 = RMSNorm(dim)
    self.mlp_in = nn.Linear(dim, 2 * mlp_ratio * dim)
    self.mlp_out = nn.Linear(mlp_ratio * dim, dim)
    self.norm2 = RMSNorm(dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, k, d, h = x.shape[0], self.k, self.d, self.h
    x = self.projection(x)
    latents = self.latents.expand(b, k, d)
    heads = lambda t: t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)
    key, value = self.kv(x).chunk(2, dim=-1)
    attended = F.scaled_dot_product_attention(heads(self.q(latents)), heads(key), heads(value))
    attended = self.proj_out(attended.transpose(1, 2).reshape(b, k, d))
    latents = self.norm1(latents + attended)
    a, gate = self.mlp_in(latents).chunk(2, dim=-1)
    latents = self.norm2(latents + self.mlp_out(a * F.silu(gate)))
    return latents[:, 0] if k == 1 else latents


class Branch(nn.Module):
  def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, n_latents: int, n_heads: int,
               mlp_ratio: int):
    super().__init__()
    self.adapter = Adapter(in_dim, hidden, out_dim)
    self.projection = MAPBlock(n_latents, out_dim, n_heads, mlp_ratio)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    return self.projection(self.adapter(tokens))


class Heads(nn.Module):
  """All branches of one node: {branch: (B, D) or (B, K, D)}, as ``heads.A2VHeads``."""

  def __init__(self, in_dim: int, branch_shapes: Mapping[str, tuple[int, ...]],
               hidden: Mapping[str, Sequence[int]], n_heads: int, mlp_ratio: int):
    super().__init__()
    self.branches = nn.ModuleDict({
        b: Branch(in_dim, hidden[b], s[-1], 1 if len(s) == 1 else s[0], n_heads, mlp_ratio)
        for b, s in branch_shapes.items()})

  def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {b: m(tokens) for b, m in self.branches.items()}


def heads_like(flax_heads, in_dim: int) -> Heads:
  """The torch twin of a ``heads.A2VHeads`` module (same widths; weights still random)."""
  return Heads(in_dim, dict(flax_heads.branch_shapes), {b: flax_heads.hidden[b] for b in flax_heads.branch_shapes},
               flax_heads.n_heads, flax_heads.mlp_ratio)


def _dense(layer: nn.Linear, p: Mapping) -> None:
  layer.weight.copy_(torch.from_numpy(np.array(p["kernel"], np.float32).T))
  if layer.bias is not None:
    layer.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float32)))


@torch.no_grad()
def load_flax_params(model: Heads, params: Mapping) -> Heads:
  """Copies a flax params tree (``{branch: {adapter, projection}}``, arrays or numpy) into ``model``."""
  for b, branch in model.branches.items():
    ad, mp = params[b]["adapter"], params[b]["projection"]
    branch.adapter.norm.weight.copy_(torch.from_numpy(np.array(ad["LayerNorm_0"]["scale"], np.float32)))
    branch.adapter.norm.bias.copy_(torch.from_numpy(np.array(ad["LayerNorm_0"]["bias"], np.float32)))
    for i, layer in enumerate(branch.adapter.layers):
      _dense(layer, ad[f"Dense_{i}"])
    m = branch.projection
    for name in ("projection", "q", "kv", "proj_out", "mlp_in", "mlp_out"):
      _dense(getattr(m, name), mp[name])
    m.latents.copy_(torch.from_numpy(np.array(mp["latents"], np.float32)))
    m.norm1.scale.copy_(torch.from_numpy(np.array(mp["norm1"]["scale"], np.float32)))
    m.norm2.scale.copy_(torch.from_numpy(np.array(mp["norm2"]["scale"], np.float32)))
  return model


def flax_params(model: Heads) -> dict:
  """The inverse of ``load_flax_params``: a numpy tree shaped like the flax params."""
  def dense(layer):
    out = {"kernel": layer.weight.detach().numpy().T.copy()}
    if layer.bias is not None:
      out["bias"] = layer.bias.detach().numpy().copy()
    return out

  tree = {}
  for b, branch in model.branches.items():
    ad = {"LayerNorm_0": {"scale": branch.adapter.norm.weight.detach().numpy().copy(),
                          "bias": branch.adapter.norm.bias.detach().numpy().copy()}}
    ad.update({f"Dense_{i}": dense(layer) for i, layer in enumerate(branch.adapter.layers)})
    m = branch.projection
    mp = {name: dense(getattr(m, name)) for name in ("projection", "q", "kv", "proj_out", "mlp_in", "mlp_out")}
    mp.update(latents=m.latents.detach().numpy().copy(), norm1={"scale": m.norm1.scale.detach().numpy().copy()},
              norm2={"scale": m.norm2.scale.detach().numpy().copy()})
    tree[b] = {"adapter": ad, "projection": mp}
  return tree


class ReferenceVAEGenerator(nn.Module):
  """The reference's ``VAEGenerator`` layer layout (spec 5.2): flatten -> encoder ``Sequential`` of Linear, ReLU,
  Dropout(0.2), Linear, ReLU, Dropout, Linear(2Z) -> clamped (mu, logvar); decoder Linear(Z, H), ReLU, Dropout,
  Linear, ReLU, Dropout, Linear(S*D) -> (S, D). Its state-dict keys (``encoder.{0,3,6}``, ``decoder.{0,3,6}``) are
  what ``reference/checkpoints.py`` imports; used to write such files in tests and to check the imported decoder."""

  def __init__(self, feature_dim: int, hidden_dim: int, latent_dim: int, seq_len: int, dropout: float = 0.2):
    super().__init__()
    self.s, self.d, self.z = seq_len, feature_dim, latent_dim
    block = lambda a, b: [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    self.encoder = nn.Sequential(*block(seq_len * feature_dim, hidden_dim), *block(hidden_dim, hidden_dim),
                                 nn.Linear(hidden_dim, 2 * latent_dim))
    self.decoder = nn.Sequential(*block(latent_dim, hidden_dim), *block(hidden_dim, hidden_dim),
                                 nn.Linear(hidden_dim, seq_len * feature_dim))

  def decode(self, z: torch.Tensor) -> torch.Tensor:
    return self.decoder(z).reshape(z.shape[0], self.s, self.d)

  def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
    return mu.clamp(-5, 5), logvar.clamp(-5, 2)


class AstFeatures:
  """Runs a frozen torch AST on fbank rows, as the reference does for every sample in every epoch.

  Args:
    model: a ``transformers.ASTModel`` (eval mode, no grad).
    fbank: (N, frames, mel) float32 tensor, the stored input of every sample.
  """

  def __init__(self, model: nn.Module, fbank: torch.Tensor):
    self.model = model.eval().requires_grad_(False)
    self.fbank = fbank

  def __call__(self, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
      return self.model(input_values=self.fbank[rows]).last_hidden_state


class SequentialFedAvg:
  """The reference's round: per-client model copies trained one after another, then FedAvg.

  Every round each participating client loads the global ``state_dict`` (its AdamW moments survive,
  as in the reference), runs its local epochs with one AdamW per branch, and the server sets the
  global weights to the (uniform or sample-weighted) mean of the clients' ``state_dict``s.

  Args:
    global_model: the server heads, already holding the initial weights.
    num_clients: C; each gets a deep copy of ``global_model`` and its own optimisers.
    learning_rates: {branch: epoch -> learning rate} (constant or the config's schedules).
    weight_decay: {branch: AdamW weight decay}.
    features: ``rows (LongTensor) -> tokens (B, T, D)``: cached features, or ``AstFeatures``.
    labels: (N,) class index of every row.
    targets: {branch: (num_classes, ...)} per-class targets.
    clip_gradients: global-norm clipping at 1.0 per branch (``optimizer_clip_gradients``).
    weighted: FedAvg weighted by sample counts instead of uniform.
  """

  def __init__(self, global_model: Heads, num_clients: int, *,
               learning_rates: Mapping[str, Callable[[int], float]], weight_decay: Mapping[str, float],
               features: Callable[[torch.Tensor], torch.Tensor], labels: np.ndarray,
               targets: Mapping[str, np.ndarray], clip_gradients: bool = False, weighted: bool = False):
    self.global_model = global_model
    self.clients = [copy.deepcopy(global_model) for _ in range(num_clients)]
    self.optimizers = [{b: torch.optim.AdamW(m.branches[b].parameters(), lr=learning_rates[b](0),
                                             weight_decay=weight_decay[b], betas=(0.9, 0.999), eps=1e-8)
                        for b in m.branches} for m in self.clients]
    self.learning_rates = learning_rates
    self.features = features
    self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    self.targets = {b: torch.as_tensor(np.asarray(t, np.float32)) for b, t in targets.items()}
    self.clip_gradients = clip_gradients
    self.weighted = weighted

  def train_client(self, c: int, batches: Batches, epoch0: int) -> dict[str, float]:
    """Local epochs of client ``c``; returns the mean loss per branch of its last epoch."""
    model, opts = self.clients[c], self.optimizers[c]
    model.train()
    last: dict[str, float] = {}
    for e, epoch in enumerate(batches):
      for b, opt in opts.items():
        for group in opt.param_groups:
          group["lr"] = self.learning_rates[b](epoch0 + e)
      sums = {b: 0.0 for b in opts}
      for rows in epoch:
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = model(self.features(rows))
        labels = self.labels[rows]
        losses = {b: F.mse_loss(o, self.targets[b][labels]) for b, o in out.items()}
        for opt in opts.values():
          opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        for b, opt in opts.items():
          if self.clip_gradients:
            torch.nn.utils.clip_grad_norm_(model.branches[b].parameters(), 1.0)
          opt.step()
        for b, l in losses.items():
          sums[b] += float(l.detach())
      last = {b: s / max(len(epoch), 1) for b, s in sums.items()}
    return last

  @torch.no_grad()
  def _average(self, chosen: Sequence[int], weights: Sequence[float]) -> None:
    states = [self.clients[c].state_dict() for c in chosen]
    w = torch.tensor(weights, dtype=torch.float32)
    w = w / w.sum()
    mean = {k: torch.tensordot(w, torch.stack([s[k] for s in states]), dims=1) for k in states[0]}
    self.global_model.load_state_dict(mean)

  def round(self, batches: Sequence[Batches], epoch0: int = 0) -> dict[str, list[float]]:
    """One round over all clients with data; ``batches[c][epoch][step]`` are row indices.

    Returns:
      {f"{branch}_loss": per-client last-epoch loss} (NaN for clients without data).
    """
    state = self.global_model.state_dict()
    metrics: dict[str, list[float]] = {}
    chosen, weights = [], []
    for c, client_batches in enumerate(batches):
      count = sum(len(r) for r in client_batches[0]) if client_batches else 0
      losses: dict[str, float] = {}
      if count:
        self.clients[c].load_state_dict(state)
        losses = self.train_client(c, client_batches, epoch0)
        chosen.append(c)
        weights.append(float(count) if self.weighted else 1.0)
      for b in self.global_model.branches:
        metrics.setdefault(f"{b}_loss", []).append(losses.get(b, float("nan")))
    if chosen:
      self._average(chosen, weights)
    return metrics


def set_threads(n: int) -> None:
  """Intra-op threads = ``n`` (the JAX CPU client's pool), one inter-op thread."""
  torch.set_num_threads(int(n))
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:  # only settable before the first parallel op
    pass


def epoch_batches(rng: np.random.Generator, rows: np.ndarray, batch_size: int, epochs: int) -> list[list[np.ndarray]]:
  """Shuffled mini-batches (drop_last=False, like the reference's DataLoader) for each epoch."""
  out = []
  for _ in range(epochs):
    order = rows[rng.permutation(len(rows))]
    out.append([order[i:i + batch_size] for i in range(0, len(order), batch_size)])
  return out


def constant(lr: float) -> Callable[[int], float]:
  return lambda epoch: lr


def schedules_from_config(cfg) -> dict[str, Callable[[int], float]]:
  """The config's per-branch learning-rate schedules as plain ``epoch -> float`` functions."""
  import functools

  from a2v_jax.federated import optim  # the same formulas the JAX engine evaluates
  table = optim.branch_schedules(cfg)
  # Cached: evaluating a jnp formula per client and epoch would bill JAX dispatch to the torch loop.
  return {b: functools.lru_cache(maxsize=None)(lambda epoch, f=f: float(f(np.float32(epoch))))
          for b, f in table.items()}


def torch_weight_decay(cfg) -> dict[str, float]:
  return {b: float(getattr(cfg.train, f"{b}_adapter_weight_decay")) for b in cfg.branches}


def build_from_flax(flax_heads, params: Mapping, in_dim: int, num_clients: int, cfg, *,
                    features: Callable[[torch.Tensor], torch.Tensor], labels: np.ndarray,
                    targets: Mapping[str, np.ndarray],
                    learning_rates: Optional[Mapping[str, Callable[[int], float]]] = None) -> SequentialFedAvg:
  """A ``SequentialFedAvg`` whose global model holds exactly the given JAX params.

  Args:
    flax_heads: the ``A2VHeads`` the params belong to (widths are read from it).
    params: its flax params (the server's initial params).
    in_dim: feature width D.
    num_clients: C.
    cfg: the run config (learning rates, schedules, weight decay, clipping, aggregation mode).
    features, labels, targets: see ``SequentialFedAvg``.
    learning_rates: override of the config's schedules (e.g. constants for speed runs).
  """
  model = load_flax_params(heads_like(flax_heads, in_dim), params)
  return SequentialFedAvg(
      model, num_clients, learning_rates=learning_rates or schedules_from_config(cfg),
      weight_decay=torch_weight_decay(cfg), features=features, labels=labels, targets=targets,
      clip_gradients=cfg.train.optimizer_clip_gradients,
      weighted=cfg.federation.adapter_aggregation_mode == "weighted")
