"""The caption model: VGG-style encoder -> v -> recurrent decoder with W_ih·v injection.

    images (B, 3, S, S) --encoder--> v (B, D) --decoder(tokens)--> logits (B, T, V)

With an attention decoder (config decoder.inject = 'attention') the features are the encoder's conv grid
(B, C, S', S') instead of v; image_vector() turns them into v for the VQA head, so one encoder pass serves both.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .decoder import build_decoder
from .decoding import Hypotheses, decode
from .encoder import VGGEncoder
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

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The decoder's view of the images: v (B, D), or the grid (B, C, S', S') for attention."""
        return self.encoder.grid(images) if self.cfg.attention else self.encoder(images)

    def blank_features(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """All-zero features for n images (the image-blind baseline), on like's device and dtype."""
        return like.new_zeros(n, *self.cfg.feature_shape)

    def image_vector(self, features: torch.Tensor) -> torch.Tensor:
        """v (B, D) from encode()'s features."""
        return self.encoder.head(features) if features.dim() == 4 else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), tokens (B, T) starting with <bos> -> logits (B, T, V)."""
        return self.decoder(self.encode(images), tokens)

    def answer_logits(self, features: torch.Tensor, question_tokens: torch.Tensor, choice_tokens: torch.Tensor,
                      choice_mask: torch.Tensor) -> torch.Tensor:
        """Multiple-choice VQA: features (B, D) or grid, question (B, T), choices (B, C, L), mask (B, C) -> (B, C)."""
        if self.vqa is None:
            raise VQAUnavailableError("this model has no VQA head (config.json has no 'vqa' section); "
                               "train one with `captioner train --task vqa` or `--task joint`")
        return self.vqa(self.image_vector(features), question_tokens, choice_tokens, choice_mask)

    @torch.no_grad()
    def generate(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None,
                 generation: GenerationConfig | None = None, generator: torch.Generator | None = None) -> Hypotheses:
        """Caption a batch as ``generation`` (default GenerationConfig()) says: greedy (beam_size=1), beam search, or
        sampling; with attention (attention decoders only) Hypotheses.attention holds each step's alpha."""
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images or features")
        gen = generation or GenerationConfig()
        v = self.encode(images) if features is None else features
        return decode(self.decoder, v, gen, gen.max_length or self.cfg.max_length, generator)
