"""ONNX export of a caption model (``captioner export --format onnx``), for ONNX Runtime, Triton or TensorRT: the
encoder and the caption decoder's single step, with the preprocessing and vocabulary beside them.

    encoder.onnx        pixels (N, 3, S, S) float32, preprocessed as config.json's "preprocess" says -> fc (N, D)
    decoder_start.onnx  fc (N, D) -> image_term (N, G*H) = W_ih·v, h (L, N, H) [, c (L, N, H) for an LSTM]
    decoder_step.onnx   tokens (N,) int64, image_term, h [, c] -> logits (N, V), h_next [, c_next]
    config.json, vocab.json   the model's own (one schema, one tokenizer); decoding.json: how to run the step

The step always adds image_term to layer 0's input: for a first-step model (decoding.json "image_every_step":
false) pass zeros after step 0. A search is the caller's (greedy_search below is the reference, and the test
that holds the export to torch's captions; OnnxModel runs it); the rules torch's searches follow are in decoding.json: never <pad>,
<bos> or <unk>, no <eos> at step 0, only <eos> at step max_length.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError
from .features import ImageFeatures
from .fileio import atomic_dir
from .model import CaptionModel
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocabulary

OPSET = 18


class _Encoder(nn.Module):
    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode(pixels).fc  # (N, D)


class _Start(nn.Module):
    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, fc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_term = self.decoder.precompute(ImageFeatures(fc))[0]  # (N, G*H)
        return (image_term, *self.decoder.init_state(fc.shape[0]))  # each (L, N, H)


class _Step(nn.Module):
    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens: torch.Tensor, image_term: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # t = 0: both injection cores add the image term then; the caller passes zeros where a model wants none
        logits, new_state, _ = self.decoder.step(tokens, tuple(state), (image_term,), 0)
        return (logits, *new_state)


def export_encoder(model: CaptionModel, path: Path | None = None):
    """The encoder (float32, eval mode) as ONNX: pixels (N, 3, S, S) -> fc (N, D), N dynamic. Written to ``path``, or
    returned as the in-memory ONNXProgram when it is None (the onnxruntime encoder backend builds its session from it)."""
    S = model.cfg.preprocess.image_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        return torch.onnx.export(_Encoder(model).eval(), (torch.randn(2, 3, S, S),), path, input_names=["pixels"],
                                 output_names=["fc"], dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4096)},),
                                 opset_version=OPSET, dynamo=True, verbose=False, external_data=False)


def export_onnx(model: CaptionModel, vocab: Vocabulary, out: str | Path, files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (float32, eval mode) as the ONNX files above into ``out``, atomically, with ``files`` (name ->
    text: the model card, metrics.json) beside them."""
    cfg = model.cfg
    if cfg.attention or cfg.decoder.members > 1:
        raise CheckpointError("--format onnx exports FC decoders (inject every/first) of one member: an attention "
                              "step needs the grid and returns maps, an ensemble one state per member")
    model = model.float().eval()
    D = cfg.encoder.feature_dim
    L, H = cfg.decoder.num_layers, cfg.decoder.hidden_dim
    lstm = cfg.decoder.cell == "lstm"
    states = ["h", "c"] if lstm else ["h"]
    n = torch.export.Dim("n", min=1, max=4096)
    batch = {0: n}
    fc = torch.randn(2, D)
    image_term = model.decoder.precompute(ImageFeatures(fc))[0]
    state = tuple(torch.zeros(L, 2, H) for _ in states)

    def write(folder: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # every input's batch axis is the one Dim n: the exporter says it keeps one name for them
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            export_encoder(model, folder / "encoder.onnx")
            torch.onnx.export(_Start(model).eval(), (fc,), folder / "decoder_start.onnx", input_names=["fc"],
                              output_names=["image_term", *states], dynamic_shapes=(batch,),
                              opset_version=OPSET, dynamo=True, verbose=False, external_data=False)
            torch.onnx.export(_Step(model).eval(), (torch.tensor([BOS_ID, BOS_ID]), image_term, *state),
                              folder / "decoder_step.onnx", input_names=["tokens", "image_term", *states],
                              output_names=["logits", *(f"{s}_next" for s in states)],
                              dynamic_shapes=(batch, batch, tuple({1: n} for _ in states)),
                              opset_version=OPSET, dynamo=True, verbose=False, external_data=False)
        (folder / "config.json").write_text(cfg.to_json())
        vocab.save(folder / "vocab.json")
        (folder / "decoding.json").write_text(json.dumps({
            "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID, "unk_id": UNK_ID, "max_length": cfg.max_length,
            "image_every_step": cfg.decoder.inject == "every", "state": states,
            "never": [PAD_ID, BOS_ID, UNK_ID], "no_eos_at_step_0": True}, indent=2))
        for name, text in (files or {}).items():
            (folder / name).write_text(text)

    return atomic_dir(Path(out), write)


class OnnxModel:
    """An export run by ONNX Runtime: the three sessions, made once. ``greedy`` is the reference search."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.spec = json.loads((self.folder / "decoding.json").read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {name: ort.InferenceSession(str(self.folder / f"{name}.onnx"), opts,
                                                    providers=providers or ["CPUExecutionProvider"])
                         for name in ("encoder", "decoder_start", "decoder_step")}

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["encoder"].run(None, {"pixels": pixels.astype(np.float32)})[0]  # (N, D)

    def greedy(self, pixels: np.ndarray) -> list[list[int]]:
        """pixels (N, 3, S, S) float32 -> each image's token ids (without <eos>), as CaptionModel.generate with
        beam_size=1 gives them."""
        spec, step = self.spec, self.sessions["decoder_step"]
        fc = self.encode(pixels)
        image_term, *state = self.sessions["decoder_start"].run(None, {"fc": fc})
        zeros = np.zeros_like(image_term)
        n, T = len(fc), spec["max_length"]
        tokens = np.full(n, spec["bos_id"], dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        out: list[list[int]] = [[] for _ in range(n)]
        for t in range(T + 1):
            feed = {"tokens": tokens, "image_term": image_term if t == 0 or spec["image_every_step"] else zeros,
                    **dict(zip(spec["state"], state))}
            logits, *state = step.run(None, feed)
            logits[:, spec["never"]] = -np.inf
            if t == 0 and T > 0:
                logits[:, spec["eos_id"]] = -np.inf
            if t == T:
                keep = logits[:, spec["eos_id"]].copy()
                logits[:] = -np.inf
                logits[:, spec["eos_id"]] = keep
            tokens = logits.argmax(-1).astype(np.int64)
            for i in np.flatnonzero(~done):
                if tokens[i] != spec["eos_id"]:
                    out[i].append(int(tokens[i]))
            done |= tokens == spec["eos_id"]
            if done.all():
                break
        return out


def greedy_search(folder: str | Path, pixels: np.ndarray, providers: list[str] | None = None) -> list[list[int]]:
    """Reference greedy decoding of an export: OnnxModel(folder).greedy(pixels)."""
    return OnnxModel(folder, providers).greedy(pixels)


class OrtEncoder:
    """A loaded model's encoder run by ONNX Runtime on CPU (``Captioner.from_pretrained(...,
    encoder_backend="onnxruntime")``, ``pip install ".[onnx]"``): exported in memory once, at load (a few seconds);
    the caption decoder and the VQA head stay torch's. bench/onnxrt.py measures it against torch."""

    def __init__(self, model: CaptionModel) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError('encoder backend "onnxruntime" needs ONNX Runtime: pip install "captioner[onnx]"') from e
        if model.cfg.attention:
            raise ValueError('encoder backend "onnxruntime" exports the pooled features fc only; this model\'s decoder '
                             "attends over the grid: use the torch backend")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # the service's --torch-threads, or torch's default
        proto = export_encoder(model).model_proto.SerializeToString()  # a loaded model: float32, eval mode
        self.session = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels (N, 3, S, S) on the CPU -> ImageFeatures with fc (N, D) float32."""
        fc = self.session.run(None, {"pixels": pixels.float().contiguous().numpy()})[0]
        return ImageFeatures(torch.from_numpy(fc))
