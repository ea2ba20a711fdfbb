"""CIDEr-D over token ids with document frequencies fixed from a corpus: the reward for self-critical training.

The arithmetic is coco-caption's CIDEr-D (pycocoevalcap ``CiderScorer``: tf-idf n-gram vectors for n = 1..4,
clipped cosine similarity, Gaussian length penalty with sigma 6, mean over n and references, times 10). The one
difference is where the document frequencies come from: pycocoevalcap counts them over the references of the
captions being scored, which makes a caption's score depend on the rest of its batch; here they are counted once
over the training captions (as self-critical.pytorch does), so a reward is a fixed function of (caption, references).
With the scored set itself as the corpus the two agree exactly (tests/test_scst.py).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

Seq = Sequence[int]


def ngrams(seq: Seq, n: int = 4) -> Counter:
    seq = tuple(seq)
    return Counter(seq[i:i + k] for k in range(1, n + 1) for i in range(len(seq) - k + 1))


class CiderD:
    def __init__(self, corpus: Iterable[Sequence[Seq]], n: int = 4, sigma: float = 6.0) -> None:
        """corpus: for each image, its reference captions (token ids, <eos> included if rewards should count it)."""
        self.n, self.sigma = n, sigma
        self.df: Counter = Counter()
        images = 0
        for refs in corpus:
            images += 1
            self.df.update({g for r in refs for g in ngrams(r, n)})
        if images == 0:
            raise ValueError("CIDEr-D needs at least one image of reference captions for document frequencies")
        self.log_images = math.log(images)
        self._ref_cache: dict = {}

    def _vec(self, counts: Counter):
        vec = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (self.log_images - math.log(max(1.0, self.df[g])))
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:  # coco-caption measures length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> float:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            r = vr[k]
            val = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            total += val * penalty
        return total / self.n

    def score(self, candidate: Seq, refs: Sequence[Seq], key=None) -> float:
        """CIDEr-D of one caption; ``key`` caches the reference vectors (e.g. the image index)."""
        vrefs = self._ref_cache.get(key) if key is not None else None
        if vrefs is None:
            vrefs = [self._vec(ngrams(r, self.n)) for r in refs]
            if key is not None:
                self._ref_cache[key] = vrefs
        if not vrefs:
            return 0.0
        hyp = self._vec(ngrams(candidate, self.n))
        return 10.0 * sum(self._sim(hyp, r) for r in vrefs) / len(vrefs)
