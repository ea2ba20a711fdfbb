"""Multiple-choice VQA head: score (image, question, answer) triples on the shared encoder's v.

    question (N, T) --embed--> BiRNN with W_ih·v at every step --> q (N, 2H)
    choice_c (N, L) --embed--> RNN                               --> a_c (N, H)
    [v', q', a', q'*a', v'*a', v'*q'*a'] --MLP--> one logit per choice; softmax over the choices (padding masked)

Scoring triples rather than classifying over a fixed answer set follows Jabri et al. 2016 (Revisiting Visual
Question Answering Baselines), which beats answer classification on Visual7W telling. The question encoder is a
bidirectional RNN (Schuster & Paliwal 1997) built from the caption decoder's RecurrentLayer, so the rnn/gru/lstm
cells and the W_ih·v image term are the same code. The image-blind baseline is this head with v = 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .config import VQAConfig
from .decoder import RecurrentLayer
from .tokenizer import PAD_ID, UNK_ID, Vocabulary, tokenize


class VQAInputError(ValueError):
    """A question or set of choices the model cannot answer; the message says what is wrong, ``field`` ('question'
    or 'choices') and ``index`` (the choice, 0-based, or None) where, ``kind`` what (missing, string_type,
    string_too_short, string_too_long, list_type, too_short, too_long, duplicate) for APIs that report fields."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None,
                 kind: str = "value_error") -> None:
        super().__init__(message)
        self.field, self.index, self.kind = field, index, kind


class VQAUnavailableError(RuntimeError):
    """The checkpoint has no VQA head (a caption-only model)."""


# ----------------------------------------------------------------------------- model

