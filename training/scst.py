"""Self-critical sequence training (Rennie et al. 2017): ``captioner train --scst --init-from RUN/best ...``.

For each image the model samples k captions; each earns its CIDEr-D against the image's training references
(document frequencies from all training captions, <eos> counted as a word, as in self-critical.pytorch; plus
``--scst-bleu-weight`` times its sentence BLEU-4, self-critical.pytorch's bleu_reward_weight, and
``--scst-object-weight`` times the share of the photo's detected objects it names, ObjectRecall), minus a
baseline: the greedy caption's reward (``--scst-baseline greedy``, Rennie et al.) or the mean reward of the image's
other k-1 samples (``mean``, Luo 2020), which needs no extra decoding pass. The loss is REINFORCE,
-(r - b) log p(caption), averaged over tokens.

The whole model runs in eval mode (no dropout, BatchNorm running statistics): the policy being improved is exactly
the one used at test time, and the no-grad sampling pass and the differentiable pass below see the same network.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.features import ImageFeatures
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.tokenizer import EOS_ID, PAD_ID, Vocabulary

from .cider import CiderD
from .datasets import pad_captions
from .features import batch_inputs, features_of
from .label import Labels
from .options import ScstOptions
from .pseudo_refs import lexicon, named_classes


class ScstLoss(nn.Module):
    """(images | features, sampled captions, advantages) -> REINFORCE loss; one module so DDP sees the forward."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor | ImageFeatures, rep: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor,
                advantage: torch.Tensor) -> torch.Tensor:
        """x: batch_inputs()'s images or cached features; rep (N,) picks each caption's image."""
        logits = self.model.decoder(features_of(self.model, x)[rep], inp)  # (N, T, V)
        logp = F.log_softmax(logits.float(), -1).gather(2, tgt.clamp_min(0)[..., None]).squeeze(2)  # (N, T)
        mask = (tgt != PAD_ID).float()
        return -(advantage[:, None] * logp * mask).sum() / mask.sum().clamp_min(1.0)


