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
from .decoding import Hypotheses, beam_search, greedy_search, sample
from .encoder import VGGEncoder
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
    def generate(
        self,
        images: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        beam_size: int = 3,
        num_captions: int = 1,
        max_length: int | None = None,
        length_penalty: float = 0.0,
        block_trigrams: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        return_attention: bool = False,
    ) -> Hypotheses:
        """Caption a batch: greedy (beam_size=1), beam search, or sampling (do_sample=True); return_attention (attention
        decoders only) fills Hypotheses.attention with each step's alpha over the grid."""
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images or features")
        if beam_size < 1 or num_captions < 1:
            raise ValueError("beam_size and num_captions must be >= 1")
        v = self.encode(images) if features is None else features
        max_length = max_length or self.cfg.max_length
        att = return_attention
        if do_sample:
            return sample(self.decoder, v, num_captions, max_length, temperature, top_k, generator, att)
        if beam_size == 1 and num_captions == 1:
            return greedy_search(self.decoder, v, max_length, att)
        return beam_search(self.decoder, v, beam_size, max_length, num_captions, length_penalty, block_trigrams, att)