def run_masked(layer: RecurrentLayer, xp: torch.Tensor, mask: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Run one recurrent layer over right-padded inputs and return the state after the last real token.

    xp (N, T, G*H) input pre-activations, mask (N, T) True on real tokens -> h (N, H). Padded steps leave the
    state unchanged, so the backward pass starts at each sequence's own last word.
    """
    N, T, _ = xp.shape
    H = layer.W_hh.in_features
    h = xp.new_zeros(N, H)
    c = xp.new_zeros(N, H) if layer.cell == "lstm" else None
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_new, c_new = layer.step(xp[:, t], h, c)
        m = mask[:, t, None]  # (N, 1)
        h = torch.where(m, h_new, h)
        if c is not None:
            c = torch.where(m, c_new, c)
    return h


class VQAHead(nn.Module):
    def __init__(self, cfg: VQAConfig, vocab_size: int, image_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        E, H, M = cfg.embed_dim, cfg.hidden_dim, cfg.mlp_dim
        # v's scale depends on the encoder (ImageNet fc7 activations are large, a fresh encoder's are ~1e-2);
        # normalising it lets the image term speak from the first step. v = 0 (image-blind) stays constant.
        self.v_norm = nn.LayerNorm(image_dim)
        self.embed = nn.Embedding(vocab_size, E, padding_idx=PAD_ID)  # shared by questions and answers
        self.q_fwd = RecurrentLayer(cfg.cell, E, H, image_dim)
        self.q_bwd = RecurrentLayer(cfg.cell, E, H, image_dim)
        self.a_rnn = RecurrentLayer(cfg.cell, E, H, None)
        self.v_proj = nn.Linear(image_dim, H)
        self.q_proj = nn.Linear(2 * H, H)
        self.a_proj = nn.Linear(H, H)
        self.drop = nn.Dropout(cfg.dropout)
        self.scorer = nn.Sequential(nn.Linear(6 * H, M), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(M, 1))

    def encode_question(self, v: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """v (N, D), tokens (N, T) -> (N, 2H): final forward and backward states, image injected at every step."""
        mask = tokens != PAD_ID
        x = self.drop(self.embed(tokens))  # (N, T, E)
        hf = run_masked(self.q_fwd, self.q_fwd.W_xh(x) + self.q_fwd.W_ih(v)[:, None], mask)
        hb = run_masked(self.q_bwd, self.q_bwd.W_xh(x) + self.q_bwd.W_ih(v)[:, None], mask, reverse=True)
        return torch.cat([hf, hb], 1)

    def encode_answers(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (M, L) -> (M, H)."""
        x = self.drop(self.embed(tokens))
        return run_masked(self.a_rnn, self.a_rnn.W_xh(x), tokens != PAD_ID)

    def forward(self, v: torch.Tensor, question: torch.Tensor, choices: torch.Tensor,
                choice_mask: torch.Tensor) -> torch.Tensor:
        """v (B, D), question (B, T), choices (B, C, L), choice_mask (B, C) -> logits (B, C).

        Padding choices get the dtype's lowest value, so their softmax probability is 0 and they never win.
        """
        B, C, L = choices.shape
        v = self.v_norm(v)
        q = torch.tanh(self.q_proj(self.encode_question(v, question)))  # (B, H)
        iv = torch.tanh(self.v_proj(v))  # (B, H)
        flat = choice_mask.reshape(-1)
        enc = self.encode_answers(choices.reshape(B * C, L)[flat])  # only real choices: (M, H)
        a = enc.new_zeros(B * C, enc.size(1))
        a[flat] = enc
        a = torch.tanh(self.a_proj(a)).view(B, C, -1)  # (B, C, H)
        q, iv = q[:, None].expand_as(a), iv[:, None].expand_as(a)
        # the triple product scores image-question-answer agreement directly ("is there a red shape?" -> yes)
        feats = self.drop(torch.cat([iv, q, a, q * a, iv * a, iv * q * a], -1))  # (B, C, 6H)
        logits = self.scorer(feats).squeeze(-1)  # (B, C)
        return logits.masked_fill(~choice_mask, torch.finfo(logits.dtype).min)


# ----------------------------------------------------------------------------- input checks and encoding

def _clean(text: object, what: str, max_chars: int, field: str, index: int | None = None) -> str:
    if not isinstance(text, str):
        raise VQAInputError(f"{what} must be a string, got {type(text).__name__}", field, index, "string_type")
    if len(text) > max_chars:
        raise VQAInputError(f"{what} is {len(text)} characters long; the limit is {max_chars}", field, index,
                            "string_too_long")
    text = " ".join(text.split())
    if not text:
        raise VQAInputError(f"{what} is empty: it must contain at least one word", field, index, "string_too_short")
    if not tokenize(text):
        raise VQAInputError(f"{what} {text!r} has no words (only punctuation or symbols): it must contain at least "
                            "one word",
                            field, index, "string_too_short")
    return text


def check_question(question: object, cfg: VQAConfig, max_chars: int | None = None) -> str:
    """The question with whitespace collapsed; raises VQAInputError when it is unusable. ``max_chars``: a
    stricter limit than the model's (an API's own)."""
    if question is None:
        raise VQAInputError("question must be a string (it is required), got None", "question", None, "missing")
    return _clean(question, "question", min(cfg.max_chars, max_chars or cfg.max_chars), "question")


def check_choices(choices: object, cfg: VQAConfig, max_chars: int | None = None,
                  max_choices: int | None = None, vocab: Vocabulary | None = None) -> list[str]:
    """The choices with whitespace collapsed; 2..max_choices non-empty choices, distinct after tokenization
    ("Red." and "red", "café" composed and decomposed are the same answer), and with ``vocab`` distinct to the
    model too ("giraffe" and "zebra" are both <unk> to a model that knows neither), else VQAInputError. The
    limits: the model's, or stricter ones given."""
    limit = min(cfg.max_choices, max_choices or cfg.max_choices)
    chars = min(cfg.max_chars, max_chars or cfg.max_chars)
    if choices is None:
        raise VQAInputError("choices must be a list of strings (they are required: 2 or more answers to choose "
                            "from), got None", "choices", None, "missing")
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise VQAInputError("choices must be a list of strings", "choices", None, "list_type")
    if len(choices) < 2:
        raise VQAInputError(f"need at least 2 choices, got {len(choices)}", "choices", None, "too_short")
    if len(choices) > limit:
        raise VQAInputError(f"at most {limit} choices are allowed, got {len(choices)}", "choices", None, "too_long")
    out, seen = [], {}
    for i, c in enumerate(choices):
        c = _clean(c, f"choice {i + 1}", chars, "choices", i)
        key = " ".join(tokenize(c))
        if key in seen:
            raise VQAInputError(f"choices {seen[key] + 1} and {i + 1} are the same answer "
                                f"({out[seen[key]]!r} and {c!r})", "choices", i, "duplicate")
        seen[key] = i
        out.append(c)
    if vocab is not None:
        _check_distinct_to_model(out, vocab, cfg)
    return out


def unknown_words(vocab: Vocabulary, texts: Sequence[str]) -> list[str]:
    """The words of ``texts`` outside the model's vocabulary, in order of appearance: the model reads each as
    <unk>, so an answer made of them is only its length to the model."""
    return list(dict.fromkeys(w for t in texts for w in tokenize(t) if w not in vocab.stoi))


def _check_distinct_to_model(choices: list[str], vocab: Vocabulary, cfg: VQAConfig) -> None:
    seen: dict[tuple, int] = {}
    for i, c in enumerate(choices):
        ids = tuple(encode_text(vocab, c, cfg.max_answer_words))
        if ids in seen:
            j = seen[ids]
            unknown = sorted({w for x in (choices[j], c) for w in tokenize(x) if w not in vocab.stoi})
            why = (f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} outside the model's "
                   "vocabulary" if unknown else f"they agree in their first {cfg.max_answer_words} words")
            raise VQAInputError(f"choices {j + 1} and {i + 1} are the same answer to this model ({choices[j]!r} and "
                                f"{c!r}): {why}; use words it knows", "choices", i, "duplicate")
        seen[ids] = i


