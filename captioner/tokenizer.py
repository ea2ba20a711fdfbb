"""The one tokenizer: nltk's Treebank word tokenizer (needs no nltk_data), lowercased, punctuation dropped.

Saved as ``vocab.json`` next to the weights; every caption the project reads or writes goes through it.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from nltk.tokenize import TreebankWordTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_treebank = TreebankWordTokenizer()
_has_word_char = re.compile(r"[^\W_]")  # a letter or digit of any script
# zero-width and other invisible format characters (Unicode category Cf): "red\u200b" is "red"
_invisible = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Treebank splits clitics off ("dog's" -> "dog", "'s"); glue them back when writing text.
_clitic = re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b")


def tokenize(text: str) -> list[str]:
    """NFKC-normalise (composed accents, full-width letters as ASCII), drop invisible characters, case-fold,
    Treebank-tokenize, keep tokens that hold a letter or digit. On ASCII text: lowercase + Treebank."""
    text = _invisible.sub("", unicodedata.normalize("NFKC", text)).casefold()
    return [t for t in _treebank.tokenize(text) if _has_word_char.search(t)]


def detokenize(tokens: Sequence[str]) -> str:
    return _clitic.sub(r"\1", " ".join(tokens))


class Vocabulary:
    def __init__(self, words: Sequence[str], min_count: int = 5) -> None:
        itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.itos = itos
        self.stoi = {w: i for i, w in enumerate(itos)}
        if len(self.stoi) != len(itos):
            raise ValueError("vocabulary has duplicate words")
        self.min_count = min_count

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(t for c in captions for t in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, min_count=min_count)

    def extended(self, words: Iterable[str]) -> "Vocabulary":
        """This vocabulary with ``words`` it lacks appended in order: every old id keeps its meaning."""
        return Vocabulary(self.itos[len(SPECIALS):] + [w for w in dict.fromkeys(words) if w not in self.stoi],
                          min_count=self.min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Word ids of ``text`` (no <bos>/<eos>), truncated to ``max_length`` words."""
        ids = [self.stoi.get(t, UNK_ID) for t in tokenize(text)]
        return ids[:max_length] if max_length is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of an id sequence, stopping at <eos> and skipping <pad>/<bos>."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return detokenize(words)

    def to_dict(self) -> dict:
        return {"format": "captioner-vocab/1", "tokenizer": "nltk-treebank-lower-nopunct",
                "min_count": self.min_count, "itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if not isinstance(d, dict) or d.get("format") != "captioner-vocab/1" or not isinstance(d.get("itos"), list):
            raise ValueError("not a captioner vocab.json (expected format 'captioner-vocab/1' with 'itos')")
        if not all(isinstance(w, str) for w in d["itos"]):
            raise ValueError("vocab.json 'itos' must hold strings only")
        if tuple(d["itos"][:4]) != SPECIALS:
            raise ValueError(f"vocab.json must start with {SPECIALS}")
        return cls(d["itos"][4:], min_count=d.get("min_count", 5))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_dict(json.loads(Path(path).read_text()))
