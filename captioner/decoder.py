"""Recurrent caption decoder, written out by hand so that the image can enter at every step:

    rnn:  h_t = tanh(W_xh·x_t + W_hh·h_{t-1} + W_ih·v + b)
    gru/lstm: the same W_xh·x_t + W_ih·v (+ b) feeds the gates of the standard cells.

torch's nn.RNN/GRU/LSTM take no per-step side input, so each layer computes its input pre-activation W_xh·x for all
steps at once and loops only over W_hh·h. Layer 0 reads word embeddings and receives the image; layer l > 0 reads
h^(l-1)_t and its own h^(l)_{t-1}. What the image term is - W_ih·v at every step, W_ih·v at t = 0 only, or W_ih·z_t
from soft attention over the conv grid - is the decoder's injection core (captioner/inject.py), chosen by config
decoder.inject when the decoder is built. An attention core reads layer 0's own h_{t-1}, so the layers still run one
after another over all steps in training.
A ``DecoderEnsemble`` runs several such decoders over the same features and averages their next-word probabilities.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DecoderConfig
from .features import ImageFeatures
from .inject import Precomputed, SoftAttention, build_injection

GATES = {"rnn": 1, "gru": 3, "lstm": 4}
State = tuple[torch.Tensor, ...]  # (h,) or (h, c), each (L, N, H)


class RecurrentLayer(nn.Module):
    def __init__(self, cell: str, input_dim: int, hidden_dim: int, image_dim: int | None) -> None:
        super().__init__()
        g = GATES[cell] * hidden_dim
        self.cell = cell
        self.W_xh = nn.Linear(input_dim, g)  # carries b
        self.W_hh = nn.Linear(hidden_dim, g, bias=cell == "gru")  # GRU keeps b_hn inside r * (W_hn h + b_hn)
        self.W_ih = nn.Linear(image_dim, g, bias=False) if image_dim else None

    def step(self, xp: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step from the input pre-activation xp (N, G*H) and the previous state (N, H)."""
        hp = self.W_hh(h)  # (N, G*H)
        if self.cell == "rnn":
            return torch.tanh(xp + hp), None
        if self.cell == "gru":
            xr, xz, xn = xp.chunk(3, 1)
            hr, hz, hn = hp.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return n + z * (h - n), None  # = (1 - z) * n + z * h
        i, f, g, o = (xp + hp).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, image_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        H, L = cfg.hidden_dim, cfg.num_layers
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=0)
        self.layers = nn.ModuleList(
            RecurrentLayer(cfg.cell, cfg.embed_dim if l == 0 else H, H, image_dim if l == 0 else None) for l in range(L)
        )
        n_states = 2 if cfg.cell == "lstm" else 1
        h0 = torch.zeros(n_states, L, H)
        if cfg.learn_h0:
            self.h0 = nn.Parameter(h0)
        else:
            self.register_buffer("h0", h0)
        self.drop = nn.Dropout(cfg.dropout)
        self.W_hy = nn.Linear(H, vocab_size)
        # the attention MLP exists only for the attention core; its parameters are the checkpoint's decoder.attend.*
        self.attend = (SoftAttention(image_dim, H, cfg.attention_dim, cfg.attention_gate)
                       if cfg.inject == "attention" else None)
        self.inject = build_injection(cfg.inject, self.layers[0].W_ih, self.attend)

    def init_state(self, n: int) -> State:
        return tuple(s[:, None].expand(-1, n, -1).contiguous() for s in self.h0)  # each (L, N, H)

    def precompute(self, features: ImageFeatures) -> Precomputed:
        """What the injection core computes once per image (W_ih·v, or a_i and W_a·a_i), each (N, ...)."""
        return self.inject.precompute(features)

    def forward(self, features: ImageFeatures, tokens: torch.Tensor, return_hidden: bool = False,
                return_attention: bool = False):
        """Teacher forcing: features, tokens (N, T) starting with <bos> -> logits (N, T, V) (or the top layer's
        hidden states (N, T, H)); with return_attention also alpha (N, T, P), None unless the core attends."""
        N, T = tokens.shape
        pre = self.precompute(features)
        state = self.init_state(N)
        x = self.drop(self.embed(tokens))  # (N, T, E)
        alphas: list[torch.Tensor] = []
        for l, layer in enumerate(self.layers):
            xp = layer.W_xh(x)  # (N, T, G*H): W_xh·x_t + b for all steps in one matmul
            h = state[0][l]
            c = state[1][l] if len(state) == 2 else None
            outs = []
            for t in range(T):
                xp_t = xp[:, t]
                if l == 0:  # the image enters layer 0
                    xp_t, alpha = self.inject.step(xp_t, pre, h, t)
                    if alpha is not None:
                        alphas.append(alpha)
                h, c = layer.step(xp_t, h, c)
                outs.append(h)
            x = self.drop(torch.stack(outs, 1))  # (N, T, H)
        out = x if return_hidden else self.W_hy(x)
        if return_attention:
            return out, torch.stack(alphas, 1) if alphas else None
        return out

    def step(self, tokens: torch.Tensor, state: State, pre: Precomputed, t: int
             ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """One decoding step: tokens (N,), state, pre = precompute(features) -> logits (N, V), the new state, and
        the step's alpha (N, P) (None unless the core attends)."""
        x = self.embed(tokens)  # (N, E)
        hs, cs = [], []
        alpha = None
        for l, layer in enumerate(self.layers):
            xp = layer.W_xh(x)  # (N, G*H)
            h = state[0][l]
            if l == 0:  # the image enters layer 0
                xp, alpha = self.inject.step(xp, pre, h, t)
            h, c = layer.step(xp, h, state[1][l] if len(state) == 2 else None)
            hs.append(h)
            cs.append(c)
            x = h
        new_state = (torch.stack(hs),) + ((torch.stack(cs),) if len(state) == 2 else ())
        return self.W_hy(x), new_state, alpha


class DecoderEnsemble(nn.Module):
    """cfg.members decoders of one shape over the same features, mixed at every step: log p(w) = log mean_m p_m(w).

    It has Decoder's interface (forward, init_state, precompute, step), so search, training and SCST run on it
    unchanged; the "logits" it returns are already normalised log-probabilities, which log_softmax leaves as they are.
    The members' states are stacked along the layer axis and their precomputed tensors joined in one tuple, so beam
    search repeats and reorders them like a single decoder's.
    """

    def __init__(self, cfg: DecoderConfig, vocab_size: int, image_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        one = replace(cfg, members=1)
        self.members = nn.ModuleList(Decoder(one, vocab_size, image_dim) for _ in range(cfg.members))

    @staticmethod
    def mix(logits: list[torch.Tensor]) -> torch.Tensor:
        logp = torch.stack([F.log_softmax(x.float(), -1) for x in logits])  # (M, ..., V)
        return torch.logsumexp(logp, 0) - math.log(len(logits))

    def forward(self, features: ImageFeatures, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: features, tokens (N, T) -> mixture log-probabilities (N, T, V)."""
        return self.mix([m(features, tokens) for m in self.members])

    def init_state(self, n: int) -> State:
        return tuple(torch.cat(s, 0) for s in zip(*(m.init_state(n) for m in self.members)))  # each (M*L, N, H)

    def precompute(self, features: ImageFeatures) -> Precomputed:
        return sum((m.precompute(features) for m in self.members), ())  # member m's are the m-th len/M of them

    def step(self, tokens: torch.Tensor, state: State, pre: Precomputed, t: int
             ) -> tuple[torch.Tensor, State, None]:
        L, k = self.cfg.num_layers, len(pre) // len(self.members)
        logits, states = [], []
        for i, m in enumerate(self.members):
            out, s, _ = m.step(tokens, tuple(x[i * L:(i + 1) * L] for x in state), pre[i * k:(i + 1) * k], t)
            logits.append(out)
            states.append(s)
        return self.mix(logits), tuple(torch.cat(s, 0) for s in zip(*states)), None


def build_decoder(cfg: DecoderConfig, vocab_size: int, image_dim: int) -> Decoder | DecoderEnsemble:
    return (Decoder if cfg.members == 1 else DecoderEnsemble)(cfg, vocab_size, image_dim)
