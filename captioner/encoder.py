"""VGG-style image encoder in torchvision's parameter layout, so ImageNet VGG weights load as they are.

    image (B, 3, S, S) -> features (conv stack) -> avgpool -> classifier (FC, ReLU, Dropout)* -> v (B, D)

encode() gives ImageFeatures: fc = v, and for an attention decoder also att, the conv stack's output before its last
max-pool (grid(), (B, C, S/16, S/16)) as annotation vectors; head(grid) finishes the same network to v, so both come
from one pass and one set of weights.

v is the penultimate FC output of the classification net (fc7, 4096-d for VGG16), as in NeuralTalk:
torchvision's final 1000-way layer (classifier.6) is simply not built.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .config import EncoderConfig
from .features import ImageFeatures

log = logging.getLogger(__name__)


def make_features(layers: list[int | str], batch_norm: bool) -> nn.Sequential:
    mods: list[nn.Module] = []
    in_ch = 3
    for c in layers:
        if c == "M":
            mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        mods.append(nn.Conv2d(in_ch, int(c), kernel_size=3, padding=1))
        if batch_norm:
            mods.append(nn.BatchNorm2d(int(c)))
        mods.append(nn.ReLU(inplace=True))
        in_ch = int(c)
    return nn.Sequential(*mods)


class VGGEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = make_features(cfg.layers, cfg.batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((cfg.pool_size, cfg.pool_size))
        head: list[nn.Module] = []
        in_dim = cfg.channels * cfg.pool_size * cfg.pool_size
        for d in cfg.fc_dims:
            head += [nn.Linear(in_dim, d), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout)]
            in_dim = d
        self.classifier = nn.Sequential(*head)
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        last = pools[-1] if pools and pools[-1] == len(self.features) - 1 else len(self.features)
        self._grid_end = last  # features[:_grid_end] is the conv stack without its final max-pool
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation for the convolutions; the FC head keeps PyTorch's default
        # (fan-in scaled) so that v starts at unit scale instead of torchvision's N(0, 0.01), which
        # leaves v ~ 0 and the decoder ignoring the image early in from-scratch training.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    def encode(self, images: torch.Tensor, att: bool = False) -> ImageFeatures:
        """images (B, 3, S, S) -> fc = v (B, D), with ``att`` also the grid's P cells att (B, P, C)."""
        grid = self.grid(images)  # (B, C, S/16, S/16)
        # att: the cells in row-major order, each a_i contiguous (as searches' repeated copies and caches hold them,
        # so the weighted sum over a_i runs the same kernel on all paths)
        return ImageFeatures(self.head(grid), grid.flatten(2).transpose(1, 2).contiguous() if att else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> v (B, D), the classification network's penultimate layer."""
        x = self.features(images)  # (B, C, S/32, S/32)
        x = torch.flatten(self.avgpool(x), 1)  # (B, C * p * p)
        return self.classifier(x)  # (B, D)

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        return self.features[:self._grid_end](images)  # (B, C, S/16, S/16)

    def head(self, grid: torch.Tensor) -> torch.Tensor:
        """v from grid(): head(grid(x)) == forward(x)."""
        x = self.features[self._grid_end:](grid)
        return self.classifier(torch.flatten(self.avgpool(x), 1))  # (B, D)

    @torch.no_grad()
    def fold_batch_norm(self) -> "VGGEncoder":
        """For inference: each BatchNorm folded into the conv before it, in place (the same outputs up to fp32
        rounding; one pass less over each activation). The module then has no BatchNorm to train: only for a model
        that is only run."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        mods = list(self.features)
        for i in range(len(mods) - 1):
            if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                mods[i], mods[i + 1] = fuse_conv_bn_eval(mods[i].eval(), mods[i + 1].eval()), nn.Identity()
        self.features = nn.Sequential(*mods)  # same indices: grid()'s slice still ends where it did
        return self

    def load_imagenet(self, weights: str) -> None:
        """Load weights: 'imagenet' (torchvision's weights API, needs internet once), a .pth or a .safetensors path."""
        if weights == "imagenet":
            import torchvision.models as tvm

            name = self.cfg.arch
            if name not in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
                raise ValueError(f"no torchvision ImageNet weights for encoder arch {name!r}")
            state = tvm.get_model_weights(name).DEFAULT.get_state_dict(progress=True)
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"encoder weights {weights!r}: no such file (use 'imagenet', a .pth or a .safetensors path)")
            if path.suffix == ".safetensors":  # e.g. the encoder.safetensors of `captioner distill`
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"encoder weights {weights!r}: expected a state dict of tensors, "
                                 f"got {type(state).__name__}")
        self.load_state_dict_compatible(state)

    def load_state_dict_compatible(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision VGG state dict, dropping its 1000-way classifier; shapes must match."""
        own = self.state_dict()
        kept = {k: v for k, v in state.items() if k in own}
        dropped = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(kept))
        bad = [k for k, v in kept.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"encoder weights do not fit arch {self.cfg.arch!r}: shape mismatch for {bad[:4]}")
        if missing:
            raise ValueError(f"encoder weights lack {len(missing)} tensors of arch {self.cfg.arch!r}, e.g. {missing[:4]}")
        self.load_state_dict(kept)
        if dropped:
            log.info("encoder weights: ignored %d tensors not used for v (%s)", len(dropped), ", ".join(dropped[:4]))
