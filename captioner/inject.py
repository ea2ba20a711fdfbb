"""How the image enters the decoder: one small interface, three cores, chosen by config decoder.inject.

Layer 0 of the decoder computes xp_t = W_xh·x_t + b for its input word; a core adds the image term to it. Each core
splits that term into what is computed once per image (precompute) and what is done at each step t (step):

    every      precompute W_ih·v          step xp_t + W_ih·v at every t       (NeuralTalk, Karpathy & Fei-Fei 2015)
    first      precompute W_ih·v          step xp_t + W_ih·v at t = 0 only    (Show and Tell, Vinyals et al. 2015)
    attention  precompute a_i, W_a·a_i    step xp_t + W_ih·z_t                (Show, Attend and Tell, Xu et al. 2015)

with z_t = beta_t * sum_i alpha_ti a_i, alpha_t = softmax_i(w^T tanh(W_a a_i + U_a h_{t-1})), beta_t = sigmoid(f_beta
h_{t-1}), h_{t-1} layer 0's previous state. The precomputed tensors have the images on axis 0, so searches repeat them
per beam like any other row.

The cores own no parameters: W_ih stays layer 0's and the attention MLP the decoder's ``attend`` module, so the
checkpoint's parameter names (decoder.layers.0.W_ih.*, decoder.attend.*) do not depend on the core.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from .features import ImageFeatures

Precomputed = tuple[torch.Tensor, ...]  # per core, each (N, ...)


class Injection(Protocol):
    def precompute(self, features: ImageFeatures) -> Precomputed:
        """What is computed once per image."""

    def step(self, xp: torch.Tensor, pre: Precomputed, h: torch.Tensor, t: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """xp (N, G*H) layer 0's input pre-activation at step t, h (N, H) its previous state -> xp plus the image
        term, and alpha_t (N, P) when the core attends (else None)."""


class EveryStep:
    """h_t = tanh(W_xh·x_t + W_hh·h_{t-1} + W_ih·v + b) (and the same sum into the GRU/LSTM gates) at every step."""

    def __init__(self, W_ih: nn.Linear) -> None:
        self.W_ih = W_ih

    def precompute(self, features: ImageFeatures) -> Precomputed:
        return (self.W_ih(features.fc),)  # W_ih·v (N, G*H)

    def step(self, xp, pre, h, t):
        return xp + pre[0], None


class FirstStep(EveryStep):
    """W_ih·v at t = 0 only: later steps know the image through h alone."""

    def step(self, xp, pre, h, t):
        return (xp + pre[0] if t == 0 else xp), None


class SoftAttention(nn.Module):
    """The attention MLP: e_ti = w^T tanh(W_a a_i + U_a h_{t-1}), alpha_t = softmax_i e_t,
    z_t = beta_t sum_i alpha_ti a_i (beta_t = sigmoid(f_beta h_{t-1}) with the gate, else 1)."""

    def __init__(self, annotation_dim: int, hidden_dim: int, attention_dim: int, gate: bool) -> None:
        super().__init__()
        self.W_a = nn.Linear(annotation_dim, attention_dim)  # carries the bias
        self.U_a = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.w = nn.Linear(attention_dim, 1, bias=False)
        self.f_beta = nn.Linear(hidden_dim, 1) if gate else None

    def forward(self, a: torch.Tensor, wa: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a (N, P, C), wa = W_a a (N, P, A), h = h_{t-1} (N, H) -> z_t (N, C), alpha_t (N, P) (float32)."""
        e = self.w(torch.tanh(wa + self.U_a(h)[:, None])).squeeze(-1)  # (N, P)
        alpha = e.float().softmax(-1)  # float32: the heatmaps sum to 1 at any autocast precision
        z = torch.bmm(alpha[:, None].to(a.dtype), a).squeeze(1)  # (N, C)
        if self.f_beta is not None:
            z = torch.sigmoid(self.f_beta(h)) * z
        return z, alpha


class Attend:
    """h_t = tanh(W_xh·x_t + W_hh·h_{t-1} + W_ih·z_t + b): the image term is the soft-attention context z_t."""

    def __init__(self, W_ih: nn.Linear, attention: SoftAttention) -> None:
        self.W_ih, self.attention = W_ih, attention

    def precompute(self, features: ImageFeatures) -> Precomputed:
        if features.att is None:
            raise ValueError("an attention decoder needs the image grid: ImageFeatures.att is None (features from "
                             "model.encode() of an attention model carry it)")
        wa = self.attention.W_a(features.att)  # (N, P, A)
        # a_i in W_a·a_i's dtype (autocast's): the copies a search repeats per beam are then no larger than needed
        return features.att.to(wa.dtype), wa

    def step(self, xp, pre, h, t):
        z, alpha = self.attention(*pre, h)
        return xp + self.W_ih(z), alpha


def build_injection(kind: str, W_ih: nn.Linear, attention: SoftAttention | None) -> Injection:
    """The core config decoder.inject names ('every', 'first' or 'attention', which reads ``attention``)."""
    if kind == "attention":
        return Attend(W_ih, attention)
    return FirstStep(W_ih) if kind == "first" else EveryStep(W_ih)
