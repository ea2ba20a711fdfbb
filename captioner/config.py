"""The one model configuration schema, stored as ``config.json`` in every checkpoint directory.

Architecture, preprocessing and vocabulary size travel together so that a checkpoint fully
describes how to rebuild the network and how to feed it images.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# A VGG is a list of conv widths with 'M' for 2x2 max-pooling (torchvision's layout).
VGG_LAYERS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    # Compact: vgg11 at half width with batch norm, global pooling and a small FC head; trains on a CPU.
    "compact": [32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M"],
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreprocessConfig:
    image_size: int = 224  # square crop fed to the encoder
    resize: int = 256  # shorter side is resized to this before cropping
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


@dataclass
class EncoderConfig:
    arch: str = "vgg16"
    layers: list[int | str] = field(default_factory=lambda: list(VGG_LAYERS["vgg16"]))
    batch_norm: bool = False
    pool_size: int = 7  # adaptive average pool to pool_size x pool_size before the FC head (1 = global)
    fc_dims: list[int] = field(default_factory=lambda: [4096, 4096])  # v = output of the last FC (+ReLU)
    dropout: float = 0.5

    @property
    def feature_dim(self) -> int:
        return self.fc_dims[-1] if self.fc_dims else self.channels

    @property
    def channels(self) -> int:
        return [c for c in self.layers if c != "M"][-1]

    def grid_size(self, image_size: int) -> int:
        """Cells per side of the annotation grid attention reads: the conv stack's output before its last max-pool
        (7 for the compact encoder at 112 px, 14 for VGG16 at 224 px, as in Show-Attend-Tell)."""
        pools = [c for c in self.layers if c == "M"]
        if self.layers and self.layers[-1] == "M":
            pools = pools[:-1]
        s = image_size
        for _ in pools:
            s //= 2
        return s


@dataclass
class DecoderConfig:
    cell: str = "rnn"  # rnn | gru | lstm
    # every (NeuralTalk: W_ih v at every step) | first (Show-and-Tell: only at t=0) | attention (Show-Attend-Tell:
    # W_ih z_t at every step, z_t a soft-attention average of the encoder's conv grid)
    inject: str = "every"
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    learn_h0: bool = True
    # decoders of this shape whose next-word probabilities are averaged at every step (an ensemble, built by
    # `captioner export --add-decoders` from members trained on the same frozen encoder)
    members: int = 1
    attention_dim: int = 256  # inject=attention: width of e_ti = w^T tanh(W_a a_i + U_a h_{t-1})
    attention_gate: bool = True  # inject=attention: z_t scaled by beta_t = sigmoid(f_beta(h_{t-1})) (Xu et al. 4.2.1)


@dataclass
class VQAConfig:
    """Multiple-choice VQA head (captioner/vqa.py): BiRNN question encoder with W_ih·v, RNN answer encoder, MLP scorer.

    Input limits live here so the API, the CLI and the service enforce the same ones: questions and answers
    longer than max_*_words words are truncated (documented normalisation); text over max_chars characters,
    fewer than 2 or more than max_choices choices are errors.
    """
    cell: str = "lstm"  # rnn | gru | lstm, for both the question and the answer encoder
    embed_dim: int = 128
    hidden_dim: int = 256  # per direction of the question BiRNN, and the answer RNN
    mlp_dim: int = 512  # scorer hidden width
    dropout: float = 0.2
    max_choices: int = 32
    max_question_words: int = 30
    max_answer_words: int = 16
    max_chars: int = 1000


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    vocab_size: int = 0
    max_length: int = 20  # longest caption (words, without <bos>/<eos>) the decoder is trained and run for
    name: str = "captioner"
    version: str = "0"
    vqa: VQAConfig | None = None  # the multiple-choice VQA head, when the checkpoint has one
    # what the weights were trained for: ['vqa'] is a VQA model whose caption decoder was never trained. None (a
    # config from before this field, or a model not yet saved by training) -> its heads (trained_tasks)
    tasks: list[str] | None = None

    def __post_init__(self) -> None:
        if self.tasks is not None:
            if not self.tasks or set(self.tasks) - {"caption", "vqa"}:
                raise ValueError(f"tasks must be one or both of 'caption', 'vqa', got {self.tasks!r}")
            self.tasks = [t for t in ("caption", "vqa") if t in self.tasks]  # one order, no repeats
            if "vqa" in self.tasks and self.vqa is None:
                raise ValueError("tasks names 'vqa' but the config has no VQA head")
        if self.decoder.cell not in ("rnn", "gru", "lstm"):
            raise ValueError(f"decoder.cell must be rnn, gru or lstm, got {self.decoder.cell!r}")
        if self.decoder.inject not in ("every", "first", "attention"):
            raise ValueError(f"decoder.inject must be 'every', 'first' or 'attention', got {self.decoder.inject!r}")
        if self.attention and self.decoder.members > 1:
            raise ValueError("decoder ensembles (members > 1) do not support inject=attention: each member would "
                             "need its own heatmaps; ensemble FC decoders, or use one attention decoder")
        if self.decoder.num_layers < 1:
            raise ValueError("decoder.num_layers must be >= 1")
        if self.decoder.members < 1:
            raise ValueError("decoder.members must be >= 1")
        if self.vqa is not None:
            if self.vqa.cell not in ("rnn", "gru", "lstm"):
                raise ValueError(f"vqa.cell must be rnn, gru or lstm, got {self.vqa.cell!r}")
            if self.vqa.max_choices < 2:
                raise ValueError("vqa.max_choices must be >= 2")

    def __eq__(self, other: object) -> bool:  # as saved: a config whose tasks are unsaid equals one that says them
        return self.to_dict() == other.to_dict() if isinstance(other, ModelConfig) else NotImplemented

    @property
    def trained_tasks(self) -> list[str]:
        """tasks, or when not said: caption, and vqa when there is a VQA head (config.json always says it)."""
        return list(self.tasks) if self.tasks is not None else ["caption"] + (["vqa"] if self.vqa is not None else [])

    @property
    def attention(self) -> bool:
        return self.decoder.inject == "attention"

    @property
    def grid_size(self) -> int:
        """Cells per side of the conv grid an attention decoder reads (ImageFeatures.att holds its cells row-major)."""
        return self.encoder.grid_size(self.preprocess.image_size)

    @property
    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per image, the fields of CaptionModel.encode()'s ImageFeatures: fc (D,), and for attention att (P, C)."""
        shapes = {"fc": (self.encoder.feature_dim,)}
        if self.attention:
            shapes["att"] = (self.grid_size ** 2, self.encoder.channels)
        return shapes

    @property
    def decoder_image_dim(self) -> int:
        """The width of what W_ih multiplies: v, or one annotation vector a_i of the grid."""
        return self.encoder.channels if self.attention else self.encoder.feature_dim

    def to_dict(self) -> dict[str, Any]:
        d = {"format": "captioner/1", **asdict(self), "tasks": self.trained_tasks}
        if not self.attention:  # keys only attention reads: FC config.json stays readable by older releases
            del d["decoder"]["attention_dim"], d["decoder"]["attention_gate"]
        if d["vqa"] is None:
            del d["vqa"]  # caption-only config.json stays exactly as before
        if d["decoder"]["members"] == 1:
            del d["decoder"]["members"]  # so does a single decoder's: older releases read it
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        fmt = d.pop("format", "captioner/1")
        if fmt != "captioner/1":
            raise ValueError(f"unsupported config format {fmt!r}")
        sub = {"encoder": EncoderConfig, "decoder": DecoderConfig, "preprocess": PreprocessConfig, "vqa": VQAConfig}
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            val = d[f.name]
            if f.name in sub and val is not None:
                known = {g.name for g in fields(sub[f.name])}
                unknown = set(val) - known
                if unknown:
                    raise ValueError(f"unknown keys in config.{f.name}: {sorted(unknown)}")
                val = sub[f.name](**val)
                if f.name == "preprocess":
                    val.mean, val.std = tuple(val.mean), tuple(val.std)
            kwargs[f.name] = val
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def override_encoder(cfg: ModelConfig, layers: str | None = None, fc_dims: str | None = None,
                     image_size: int | None = None, resize: int | None = None, pool_size: int | None = None,
                     dropout: float | None = None) -> ModelConfig:
    """The command-line encoder overrides of `captioner train` and `captioner distill`, e.g. layers '32,M,64,M',
    fc_dims '512'; resize defaults to 8/7 of a new image_size (like 256/224)."""
    if layers:
        cfg.encoder.layers = [c if c == "M" else int(c) for c in layers.split(",")]
        cfg.encoder.arch = "custom"
    if fc_dims:
        cfg.encoder.fc_dims = [int(d) for d in fc_dims.split(",")]
    if pool_size:
        cfg.encoder.pool_size = pool_size
    if dropout is not None:
        cfg.encoder.dropout = dropout
    if image_size:
        cfg.preprocess.image_size = image_size
        cfg.preprocess.resize = resize or round(image_size * 8 / 7)
    elif resize:
        cfg.preprocess.resize = resize
    return cfg


def preset(arch: str, **decoder_kwargs: Any) -> ModelConfig:
    """A ready ModelConfig for a named encoder: vgg11/13/16/19 (optionally '_bn') or compact."""
    bn = arch.endswith("_bn")
    base = arch[:-3] if bn else arch
    if base not in VGG_LAYERS:
        raise ValueError(f"unknown encoder arch {arch!r}; choose from {sorted(VGG_LAYERS)} (vgg* may end in _bn)")
    if base == "compact":
        enc = EncoderConfig(arch="compact", layers=list(VGG_LAYERS["compact"]), batch_norm=True,
                            pool_size=1, fc_dims=[512], dropout=0.2)
        pre = PreprocessConfig(image_size=128, resize=146)
    else:
        enc = EncoderConfig(arch=arch, layers=list(VGG_LAYERS[base]), batch_norm=bn)
        pre = PreprocessConfig()
    return ModelConfig(encoder=enc, decoder=DecoderConfig(**decoder_kwargs), preprocess=pre)
