"""The caption model: VGG-style encoder -> ImageFeatures -> recurrent decoder with W_ih·v injection (+ VQA head).

    images (B, 3, S, S) --encoder--> ImageFeatures fc = v (B, D) [, att (B, P, C)] --decoder--> logits (B, T, V)

An attention decoder (config decoder.inject = 'attention') reads att, the encoder's conv grid; the VQA head always
reads fc. Both come from one encoder pass.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn

from .config import DecoderConfig, ModelConfig, VQAConfig
from .decoder import build_decoder
from .decoding import Hypotheses, decode
from .encoder import VGGEncoder
from .features import ImageFeatures
from .generation import GenerationConfig
from .vqa import VQAHead, VQAUnavailableError


class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 5:
            raise ValueError("config.vocab_size must be set (4 special tokens + words)")
        self.cfg = cfg
        self.encoder = VGGEncoder(cfg.encoder)
        self.decoder = build_decoder(cfg.decoder, cfg.vocab_size, cfg.decoder_image_dim)
        self.vqa = VQAHead(cfg.vqa, cfg.vocab_size, cfg.encoder.feature_dim) if cfg.vqa is not None else None

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """images (B, 3, S, S) -> fc (B, D), and att (B, P, C) when the decoder attends (cfg.feature_shapes)."""
        return self.encoder.encode(images, att=self.cfg.attention)

    def blank_features(self, n: int, device: torch.device | str) -> ImageFeatures:
        """All-zero features for n images (the image-blind baseline), float32 on ``device``."""
        return ImageFeatures(**{k: torch.zeros(n, *s, device=device) for k, s in self.cfg.feature_shapes.items()})

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), tokens (B, T) starting with <bos> -> logits (B, T, V)."""
        return self.decoder(self.encode(images), tokens)

    def answer_logits(self, features: ImageFeatures, question_tokens: torch.Tensor, choice_tokens: torch.Tensor,
                      choice_mask: torch.Tensor) -> torch.Tensor:
        """Multiple-choice VQA on features.fc: question (B, T), choices (B, C, L), mask (B, C) -> logits (B, C)."""
        if self.vqa is None:
            raise VQAUnavailableError("this model has no VQA head (config.json has no 'vqa' section); "
                               "train one with `captioner train --task vqa` or `--task joint`")
        return self.vqa(features.fc, question_tokens, choice_tokens, choice_mask)

    @torch.no_grad()
    def generate(self, images: torch.Tensor | None = None, features: ImageFeatures | None = None,
                 generation: GenerationConfig | None = None, generator: torch.Generator | None = None) -> Hypotheses:
        """Caption a batch as ``generation`` (default GenerationConfig()) says: greedy (beam_size=1), beam search, or
        sampling; with attention (attention decoders only) Hypotheses.attention holds each step's alpha."""
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images or features")
        gen = generation or GenerationConfig()
        features = self.encode(images) if features is None else features
        return decode(self.decoder, features, gen, gen.max_length or self.cfg.max_length, generator)

    # ------------------------------------------------------------------------------------------ model surgery
    def with_decoder(self, cfg: DecoderConfig, decoder: nn.Module | None = None) -> "CaptionModel":
        """This model with another caption decoder: one built from ``cfg`` with fresh weights (drawn from torch's
        RNG), or ``decoder``, which must have been built for ``cfg`` (e.g. an ensemble of trained members). The
        encoder and VQA head are this model's (shared, not copied); the config is a copy with decoder = ``cfg``,
        validated (ModelConfig.__post_init__), so the returned model's config and modules agree."""
        new = replace(copy.deepcopy(self.cfg), decoder=cfg)
        if decoder is None:
            decoder = build_decoder(cfg, new.vocab_size, new.decoder_image_dim)
            decoder.to(next(self.encoder.parameters()).device).train(self.training)
        elif getattr(decoder, "cfg", None) != cfg or len(getattr(decoder, "members", [decoder])) != cfg.members:
            raise ValueError(f"with_decoder: the decoder was built for {getattr(decoder, 'cfg', None)}, not {cfg}")
        return self._assemble(new, decoder, self.vqa)

    def with_vqa_head(self, cfg: VQAConfig) -> "CaptionModel":
        """This model with a new multiple-choice VQA head built from ``cfg`` (fresh weights); the encoder and caption
        decoder are this model's (shared), the config a validated copy with vqa = ``cfg``."""
        new = replace(copy.deepcopy(self.cfg), vqa=cfg)
        head = VQAHead(cfg, new.vocab_size, new.encoder.feature_dim).to(next(self.encoder.parameters()).device)
        head.train(self.training)
        return self._assemble(new, self.decoder, head)

    def grow_vocab(self, size: int) -> None:
        """Grow the word tables in place to ``size`` rows, for a vocabulary extended at its end (Vocabulary.extended).
        Old rows are kept. New input embeddings (decoder and VQA head) are drawn at the old rows' scale; new output
        rows get zero weights and a bias 10 below the lowest, so what the model writes and answers about known words
        does not change until the new words are trained."""
        if size < self.cfg.vocab_size:
            raise ValueError(f"grow_vocab: {size} < the current vocab_size {self.cfg.vocab_size}")
        for dec in getattr(self.decoder, "members", [self.decoder]):
            dec.embed = _grown_embedding(dec.embed, size)
            dec.W_hy = _grown_output(dec.W_hy, size)
        if self.vqa is not None:
            self.vqa.embed = _grown_embedding(self.vqa.embed, size)
        self.cfg = replace(self.cfg, vocab_size=size)

    def _assemble(self, cfg: ModelConfig, decoder: nn.Module, vqa: nn.Module | None) -> "CaptionModel":
        """A CaptionModel of ``cfg`` made of this model's encoder and the given decoder and VQA head (nothing is built,
        so no random numbers are drawn; no module's training mode is changed)."""
        model = CaptionModel.__new__(CaptionModel)
        nn.Module.__init__(model)
        model.cfg, model.encoder, model.decoder, model.vqa = cfg, self.encoder, decoder, vqa
        model.training = self.training
        return model


@torch.no_grad()
def _grown_embedding(e: nn.Embedding, n: int) -> nn.Embedding:
    new = nn.Embedding(n, e.embedding_dim, padding_idx=e.padding_idx).to(e.weight)
    new.weight.normal_(0.0, e.weight[1:].std().item())  # torch's RNG: seeded runs stay reproducible
    new.weight[: e.num_embeddings] = e.weight
    new.weight.requires_grad_(e.weight.requires_grad)
    return new


@torch.no_grad()
def _grown_output(lin: nn.Linear, n: int) -> nn.Linear:
    new = nn.Linear(lin.in_features, n).to(lin.weight)
    new.weight.zero_()
    new.weight[: lin.out_features] = lin.weight
    new.bias.fill_(lin.bias.min().item() - 10.0)
    new.bias[: lin.out_features] = lin.bias
    new.requires_grad_(lin.weight.requires_grad)
    return new
