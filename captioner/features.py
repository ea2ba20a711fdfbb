"""ImageFeatures: what the encoder gives the caption decoder and the VQA head, one name per kind of feature.

    fc   (N, D)     v, the encoder's last FC output (fc7 for VGG16), the pooled view of the whole image: every model
    att  (N, P, C)  the conv grid before its last max-pool as P = S*S annotation vectors a_i (cells in row-major
                    order, C channels): only models with an attention decoder, None otherwise

As in self-critical.pytorch (fc_feats / att_feats), the two never share a name, so no code has to tell them apart by
their shape. Every field has the images on axis 0, so indexing, moving and joining act on all fields alike.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise, so only identity is a sound equality
class ImageFeatures:
    fc: torch.Tensor  # (N, D)
    att: torch.Tensor | None = None  # (N, P, C)

    def named(self) -> dict[str, torch.Tensor]:
        """The fields that are present, by name (how the feature cache stores them)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ImageFeatures:
        return ImageFeatures(**{k: fn(t) for k, t in self.named().items()})

    def __len__(self) -> int:
        return self.fc.size(0)

    def __getitem__(self, rows) -> ImageFeatures:
        """The features of some images: an index tensor, a slice or a mask over axis 0."""
        return self.map(lambda t: t[rows])

    @property
    def device(self) -> torch.device:
        return self.fc.device

    def to(self, *args, **kwargs) -> ImageFeatures:
        return self.map(lambda t: t.to(*args, **kwargs))

    def float(self) -> ImageFeatures:
        return self.map(torch.Tensor.float)

    def pin_memory(self) -> ImageFeatures:
        """Page-locked copies: a DataLoader with pin_memory=True calls this on the batches of a feature cache."""
        return self.map(torch.Tensor.pin_memory)

    def split(self, sizes: Sequence[int]) -> list[ImageFeatures]:
        """Consecutive groups of sizes[k] images."""
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        return [self[s:s + n] for s, n in zip(starts, sizes)]

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """One batch of the images of all parts, in order (all parts have the same fields)."""
        if len(parts) == 1:
            return parts[0]
        return ImageFeatures(**{k: torch.cat([p.named()[k] for p in parts]) for k in parts[0].named()})
