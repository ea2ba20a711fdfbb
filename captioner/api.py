"""The Python API: ``Captioner.from_pretrained(path).caption(images)``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_pretrained, read_metrics
from .features import ImageFeatures
from .generation import GenerationConfig, with_options
from .model import CaptionModel
from .preprocess import ImageInput, eval_transform, to_tensor
from .runtime import autocast, cast_weights, default_device, memory_format, resolve_precision
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Vocabulary
from .vqa import VQAInputError, VQAUnavailableError, encode_batch


@dataclass
class Caption:
    text: str
    log_prob: float  # sum of token log-probabilities, <eos> included
    score: float  # the ranking score (length-normalised when length_penalty > 0)
    # with attention: the caption's word tokens (before detokenizing "dog 's" to "dog's") and, per word,
    # the attention map that produced it, a grid of S x S floats summing to 1 (rows top to bottom)
    words: list[str] | None = None
    attention: list[list[list[float]]] | None = None

    def to_dict(self, rounded: bool = False) -> dict:
        """``rounded``: scores to 4 decimals and maps to 3, as caption files store them (smaller, no less useful)."""
        r = (lambda x, n: round(x, n)) if rounded else (lambda x, n: x)
        d = {"caption": self.text, "log_prob": r(self.log_prob, 4), "score": r(self.score, 4)}
        if self.attention is not None:
            d["words"] = self.words
            d["attention"] = [[[r(x, 3) for x in row] for row in m] for m in self.attention] if rounded \
                else self.attention
        return d

    @staticmethod
    def arrow_type(attention: bool = False):
        """The Arrow type of an image's captions, a list (best first) of to_dict(rounded=True)'s dicts: the
        ``captions`` column of Parquet outputs and Ray Datasets. Floats are float64, so the rounded values
        read back exactly as JSON records hold them."""
        import pyarrow as pa

        fields = [("caption", pa.string()), ("log_prob", pa.float64()), ("score", pa.float64())]
        if attention:
            fields += [("words", pa.list_(pa.string())), ("attention", pa.list_(pa.list_(pa.list_(pa.float64()))))]
        return pa.list_(pa.struct(fields))


@dataclass
class Answer:
    index: int  # position of the chosen answer in the given choices
    text: str  # that choice, as given
    probs: list[float]  # softmax over the choices, in the given order

    def to_dict(self) -> dict:
        return {"index": self.index, "answer": self.text, "probs": self.probs}


ENCODER_BACKENDS = ("torch", "onnxruntime")


def default_checkpoint() -> Path:
    return Path(__file__).resolve().parent / "models" / "default"


class Captioner:
    def __init__(self, model: CaptionModel, vocab: Vocabulary, precision: str = "auto", path: Path | None = None,
                 channels_last: bool = True, encode_chunk: int | None = None, encoder_backend: str = "torch") -> None:
        self.model = model.eval()
        self.memory_format = memory_format(channels_last)  # the encoder's weights and inputs, in one place
        self.model.encoder.to(memory_format=self.memory_format)
        self.vocab = vocab
        self.cfg = model.cfg
        self.precision = resolve_precision(precision, self.device)  # 'auto' -> what this device runs natively
        self.path = path
        self.transform = eval_transform(self.cfg.preprocess)
        # images per encoder call (None: the whole batch). On CPU, 8 at a time keep the first block's activations in
        # cache: 1.3-1.6x per image (bench/encoder.py); a GPU wants the whole batch
        self.encode_chunk = encode_chunk or (8 if self.device.type == "cpu" else None)
        self.encoder_backend = encoder_backend
        self._ort_encoder = None
        if encoder_backend == "onnxruntime":
            if self.device.type != "cpu":
                raise ValueError(f'encoder backend "onnxruntime" runs on the CPU; this model is on {self.device}')
            from .onnx_export import OrtEncoder
            self._ort_encoder = OrtEncoder(self.model)
        elif encoder_backend != "torch":
            raise ValueError(f"encoder backend must be one of {ENCODER_BACKENDS}, not {encoder_backend!r}")

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        precision: str = "auto", channels_last: bool = True,
                        encode_chunk: int | None = None, fold_batch_norm: bool = True,
                        encoder_backend: str = "torch") -> "Captioner":
        """Load a checkpoint directory (default: the model shipped in the package) on ``device`` (default: CUDA if
        any), in ``precision`` ('auto': bf16 where the hardware has it natively), NHWC convolutions unless told,
        encoding ``encode_chunk`` images per encoder call (default: 8 on CPU, all on GPU), batch norm folded into
        the convolutions and the caption decoder's Linear weights stored in the precision's dtype (the loaded model
        is only run, under this Captioner's autocast; bench/encoder.py --fold-bn and bench/decode.py measure them),
        the encoder run by ``encoder_backend`` ('torch', or 'onnxruntime' on CPU: bench/onnxrt.py compares them)."""
        path = Path(path) if path is not None else default_checkpoint()
        dev = default_device() if device in (None, "auto") else torch.device(device)
        model, vocab = load_pretrained(path, dev)
        if fold_batch_norm:
            model.encoder.fold_batch_norm()
        cap = cls(model, vocab, precision, path, channels_last, encode_chunk, encoder_backend)
        cast_weights(model.decoder, cap.precision)
        return cap

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Captioner({c.name!r} v{c.version}, tasks={self.tasks}, {c.encoder.arch} encoder, "
                f"{c.decoder.num_layers}x{c.decoder.cell} decoder, {c.vocab_size} words, device={self.device}, "
                f"precision={self.precision})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def metrics(self) -> dict | None:
        return read_metrics(self.path) if self.path else None

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.stack([to_tensor(im, self.cfg.preprocess, self.transform) for im in images])

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> ImageFeatures:
        """A preprocessed batch (B, 3, S, S) -> its ImageFeatures (float32, on the model's device)."""
        if self._ort_encoder is not None:
            chunks = batch.split(self.encode_chunk) if self.encode_chunk else (batch,)
            return ImageFeatures.cat([self._ort_encoder(c) for c in chunks])
        with autocast(self.device, self.precision):
            x = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            chunks = x.split(self.encode_chunk) if self.encode_chunk else (x,)
            return ImageFeatures.cat([self.model.encode(c).float() for c in chunks])

    @property
    def has_attention(self) -> bool:
        return self.cfg.attention

    @torch.no_grad()
    def caption_batch(self, batch: torch.Tensor | None = None, features: ImageFeatures | None = None, *,
                      generation: GenerationConfig | None = None, generator: torch.Generator | None = None,
                      **options) -> list[list[Caption]]:
        """Caption a preprocessed batch (B, 3, S, S) or precomputed features (encode()'s); returns n-best per image.
        ``generation`` and ``options`` as caption() takes them."""
        gen = with_options(generation, options)
        features = self.encode(batch) if features is None else features.to(self.device)
        with autocast(self.device, self.precision):
            hyp = self.model.generate(features=features, generation=gen, generator=generator)
        toks, lps, scs = hyp.tokens.tolist(), hyp.log_probs.tolist(), hyp.scores.tolist()
        out = [[Caption(self.vocab.decode(t), lp, s) for t, lp, s in zip(ti, li, si)] for ti, li, si in zip(toks, lps, scs)]
        if hyp.attention is not None:
            S = self.cfg.grid_size
            att = hyp.attention.float().cpu()  # (B, n, T, P)
            for i, caps in enumerate(out):
                for j, cap in enumerate(caps):
                    ids = [t for t in toks[i][j] if t not in (PAD_ID, BOS_ID)]
                    n = ids.index(EOS_ID) if EOS_ID in ids else len(ids)
                    cap.words = [self.vocab.itos[t] for t in ids[:n]]
                    cap.attention = att[i, j, :n].view(n, S, S).tolist()
        return out

    def caption(self, images: ImageInput | Sequence[ImageInput], generation: GenerationConfig | None = None,
                batch_size: int = 32, generator: torch.Generator | None = None,
                **options) -> list[Caption] | list[list[Caption]]:
        """Caption one image (-> list of captions) or a list of images (-> one list per image).

        Images may be paths, bytes, PIL images or tensors. How: ``generation`` (default GenerationConfig()) with any
        of its fields changed by keyword, e.g. ``caption(img, beam_size=5, num_captions=3)``. attention=True (attention models) adds each
        caption's words and per-word maps; ``generator`` seeds sampling.
        """
        gen = with_options(generation, options)  # invalid options fail before any image is read
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[list[Caption]] = []
        for i in range(0, len(items), batch_size):
            out += self.caption_batch(self.preprocess(items[i:i + batch_size]), generation=gen, generator=generator)
        return out[0] if single else out

    # ------------------------------------------------------------------ multiple-choice VQA

    @property
    def has_vqa(self) -> bool:
        return self.model.vqa is not None

    @property
    def tasks(self) -> list[str]:
        """What the checkpoint was trained for (config.json's tasks): ['vqa'] means the caption decoder is untrained."""
        return self.cfg.trained_tasks

    @property
    def can_caption(self) -> bool:
        return "caption" in self.cfg.trained_tasks

    @property
    def can_answer(self) -> bool:
        return "vqa" in self.cfg.trained_tasks  # the config guarantees the head

    def _require_vqa(self) -> None:
        if not self.has_vqa:
            where = f" {self.path}" if self.path else ""
            raise VQAUnavailableError(f"checkpoint{where} has no VQA head; use a model trained with "
                                      "`captioner train --task vqa` or `--task joint`")

    @torch.no_grad()
    def answer_batch(self, features: ImageFeatures, questions: Sequence[str],
                     choices: Sequence[Sequence[str]]) -> list[Answer]:
        """Answer one multiple-choice question per image from encoded images ``features`` (encode()'s).

        The choice lists may differ in length (2..cfg.vqa.max_choices). Raises VQAInputError for bad input.
        """
        self._require_vqa()
        q, c, m, _ = encode_batch(self.vocab, self.cfg.vqa, questions, choices)
        want = (len(questions), self.cfg.encoder.feature_dim)
        if features.fc.shape != want:
            raise VQAInputError(f"features.fc must be (B={want[0]}, {want[1]}), got {tuple(features.fc.shape)}")
        dev = self.device
        with autocast(dev, self.precision):
            logits = self.model.answer_logits(features.to(dev), q.to(dev), c.to(dev), m.to(dev))
        probs = logits.float().softmax(-1).cpu()  # padding choices: exactly 0
        out = []
        for i, cs in enumerate(choices):
            p = probs[i, :len(cs)]
            k = int(p.argmax())
            out.append(Answer(k, cs[k], p.tolist()))
        return out

    def answer_many(self, images: Sequence[ImageInput], questions: Sequence[str],
                    choices_list: Sequence[Sequence[str]], batch_size: int = 32) -> list[Answer]:
        """One question (with its own choices) per image; images may repeat."""
        self._require_vqa()
        if not (len(images) == len(questions) == len(choices_list)):
            raise VQAInputError(f"got {len(images)} images, {len(questions)} questions and "
                                f"{len(choices_list)} lists of choices; need one of each per question")
        encode_batch(self.vocab, self.cfg.vqa, questions, choices_list)  # reject bad text before any image work
        out: list[Answer] = []
        for i in range(0, len(images), batch_size):
            features = self.encode(self.preprocess(images[i:i + batch_size]))
            out += self.answer_batch(features, questions[i:i + batch_size], choices_list[i:i + batch_size])
        return out

    def answer(self, image: ImageInput, question: str, choices: Sequence[str]) -> Answer:
        """Pick one of ``choices`` (2..cfg.vqa.max_choices strings) as the answer to ``question`` about ``image``."""
        return self.answer_many([image], [question], [choices])[0]
