"""The batch function the service hands to the generic batcher: caption and VQA jobs in one batch share one
encoder pass, then captions run batched per generation setting and questions run batched through the VQA head.

    jobs (mixed CaptionJob / VQAJob) --normalize_batch--> (B, 3, S, S) --encode--> ImageFeatures f (fc (B, D) [+ att])
        caption jobs grouped by GenerationConfig --caption_batch(features=f[idx])--> n-best captions
        VQA jobs                                 --answer_batch(f[idx], questions, choices)--> answers
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from captioner.api import Captioner
from captioner.features import ImageFeatures
from captioner.generation import GenerationConfig
from captioner.preprocess import normalize_batch
from captioner.vqa import VQAInputError

log = logging.getLogger("service.engine")


class VQAUnsupported(Exception):
    """The loaded model has no VQA head (HTTP 501)."""


@dataclass
class CaptionJob:
    pixels: np.ndarray  # (S, S, 3) uint8, resized and cropped (service.images.load_upload)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class VQAJob:
    pixels: np.ndarray  # (S, S, 3) uint8, resized and cropped (service.images.load_upload)
    question: str
    choices: list[str]


class Engine:
    def __init__(self, captioner: Captioner, on_images=None) -> None:
        self.captioner = captioner
        self.on_images = on_images  # callback(task, n) for the images-processed counter

    def __call__(self, jobs: list[CaptionJob | VQAJob]) -> list:
        x = normalize_batch(np.stack([j.pixels for j in jobs]), self.captioner.cfg.preprocess,
                            self.captioner.memory_format)  # (B, 3, S, S)
        features = self.captioner.encode(x)  # every image encoded once, shared by captions and VQA
        out: list = [None] * len(jobs)

        # jobs whose configs give the same captions decode together in one caption_batch call
        groups: dict[GenerationConfig, list[int]] = defaultdict(list)
        vqa_idx: list[int] = []
        for i, j in enumerate(jobs):
            if isinstance(j, CaptionJob):
                groups[j.generation.canonical()].append(i)
            else:
                vqa_idx.append(i)

        for gen, idx in groups.items():
            caps = self.captioner.caption_batch(features=features[idx], generation=gen)
            for i, c in zip(idx, caps):
                out[i] = c
        if groups and self.on_images:
            self.on_images("caption", sum(len(idx) for idx in groups.values()))

        if vqa_idx:
            if not self.captioner.can_answer:
                for i in vqa_idx:
                    out[i] = VQAUnsupported("this model has no VQA head")
            else:
                for i, a in zip(vqa_idx, self._answer(features[vqa_idx], [jobs[i] for i in vqa_idx])):
                    out[i] = a
                if self.on_images:
                    self.on_images("vqa", len(vqa_idx))
        return out

    def _answer(self, features: ImageFeatures, jobs: list[VQAJob]) -> list:
        """The VQA jobs' features -> one Answer (or VQAInputError) per job."""
        try:
            return self.captioner.answer_batch(features, [j.question for j in jobs], [j.choices for j in jobs])
        except VQAInputError:
            pass
        # the endpoint validates first, so this is rare: answer one by one so only the bad job fails
        out: list = []
        for k, j in enumerate(jobs):
            try:
                out += self.captioner.answer_batch(features[k:k + 1], [j.question], [j.choices])
            except VQAInputError as e:
                out.append(e)
        return out
