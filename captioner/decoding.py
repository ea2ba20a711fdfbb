"""Batched caption search: every image and every beam advance together in one tensor program.

All functions take the decoder and the ImageFeatures of B images and return a ``Hypotheses`` holding
n candidates per image. Sequences are word ids followed by <eos> and then <pad>. ``decode`` picks the search a
GenerationConfig asks for; ``max_length`` is always given resolved (CaptionModel.generate fills in the model's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoder import Decoder
from .features import ImageFeatures
from .generation import GenerationConfig
from .inject import Precomputed
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

NEG_INF = float("-inf")


@dataclass
class Hypotheses:
    tokens: torch.Tensor  # (B, n, T) word ids, <eos>, then <pad>
    log_probs: torch.Tensor  # (B, n) sum of token log-probabilities, <eos> included
    scores: torch.Tensor  # (B, n) ranking score (log_probs / length ** length_penalty), best first
    lengths: torch.Tensor  # (B, n) words + 1 for <eos>
    attention: torch.Tensor | None = None  # (B, n, T, P) alpha of each step (zeros after <eos>), when asked for


def _lengths(seqs: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including the first <eos> (all tokens if none)."""
    is_eos = seqs == EOS_ID
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(seqs[..., 0], seqs.size(-1) - 1))
    return first + 1


def _mask_specials(logp: torch.Tensor, t: int, max_length: int) -> torch.Tensor:
    # <unk> is never a useful word to show, never matches a reference, and under self-critical training it would
    # earn reward by matching the <unk>s of rare words in the encoded references
    logp[:, PAD_ID] = NEG_INF
    logp[:, BOS_ID] = NEG_INF
    logp[:, UNK_ID] = NEG_INF
    if t == 0 and max_length > 0:  # an empty caption says nothing: an undertrained model may rank <eos> first
        logp[:, EOS_ID] = NEG_INF
    if t == max_length:  # out of room: the only move left is <eos>
        eos = logp[:, EOS_ID].clone()
        logp.fill_(NEG_INF)
        logp[:, EOS_ID] = eos
    return logp


def _block_repeated_trigrams(logp: torch.Tensor, seqs: torch.Tensor) -> None:
    """Forbid any token that would complete a trigram already present in the hypothesis."""
    if seqs.size(1) < 3:
        return
    a, b = seqs[:, -2:-1], seqs[:, -1:]
    match = (seqs[:, :-2] == a) & (seqs[:, 1:-1] == b)  # (N, t-2): earlier (a, b) bigrams
    banned = torch.where(match, seqs[:, 2:], torch.full_like(seqs[:, 2:], PAD_ID))  # PAD is already -inf
    logp.scatter_(1, banned, NEG_INF)


class AttentionUnavailableError(ValueError):
    """Attention maps were asked of a model without an attention decoder."""


def _repeat(pre: Precomputed, k: int) -> Precomputed:
    """decoder.precompute()'s tensors for k rows (beams or samples) per image, an image's rows together."""
    return tuple(p.repeat_interleave(k, 0) for p in pre)


def _check_attention(decoder: Decoder, attention: bool) -> None:
    if attention and getattr(decoder, "attend", None) is None:
        raise AttentionUnavailableError("this model's decoder has no attention (config decoder.inject is "
                                        f"{decoder.cfg.inject!r}): attention maps need a model trained with "
                                        "`captioner train --inject attention`")


