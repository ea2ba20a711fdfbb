"""Recurrent caption decoder with the image injected through W_ih·v, written out by hand.

torch's nn.RNN/GRU/LSTM take no per-step side input, so each layer computes its input pre-activation
W_xh·x for all steps at once, adds W_ih·v (computed once per image), and loops only over W_hh·h:

    rnn:  h_t = tanh(W_xh·x_t + W_hh·h_{t-1} + W_ih·v + b)
    gru/lstm: the same W_xh·x_t + W_ih·v (+ b) feeds the gates of the standard cells.

Layer 0 reads word embeddings and receives the image; layer l > 0 reads h^(l-1)_t and its own h^(l)_{t-1}.

With inject=attention (Xu et al. 2015, soft attention) the image is the encoder's conv grid a_1..a_P and layer 0's
image term is W_ih·z_t instead of W_ih·v, with z_t = beta_t * sum_i alpha_ti a_i,
alpha_t = softmax_i(w^T tanh(W_a a_i + U_a h_{t-1})): W_a a_i is computed once per image (image_proj), the rest
per step. h_{t-1} is layer 0's own state, so the layers still run one after another over all steps in training.
A ``DecoderEnsemble`` runs several such decoders over the same v and averages their next-word probabilities.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DecoderConfig

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


class SoftAttention(nn.Module):
    """Deterministic soft attention over P annotation vectors a_i (N, P, C), driven by the previous hidden state."""

    def __init__(self, annotation_dim: int, hidden_dim: int, attention_dim: int, gate: bool) -> None:
        super().__init__()
        self.C = annotation_dim
        self.W_a = nn.Linear(annotation_dim, attention_dim)  # carries the bias
        self.U_a = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.w = nn.Linear(attention_dim, 1, bias=False)
        self.f_beta = nn.Linear(hidden_dim, 1) if gate else None

    def precompute(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (N, C, S, S) -> [a_i ; W_a a_i] (N, P=S*S, C+A), one tensor so that searches repeat and
        reorder it like W_ih·v."""
        a = grid.flatten(2).transpose(1, 2)  # (N, P, C), cells in row-major order
        wa = self.W_a(a)
        return torch.cat([a.to(wa.dtype), wa], -1)

    def forward(self, ann: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ann = precompute(grid) (N, P, C+A), h = h_{t-1} (N, H) -> z_t (N, C), alpha_t (N, P) (float32)."""
        a, wa = ann[..., :self.C], ann[..., self.C:]
        e = self.w(torch.tanh(wa + self.U_a(h)[:, None])).squeeze(-1)  # (N, P)
        alpha = e.float().softmax(-1)  # float32: the heatmaps sum to 1 at any autocast precision
        z = torch.bmm(alpha[:, None].to(a.dtype), a).squeeze(1)  # (N, C)
        if self.f_beta is not None:
            z = torch.sigmoid(self.f_beta(h)) * z
        return z, alpha


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
        self.attend = (SoftAttention(image_dim, H, cfg.attention_dim, cfg.attention_gate)
                       if cfg.inject == "attention" else None)

    def init_state(self, n: int) -> State:
        return tuple(s[:, None].expand(-1, n, -1).contiguous() for s in self.h0)  # each (L, N, H)

    def image_proj(self, v: torch.Tensor) -> torch.Tensor:
        """Computed once per image: W_ih·v (N, G*H), or for attention [a_i ; W_a a_i] (N, P, C+A) from the grid."""
        return self.attend.precompute(v) if self.attend is not None else self.layers[0].W_ih(v)

    def _inject(self, xp: torch.Tensor, iv: torch.Tensor, t: int) -> torch.Tensor:
        return xp + iv if (self.cfg.inject == "every" or t == 0) else xp

    def forward(self, v: torch.Tensor, tokens: torch.Tensor, return_hidden: bool = False,
                return_attention: bool = False):
        """Teacher forcing: v (N, D) or grid (N, C, S, S), tokens (N, T) starting with <bos> -> logits (N, T, V)
        (or the top layer's hidden states (N, T, H)); with return_attention also alpha (N, T, P) (attention only)."""
        N, T = tokens.shape
        iv = self.image_proj(v)
        state = self.init_state(N)
        x = self.drop(self.embed(tokens))  # (N, T, E)
        alphas: list[torch.Tensor] = []
        for l, layer in enumerate(self.layers):
            xp = layer.W_xh(x)  # (N, T, G*H): all steps in one matmul
            if l == 0 and self.cfg.inject == "every":
                xp = xp + iv[:, None]
            elif l == 0 and self.cfg.inject == "first":
                xp = torch.cat([xp[:, :1] + iv[:, None], xp[:, 1:]], 1)
            h = state[0][l]
            c = state[1][l] if len(state) == 2 else None
            outs = []
            for t in range(T):
                if l == 0 and self.attend is not None:
                    z, alpha = self.attend(iv, h)
                    alphas.append(alpha)
                    h, c = layer.step(xp[:, t] + layer.W_ih(z), h, c)
                else:
                    h, c = layer.step(xp[:, t], h, c)
                outs.append(h)
            x = self.drop(torch.stack(outs, 1))  # (N, T, H)
        out = x if return_hidden else self.W_hy(x)
        if return_attention:
            return out, torch.stack(alphas, 1) if alphas else None
        return out

    def step(self, tokens: torch.Tensor, state: State, iv: torch.Tensor, t: int, return_attention: bool = False):
        """One decoding step: tokens (N,), state, iv = image_proj(v) -> logits (N, V), new state
        (and with return_attention the step's alpha (N, P), None without attention)."""
        x = self.embed(tokens)  # (N, E)
        hs, cs = [], []
        alpha = None
        for l, layer in enumerate(self.layers):
            xp = layer.W_xh(x)
            if l == 0 and self.attend is not None:
                z, alpha = self.attend(iv, state[0][0])
                xp = xp + layer.W_ih(z)
            elif l == 0:
                xp = self._inject(xp, iv, t)
            h, c = layer.step(xp, state[0][l], state[1][l] if len(state) == 2 else None)
            hs.append(h)
            cs.append(c)
            x = h
        new_state = (torch.stack(hs),) + ((torch.stack(cs),) if len(state) == 2 else ())
        return (self.W_hy(x), new_state, alpha) if return_attention else (self.W_hy(x), new_state)


class DecoderEnsemble(nn.Module):
    """cfg.members decoders of one shape over the same v, mixed at every step: log p(w) = log mean_m p_m(w).

    It has Decoder's interface (forward, init_state, image_proj, step), so search, training and SCST run on it
    unchanged; the "logits" it returns are already normalised log-probabilities, which log_softmax leaves as they are.
    The members' states are stacked along the layer axis and their image projections along the feature axis, so
    beam search reorders them like a single decoder's.
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

    def forward(self, v: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: v (N, D), tokens (N, T) -> mixture log-probabilities (N, T, V)."""
        return self.mix([m(v, tokens) for m in self.members])

    def init_state(self, n: int) -> State:
        return tuple(torch.cat(s, 0) for s in zip(*(m.init_state(n) for m in self.members)))  # each (M*L, N, H)

    def image_proj(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.image_proj(v) for m in self.members], 1)  # (N, M*G*H)

    def step(self, tokens: torch.Tensor, state: State, iv: torch.Tensor, t: int, return_attention: bool = False):
        if return_attention:
            raise ValueError("a decoder ensemble has no attention maps")
        L = self.cfg.num_layers
        logits, states = [], []
        for i, (m, iv_m) in enumerate(zip(self.members, iv.chunk(len(self.members), 1))):
            out, s = m.step(tokens, tuple(x[i * L:(i + 1) * L] for x in state), iv_m, t)
            logits.append(out)
            states.append(s)
        return self.mix(logits), tuple(torch.cat(s, 0) for s in zip(*states))


def build_decoder(cfg: DecoderConfig, vocab_size: int, image_dim: int) -> Decoder | DecoderEnsemble:
    return (Decoder if cfg.members == 1 else DecoderEnsemble)(cfg, vocab_size, image_dim)