def encode_text(vocab: Vocabulary, text: str, max_words: int) -> list[int]:
    """Word ids truncated to max_words; text without words becomes [<unk>] so it still has a length."""
    return vocab.encode(text, max_words) or [UNK_ID]


def pad_2d(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad id lists -> (N, T)."""
    t = max((len(s) for s in seqs), default=1)
    out = torch.full((len(seqs), max(t, 1)), PAD_ID, dtype=torch.long)
    for n, s in enumerate(seqs):
        out[n, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def pad_choices(choices: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per question a list of choice id lists -> tokens (N, C, L) and mask (N, C), C and L the batch maxima."""
    C = max(len(cs) for cs in choices)
    L = max(len(a) for cs in choices for a in cs)
    tokens = torch.full((len(choices), C, L), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(choices), C, dtype=torch.bool)
    for n, cs in enumerate(choices):
        mask[n, :len(cs)] = True
        for c, a in enumerate(cs):
            tokens[n, c, :len(a)] = torch.as_tensor(a, dtype=torch.long)
    return tokens, mask


def encode_batch(vocab: Vocabulary, cfg: VQAConfig, questions: Sequence[str], choices: Sequence[Sequence[str]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[str]]]:
    """Check and encode a batch: question (B, T), choices (B, C, L), choice_mask (B, C) and the cleaned choices.

    Questions over max_question_words and answers over max_answer_words words are truncated.
    """
    if len(questions) != len(choices):
        raise VQAInputError(f"{len(questions)} questions but {len(choices)} lists of choices")
    if not questions:
        raise VQAInputError("no questions")
    qs = [check_question(q, cfg) for q in questions]
    cs = [check_choices(c, cfg, vocab=vocab) for c in choices]
    q = pad_2d([encode_text(vocab, x, cfg.max_question_words) for x in qs])
    c, m = pad_choices([[encode_text(vocab, a, cfg.max_answer_words) for a in x] for x in cs])
    return q, c, m, cs