@torch.no_grad()
def greedy_search(decoder: Decoder, features: ImageFeatures, max_length: int, attention: bool = False) -> Hypotheses:
    _check_attention(decoder, attention)
    B, dev = len(features), features.device
    pre = decoder.precompute(features)
    state = decoder.init_state(B)
    tok = torch.full((B,), BOS_ID, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    total = torch.zeros(B, device=dev)
    out, att = [], []
    for t in range(max_length + 1):
        logits, state, alpha = decoder.step(tok, state, pre, t)
        logp = _mask_specials(F.log_softmax(logits.float(), -1), t, max_length)
        lp, tok = logp.max(-1)
        tok = tok.masked_fill(done, PAD_ID)
        total += lp.masked_fill(done, 0.0)
        out.append(tok)
        if attention:
            att.append(alpha.masked_fill(done[:, None], 0.0))
        done |= tok == EOS_ID
        if done.all():
            break
    seqs = torch.stack(out, 1)[:, None]  # (B, 1, T)
    lengths = _lengths(seqs)
    maps = torch.stack(att, 1)[:, None] if att else None  # (B, 1, T, P)
    return Hypotheses(seqs, total[:, None], total[:, None].clone(), lengths, maps)


@torch.no_grad()
def beam_search(decoder: Decoder, features: ImageFeatures, gen: GenerationConfig, max_length: int) -> Hypotheses:
    """Beam search over all B images at once (B*K rows, K = gen.beam_size), for gen.num_captions captions each.

    A beam that emits <eos> stays in its slot with a frozen score (it may only extend with <pad> at
    no cost), so every image keeps exactly K hypotheses; with K = 1 this is greedy search.
    The final n-best list is ranked by log_prob / length ** length_penalty.
    """
    _check_attention(decoder, gen.attention)
    B, K, dev = len(features), gen.beam_size, features.device
    pre = _repeat(decoder.precompute(features), K)  # each (B*K, ...): the beams of an image share its rows
    state = decoder.init_state(B * K)
    tok = torch.full((B * K,), BOS_ID, dtype=torch.long, device=dev)
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=dev)
    beam_lp = torch.full((B, K), NEG_INF, device=dev)
    beam_lp[:, 0] = 0.0  # all beams start identical: expand only the first
    done = torch.zeros(B * K, dtype=torch.bool, device=dev)
    row0 = torch.arange(B, device=dev)[:, None] * K  # (B, 1)
    att = None  # (B*K, t, P): each beam's attention history, reordered with it
    for t in range(max_length + 1):
        logits, state, alpha = decoder.step(tok, state, pre, t)
        if gen.attention:
            step_att = alpha.masked_fill(done[:, None], 0.0)[:, None]
            att = step_att if att is None else torch.cat([att, step_att], 1)
        logp = _mask_specials(F.log_softmax(logits.float(), -1), t, max_length)  # (B*K, V)
        if gen.block_trigrams:
            _block_repeated_trigrams(logp, seqs)
        logp[done] = NEG_INF
        logp[done, PAD_ID] = 0.0
        V = logp.size(1)
        cand = (beam_lp.view(-1, 1) + logp).view(B, K * V)
        beam_lp, idx = cand.topk(K, dim=1)  # (B, K)
        src = (row0 + idx // V).view(-1)  # (B*K,) parent row of each new beam
        tok = (idx % V).view(-1)
        seqs = torch.cat([seqs[src], tok[:, None]], 1)
        state = tuple(s[:, src] for s in state)
        if att is not None:
            att = att[src]
        done = done[src] | (tok == EOS_ID)
        if done.all():
            break
    seqs = seqs.view(B, K, -1)
    lengths = _lengths(seqs)
    lp = gen.length_penalty
    scores = beam_lp / lengths.float() ** lp if lp else beam_lp.clone()
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :gen.num_captions]
    pick = lambda x: x.gather(1, order if x.dim() == 2 else order[..., None].expand(-1, -1, x.size(-1)))  # noqa: E731
    maps = None
    if att is not None:
        att = att.view(B, K, *att.shape[1:])  # (B, K, T, P)
        maps = att.gather(1, order[..., None, None].expand(-1, -1, *att.shape[2:]))
    return Hypotheses(pick(seqs), pick(beam_lp), pick(scores), pick(lengths), maps)


@torch.no_grad()
def sample(decoder: Decoder, features: ImageFeatures, gen: GenerationConfig, max_length: int,
           generator: torch.Generator | None = None) -> Hypotheses:
    """gen.num_captions ancestral samples per image at gen.temperature from the gen.top_k most likely words
    (0 = all).

    log_probs are under the model itself (temperature 1), so samples are comparable; each image's
    samples come back most likely first.
    """
    _check_attention(decoder, gen.attention)
    B, n, dev = len(features), gen.num_captions, features.device
    pre = _repeat(decoder.precompute(features), n)
    state = decoder.init_state(B * n)
    tok = torch.full((B * n,), BOS_ID, dtype=torch.long, device=dev)
    done = torch.zeros(B * n, dtype=torch.bool, device=dev)
    total = torch.zeros(B * n, device=dev)
    out, att = [], []
    for t in range(max_length + 1):
        logits, state, alpha = decoder.step(tok, state, pre, t)
        if gen.attention:
            att.append(alpha.masked_fill(done[:, None], 0.0))
        logp = _mask_specials(F.log_softmax(logits.float(), -1), t, max_length)
        # shift the best word to 0 before dividing: the quotient is then <= 0, the best word's exactly 0, and
        # softmax never sees inf - inf; a temperature below float32's smallest normal (1e-300 would round to 0,
        # and 0/0 is nan) is raised to it, which is greedy decoding either way
        scaled = (logp - logp.amax(-1, keepdim=True)) / max(gen.temperature, torch.finfo(logp.dtype).tiny)
        if gen.top_k and gen.top_k < scaled.size(1):
            kth = scaled.topk(gen.top_k, dim=1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, NEG_INF)
        tok = torch.multinomial(F.softmax(scaled, -1), 1, generator=generator).squeeze(1)
        total += logp.gather(1, tok[:, None]).squeeze(1).masked_fill(done, 0.0)
        tok = tok.masked_fill(done, PAD_ID)
        out.append(tok)
        done |= tok == EOS_ID
        if done.all():
            break
    seqs = torch.stack(out, 1).view(B, n, -1)
    total = total.view(B, n)
    order = total.argsort(dim=1, descending=True, stable=True)
    seqs = seqs.gather(1, order[..., None].expand_as(seqs))
    total = total.gather(1, order)
    maps = None
    if att:
        a = torch.stack(att, 1).view(B, n, len(att), -1)  # (B, n, T, P)
        maps = a.gather(1, order[..., None, None].expand_as(a))
    return Hypotheses(seqs, total, total.clone(), _lengths(seqs), maps)


def decode(decoder: Decoder, features: ImageFeatures, gen: GenerationConfig, max_length: int,
           generator: torch.Generator | None = None) -> Hypotheses:
    """The search ``gen`` asks for: sampling, greedy (one beam, one caption), or beam search."""
    if gen.sample:
        return sample(decoder, features, gen, max_length, generator)
    if gen.beam_size == 1:
        return greedy_search(decoder, features, max_length, gen.attention)
    return beam_search(decoder, features, gen, max_length)