def words(tokens: torch.Tensor) -> list[list[int]]:
    """(N, T) decoded rows -> word ids before the first <eos>."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID])
    return out


def reference_corpus(caps: list[list[torch.Tensor]]) -> list[list[tuple[int, ...]]]:
    """Training captions (encoded, truncated as for training) with <eos> appended, per image."""
    return [[tuple(c.tolist()) + (EOS_ID,) for c in cs] for cs in caps]


def rewards(cider: CiderD, refs: list[list[tuple[int, ...]]], indices: list[int], seqs: list[list[int]],
            per_image: int, bleu_weight: float = 0.0) -> torch.Tensor:
    """CIDEr-D (+ bleu_weight * BLEU-4) of each caption (seqs[j] belongs to image indices[j // per_image])
    -> (len(seqs),)."""
    r = torch.tensor([cider.score(tuple(s) + (EOS_ID,), refs[indices[j // per_image]], key=indices[j // per_image])
                      for j, s in enumerate(seqs)], dtype=torch.float32)
    return r + bleu_weight * bleu4(refs, indices, seqs, per_image) if bleu_weight else r


def bleu4(refs: list[list[tuple[int, ...]]], indices: list[int], seqs: list[list[int]], per_image: int) -> torch.Tensor:
    """Sentence-level BLEU-4 of each caption against its image's references, <eos> counted as a word: pycocoevalcap's
    scorer ('closest' reference length), as self-critical.pytorch's bleu_reward_weight uses it."""
    from pycocoevalcap.bleu.bleu import Bleu

    text = lambda seq: " ".join(map(str, seq))  # noqa: E731  (token ids as words)
    res = {j: [text(tuple(s) + (EOS_ID,))] for j, s in enumerate(seqs)}
    gts = {j: [text(r) for r in refs[indices[j // per_image]]] for j in range(len(seqs))}
    _, per_n = Bleu(4).compute_score(gts, res, verbose=0)
    return torch.tensor(per_n[3], dtype=torch.float32)


class ObjectRecall:
    """The object reward of Feng et al. (2019): per training photo the COCO classes a `captioner label` run detected
    in it (centre view, score >= threshold), and for a caption the share of them it names (pseudo_refs' lexicon:
    "man" names a person, "puppies" a dog); 0 for a photo with no detection or none labelled. Photos are matched to
    label rows by real path, so links and relative label paths find them."""

    def __init__(self, labels_dir: str | os.PathLike, paths: list[str], vocab: Vocabulary,
                 threshold: float = 0.5) -> None:
        labels = Labels(labels_dir)
        rows = {os.path.realpath(p): i for i, p in enumerate(labels.paths)}
        found = (labels.objects(threshold)[1][:, 0] > 0).tolist()  # (N, classes) in the centre view
        self.present = []
        for p in paths:
            r = rows.get(os.path.realpath(p))
            self.present.append(frozenset(c for c, f in zip(labels.classes, found[r]) if f) if r is not None
                                else frozenset())
        self.lexicon, self.vocab = lexicon(labels.classes), vocab

    def __call__(self, indices: list[int], seqs: list[list[int]], per_image: int) -> torch.Tensor:
        """seqs[j] belongs to image indices[j // per_image] -> (len(seqs),) recall of its objects."""
        out = []
        for j, s in enumerate(seqs):
            want = self.present[indices[j // per_image]]
            named = named_classes(self.vocab.decode(s).split(), self.lexicon) if want else {}
            out.append(len(want & named.keys()) / len(want) if want else 0.0)
        return torch.tensor(out, dtype=torch.float32)


def scst_step(step_fn, model: CaptionModel, batch: dict, cider: CiderD, refs, scst: ScstOptions, max_length: int,
              channels_last: bool, g: torch.Generator, device, objects: ObjectRecall | None = None
              ) -> tuple[torch.Tensor, dict, int]:
    """One SCST step for the engine (which runs it under autocast): sample scst.scst_samples captions (of at most
    ``max_length`` words) per image without grad, reward them (plus scst.scst_object_weight x ``objects``' recall),
    and return the REINFORCE loss with the epoch's running sums of loss, reward and baseline."""
    k = scst.scst_samples
    idx = batch["indices"].tolist()
    x = batch_inputs(batch, device, channels_last)
    with torch.no_grad():
        features = features_of(model, x).float()
        samples = GenerationConfig(sample=True, num_captions=k, max_length=max_length)
        sampled = words(model.generate(features=features, generation=samples, generator=g)
                        .tokens.flatten(0, 1))  # B*k, image-major
        if scst.scst_baseline == "greedy":
            greedy_gen = GenerationConfig(beam_size=1, max_length=max_length)
            greedy = words(model.generate(features=features, generation=greedy_gen).tokens[:, 0])
    def reward(seqs: list[list[int]], per_image: int) -> torch.Tensor:
        r = rewards(cider, refs, idx, seqs, per_image, scst.scst_bleu_weight)
        return r + scst.scst_object_weight * objects(idx, seqs, per_image) if objects is not None else r

    r = reward(sampled, k).view(-1, k)  # (B, k)
    if scst.scst_baseline == "greedy":
        base = reward(greedy, 1)[:, None]  # (B, 1)
    else:  # mean of the image's other samples
        base = (r.sum(1, keepdim=True) - r) / (k - 1)
    advantage = (r - base).flatten()
    inp, tgt = pad_captions(sampled, max_length)
    rep = torch.arange(len(idx)).repeat_interleave(k)
    # the engine runs the whole step in one autocast block: drop the low-precision weight copies cast during the
    # no-grad sampling, which carry no grad history (older torch reused them in the loss pass: pytorch#112583)
    torch.clear_autocast_cache()
    loss = step_fn(x, rep.to(device), inp.to(device), tgt.to(device), advantage.to(device))
    return loss, {"loss": (loss.item(), 1), "reward": (r.mean().item(), 1), "baseline": (base.mean().item(), 1)}, len(idx)
