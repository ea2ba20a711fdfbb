"""The options of the training commands, each declared once. A group is a function that adds an argument group to a
parser and a frozen dataclass that ``from_args()`` builds from the parsed Namespace; captioner/cli/parsers.py composes
the groups into each command's parser, and the command entry functions (``main(args)`` of training/train.py,
training/train_vqa.py, training/distill.py) turn the Namespace into these dataclasses: nothing below them sees it.
No torch here (argparse, dataclasses, captioner.config), so `captioner CMD --help` never imports it.

    group            function                     dataclass        commands
    caption data     add_caption_data()           CaptionData      train, train --task joint
    VQA data         add_vqa_data()               VQAData          train --task vqa|joint
    model            add_model_options()          ModelOptions     train, train --task vqa|joint
    VQA head         add_vqa_head_options()       VQAHeadOptions   train --task vqa|joint
    SCST             add_scst_options()           ScstOptions      train
    optimisation     add_optimisation_options()   Optimisation     train, train --task vqa|joint, distill (a subset)
    run              add_run_options()            RunOptions       train, train --task vqa|joint
    distill          add_distill_images(), add_student_options(), add_teacher_options(), add_cached_labels(),
                     add_distill_output() -> DistillImages, StudentOptions, TeacherOptions, CachedLabels, DistillRun

What a command was asked comes down as one bundle of them: CaptionTraining, VQATraining, DistillTraining.

Where the commands had differing defaults each keeps its own (and the help says so):

    option                 train                        train --task vqa|joint        distill
    --annotations/--images required                     optional (--task joint needs)
    --min-count            5                            3
    --inject               unset (= every; with         every
                           --fresh-decoder: the kept
                           model's)
    --embed-dim            256                          unset (= 256 joint, 32 vqa)
    --hidden-dim           512                          unset (= 512 joint, 32 vqa)
    --lr                   unset (= 2e-3, 5e-5 with     2e-3                          2e-3
                           --scst)
    --epochs, --batch-size, --weight-decay   10, 32, 0 (both)                         30, 64, 0.05

Only `train` has --feature-views, --fresh-decoder, --channels-last and the SCST group; only --task vqa|joint the VQA
data and VQA head groups. Declaring the model group once gave `train` --pool-size, --encoder-dropout and --resize
(as --task vqa|joint had them) and --task vqa|joint the --attention-dim/-gate/-penalty of --inject attention (before,
it took --inject attention but used their defaults silently).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any

from captioner.config import DecoderConfig, ModelConfig, VQAConfig, override_encoder, preset
from captioner.fileio import portable

# = captioner.runtime.PRECISIONS + "off" (a test checks): training's --amp
AMP = ("auto", "fp32", "bf16", "fp16", "off")
CELLS = ("rnn", "gru", "lstm")


def _from(cls, args: argparse.Namespace):
    """cls from the Namespace values named like its fields (lists as tuples: the dataclasses are frozen). A field the
    command does not declare keeps its default, which is what that command does (--task vqa has no --fresh-decoder:
    False; distill has no --schedule: cosine, the engine's)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names})


def recorded(args: argparse.Namespace, **resolved: Any) -> dict:
    """The command line as metrics.json records it ("args"): its plain values (``resolved`` ones replaced, e.g. a
    default that depends on other options), paths made portable."""
    values = {**vars(args), **resolved}
    return portable({k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None), list))})


def _add(group, specs: dict[str, dict], only=None, defaults: dict | None = None, help: dict | None = None) -> None:
    """--dest-with-dashes for each spec (in ``only``, if given), ``defaults`` and ``help`` overriding the spec's."""
    for dest, kw in specs.items():
        if only is not None and dest not in only:
            continue
        kw = dict(kw)
        if defaults and dest in defaults:
            kw["default"] = defaults[dest]
        if help and dest in help:
            kw["help"] = help[dest]
        group.add_argument("--" + dest.replace("_", "-"), **kw)


# ----------------------------------------------------------------------------------------------------- caption data

@dataclass(frozen=True)
class CaptionData:
    """Which captions to learn from and validate on, and how they are read."""
    dataset: str = "karpathy"
    annotations: str | None = None
    images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    max_train_images: int = 0
    max_val_images: int = 0
    min_count: int = 5
    max_length: int = 16
    captions_per_image: int = 5
    workers: int = 2

    from_args = classmethod(_from)


def add_caption_data(p: argparse.ArgumentParser, *, required: bool = True, min_count: int = 5,
                     title: str = "data") -> None:
    """The caption data options; ``required``: --annotations and --images must be given (`captioner train`; --task
    joint checks them itself), ``min_count``: the command's --min-count default."""
    _add(p.add_argument_group(title), {
        "dataset": dict(choices=["karpathy", "coco"], default="karpathy"),
        "annotations": dict(required=required, help="Karpathy split JSON, or COCO captions_train*.json"
                            + ("" if required else " (--task joint: required)")),
        "images": dict(required=required, help="image root (Karpathy) or train image folder (COCO)"
                       + ("" if required else " (--task joint: required)")),
        "val_annotations": dict(help="COCO: captions_val*.json (Karpathy: same file as --annotations)"),
        "val_images": dict(help="COCO: val image folder"),
        "train_split": dict(default="train"),
        "val_split": dict(default="val"),
        "max_train_images": dict(type=int, default=0, help="use only the first N training images (0 = all)"),
        "max_val_images": dict(type=int, default=0, help="validate on the first N images (0 = all)"),
        "min_count": dict(type=int, default=min_count,
                          help="words seen fewer times become <unk>; counted over captions, and with --task vqa|joint "
                               "questions and answers too (default: 5 for `captioner train`, 3 with --task vqa|joint)"),
        "max_length": dict(type=int, default=16, help="longest caption in words"),
        "captions_per_image": dict(type=int, default=5, help="captions drawn per image per step"),
        "workers": dict(type=int, default=2, help="DataLoader worker processes"),
    })


# -------------------------------------------------------------------------------------------------------- VQA data

@dataclass(frozen=True)
class VQAData:
    """Which multiple-choice questions to learn from and validate on."""
    vqa_dataset: tuple[str, ...] = ("easy-vqa",)
    vqa_annotations: str | None = None
    vqa_questions: str | None = None
    vqa_images: str | None = None
    vqa_val_annotations: str | None = None
    vqa_val_questions: str | None = None
    vqa_val_images: str | None = None
    vqa_train_split: str = "train"
    vqa_val_split: str = "val"
    num_choices: int = 4
    max_train_questions: int = 0
    max_val_questions: int = 0
    questions_per_image: int = 8
    flip: bool = False

    from_args = classmethod(_from)


def add_vqa_data(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("VQA data"), {
        "vqa_dataset": dict(nargs="+", choices=["easy-vqa", "v7w", "vqa-mc"], default=["easy-vqa"],
                            help="one or more, mixed in every step (e.g. v7w easy-vqa: questions from `captioner "
                                 "make-vqa` plus the shapes); the file options below belong to the one that is not "
                                 "easy-vqa"),
        "vqa_annotations": dict(help="v7w: dataset_v7w_telling.json; vqa-mc: train annotations"),
        "vqa_questions": dict(help="vqa-mc: train MultipleChoice questions JSON"),
        "vqa_images": dict(help="v7w / vqa-mc: image folder"),
        "vqa_val_annotations": dict(help="default: --vqa-annotations"),
        "vqa_val_questions": dict(help="default: --vqa-questions"),
        "vqa_val_images": dict(help="default: --vqa-images"),
        "vqa_train_split": dict(default="train"),
        "vqa_val_split": dict(default="val"),
        "num_choices": dict(type=int, default=4, help="easy-VQA: most choices per question"),
        "max_train_questions": dict(type=int, default=0,
                                    help="first N training questions of each dataset (0 = all)"),
        "max_val_questions": dict(type=int, default=0),
        "questions_per_image": dict(type=int, default=8, help="questions drawn per image per step"),
        "flip": dict(action="store_true", help="random horizontal flips (off: answers may say left/right)"),
    })


# ----------------------------------------------------------------------------------------------------------- model

@dataclass(frozen=True)
class ModelOptions:
    """The model a run builds (encoder, caption decoder), or the saved one it starts from, and how the encoder trains.
    embed_dim/hidden_dim None: the command's default (train_vqa resolves them before building)."""
    arch: str = "compact"
    encoder_layers: str | None = None
    fc_dims: str | None = None
    pool_size: int | None = None
    encoder_dropout: float | None = None
    image_size: int | None = None
    resize: int | None = None
    encoder_weights: str | None = None
    freeze_encoder: bool = False
    finetune_after: int = -1
    feature_cache: str = ".cache/features"
    feature_views: int = 1  # `captioner train` only
    image_blind: bool = False
    init_from: str | None = None
    fresh_decoder: bool = False  # `captioner train` only
    cell: str = "rnn"
    inject: str | None = None
    attention_dim: int = 256
    attention_gate: bool = True
    attention_penalty: float = 1.0
    embed_dim: int | None = 256
    hidden_dim: int | None = 512
    num_layers: int = 1
    dropout: float = 0.5

    from_args = classmethod(_from)

    @property
    def encoder_frozen_throughout(self) -> bool:
        return self.freeze_encoder and self.finetune_after < 0

    def model_config(self, vocab_size: int, max_length: int, name: str, vqa: VQAConfig | None = None) -> ModelConfig:
        """The validated config of a new model built from these options."""
        cfg = preset(self.arch, cell=self.cell, inject=self.inject or "every", embed_dim=self.embed_dim,
                     hidden_dim=self.hidden_dim, num_layers=self.num_layers, dropout=self.dropout,
                     attention_dim=self.attention_dim, attention_gate=self.attention_gate)
        override_encoder(cfg, self.encoder_layers, self.fc_dims, self.image_size, self.resize, self.pool_size,
                         self.encoder_dropout)
        return replace(cfg, vqa=vqa, vocab_size=vocab_size, max_length=max_length, name=name)  # replace validates

    def fresh_decoder_config(self, kept: DecoderConfig) -> DecoderConfig:
        """--fresh-decoder: one decoder of the kept model's shape, with --inject (and its --attention-* options) when
        that is given."""
        d = replace(kept, members=1)
        if self.inject:
            d = replace(d, inject=self.inject, attention_dim=self.attention_dim, attention_gate=self.attention_gate)
        return d


def add_model_options(p: argparse.ArgumentParser, *, task: str = "caption") -> None:
    """The model options of `captioner train` (task caption) or `captioner train --task vqa|joint` (task vqa): the
    same options but --feature-views and --fresh-decoder (caption only) and the defaults of --inject, --embed-dim and
    --hidden-dim."""
    caption = task == "caption"
    g = p.add_argument_group("model")
    _add(g, {
        "arch": dict(default="compact", help="compact, vgg11/13/16/19 (optionally _bn)"),
        "encoder_layers": dict(help="custom VGG layer list, e.g. '32,M,64,M,128,M' (overrides --arch's)"),
        "fc_dims": dict(help="encoder FC widths, e.g. '512' or '4096,4096'; the last is v's size"),
        "pool_size": dict(type=int, help="override the pooled grid before the FC head (1 = global average; >1 keeps "
                                         "where things are)"),
        "encoder_dropout": dict(type=float, help="override the preset's dropout after each encoder FC"),
        "image_size": dict(type=int, help="override the preset's crop size"),
        "resize": dict(type=int, help="shorter side before cropping (default: 8/7 of --image-size)"),
        "encoder_weights": dict(help="'imagenet' (torchvision weights API), a local .pth state dict, or the "
                                     "encoder.safetensors of captioner distill"),
        "freeze_encoder": dict(action="store_true", help="train the heads only (enables the feature cache)"),
        "finetune_after": dict(type=int, default=-1,
                               help="with --freeze-encoder: unfreeze the encoder from this epoch on (-1 = never)"),
        "feature_cache": dict(default=".cache/features", help="where frozen-encoder features are cached"),
    })
    if caption:
        _add(g, {"feature_views": dict(
            type=int, default=1, metavar="K",
            help="frozen encoder: cache K views of each training image (its centre crop and K-1 random crops and "
                 "flips, as an unfrozen encoder trains on) and draw one per image per step")})
    _add(g, {
        "image_blind": dict(action="store_true", help="baseline: v = 0, the model never sees the image"),
        "init_from": dict(help="start from this saved model directory (its config and vocabulary; the model flags "
                               "are ignored)"),
    })
    if caption:
        _add(g, {"fresh_decoder": dict(
            action="store_true",
            help="with --init-from: keep its encoder, vocabulary and VQA head but start a new caption decoder of the "
                 "same shape from random weights (--seed): a decoder refitted to a final encoder (the default "
                 "model's), or an ensemble member for `captioner export --add-decoders`")})
    _add(g, {
        "cell": dict(choices=list(CELLS), default="rnn", help="caption decoder cell"),
        "inject": dict(choices=["every", "first", "attention"], default=None if caption else "every",
                       help="how the image enters the caption decoder: every (W_ih v at every step, the default), "
                            "first (only at t=0) or attention (W_ih z_t, soft attention over the encoder's conv grid; "
                            "per-word heatmaps); `captioner train` leaves it unset so that with --init-from "
                            "--fresh-decoder it replaces the kept model's only when given"),
        "attention_dim": dict(type=int, default=256, help="--inject attention: width of the attention MLP"),
        "attention_gate": dict(action=argparse.BooleanOptionalAction, default=True,
                               help="--inject attention: scale z_t by a learned gate beta_t = sigmoid(f(h_{t-1}))"),
        "attention_penalty": dict(type=float, default=1.0, metavar="LAMBDA",
                                  help="--inject attention: weight of the doubly stochastic penalty "
                                       "sum_i (1 - sum_t alpha_ti)^2 (0 = off)"),
        "embed_dim": dict(type=int, default=256 if caption else None,
                          help="caption decoder word embedding (default: 256; --task vqa: 32, the decoder is "
                               "untrained there)"),
        "hidden_dim": dict(type=int, default=512 if caption else None,
                           help="caption decoder state (default: 512; --task vqa: 32)"),
        "num_layers": dict(type=int, default=1),
        "dropout": dict(type=float, default=0.5),
    })


# -------------------------------------------------------------------------------------------------------- VQA head

@dataclass(frozen=True)
class VQAHeadOptions:
    """The multiple-choice VQA head of a new model (or, with fresh_vqa_head, of an --init-from one)."""
    fresh_vqa_head: bool = False
    vqa_cell: str = "lstm"
    vqa_embed_dim: int = 128
    vqa_hidden_dim: int = 256
    vqa_mlp_dim: int = 512
    vqa_dropout: float = 0.2
    max_choices: int = 32

    from_args = classmethod(_from)

    def config(self) -> VQAConfig:
        return VQAConfig(cell=self.vqa_cell, embed_dim=self.vqa_embed_dim, hidden_dim=self.vqa_hidden_dim,
                         mlp_dim=self.vqa_mlp_dim, dropout=self.vqa_dropout, max_choices=self.max_choices)


def add_vqa_head_options(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("VQA head"), {
        "fresh_vqa_head": dict(action="store_true",
                               help="with --init-from: a new VQA head built from the --vqa-* flags below; the model's "
                                    "encoder, caption decoder and vocabulary are kept (it may be a caption-only "
                                    "model)"),
        "vqa_cell": dict(choices=list(CELLS), default="lstm"),
        "vqa_embed_dim": dict(type=int, default=128),
        "vqa_hidden_dim": dict(type=int, default=256),
        "vqa_mlp_dim": dict(type=int, default=512),
        "vqa_dropout": dict(type=float, default=0.2),
        "max_choices": dict(type=int, default=32),
    })


# ------------------------------------------------------------------------------------------------------------ SCST

@dataclass(frozen=True)
class ScstOptions:
    """Self-critical sequence training (training/scst.py)."""
    scst: bool = False
    scst_samples: int = 5
    scst_baseline: str = "mean"
    scst_bleu_weight: float = 0.0
    scst_object_weight: float = 0.0
    scst_labels: str | None = None

    from_args = classmethod(_from)


def add_scst_options(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("self-critical sequence training (needs --init-from or --resume)"), {
        "scst": dict(action="store_true", help="optimise CIDEr-D of sampled captions instead of cross-entropy"),
        "scst_samples": dict(type=int, default=5, help="captions sampled per image per step"),
        "scst_baseline": dict(choices=["mean", "greedy"], default="mean",
                              help="reward baseline: mean of the image's other samples, or its greedy caption"),
        "scst_bleu_weight": dict(type=float, default=0.0,
                                 help="reward = CIDEr-D + this x sentence BLEU-4 (0 = CIDEr-D alone)"),
        "scst_object_weight": dict(type=float, default=0.0,
                                   help="reward += this x the share of the photo's detected COCO objects that the "
                                        "caption names (Feng et al. 2019; needs --scst-labels; 0 = off)"),
        "scst_labels": dict(default=None, metavar="DIR",
                            help="a `captioner label` run covering the training photos: their detected objects "
                                 "(score >= 0.5, centre view) for --scst-object-weight"),
    })


# ---------------------------------------------------------------------------------------------------- optimisation

@dataclass(frozen=True)
class Optimisation:
    """The optimiser, its schedule and the engine's step (training/engine.py's fit() reads epochs, stop_after,
    warmup_steps, grad_clip, amp). lr None: not resolved yet (CaptionTraining.from_args resolves it)."""
    epochs: int = 10
    stop_after: int = 0
    batch_size: int = 32
    lr: float | None = 2e-3
    encoder_lr: float | None = None  # train only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # train only
    warmup_steps: int = 200
    grad_clip: float = 5.0
    label_smoothing: float = 0.0  # train only
    amp: str = "auto"
    channels_last: bool = True  # train and distill
    seed: int = 0

    from_args = classmethod(_from)


TRAIN_OPTIMISATION = tuple(f.name for f in fields(Optimisation))
VQA_OPTIMISATION = tuple(n for n in TRAIN_OPTIMISATION if n != "channels_last")
DISTILL_OPTIMISATION = ("epochs", "stop_after", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "amp",
                        "channels_last", "seed")


def add_optimisation_options(p: argparse.ArgumentParser, *, only: tuple[str, ...] = TRAIN_OPTIMISATION,
                             defaults: dict | None = None, help: dict | None = None) -> None:
    """The optimisation options in ``only`` (the command's: TRAIN_, VQA_ or DISTILL_OPTIMISATION), with the command's
    own ``defaults`` and ``help`` where they differ."""
    _add(p.add_argument_group("optimisation"), {
        "epochs": dict(type=int, default=10),
        "stop_after": dict(type=int, default=0, metavar="N",
                           help="end after N epochs of the --epochs schedule (0 = run it all); --resume goes on from "
                                "there"),
        "batch_size": dict(type=int, default=32, help="images per step per process"),
        "lr": dict(type=float, default=None, help="learning rate (default: 2e-3, or 5e-5 with --scst)"),
        "encoder_lr": dict(type=float, help="encoder learning rate (default: --lr)"),
        "weight_decay": dict(type=float, default=0.0),
        "schedule": dict(choices=["cosine", "constant"], default="cosine"),
        "warmup_steps": dict(type=int, default=200,
                             help="linear learning-rate warm-up, in steps; never more than a tenth of the run"),
        "grad_clip": dict(type=float, default=5.0, help="max gradient norm (0 = off)"),
        "label_smoothing": dict(type=float, default=0.0, help="caption loss only"),
        "amp": dict(choices=list(AMP), default="auto", help="autocast precision (off = fp32)"),
        "channels_last": dict(action=argparse.BooleanOptionalAction, default=True,
                              help="NHWC memory format for the encoder (faster on CPU and GPU)"),
        "seed": dict(type=int, default=0),
    }, only=only, defaults=defaults, help=help)


# ------------------------------------------------------------------------------------------------------------- run

@dataclass(frozen=True)
class RunOptions:
    """Where the run is written, where it runs, and how it is validated."""
    output: str
    resume: bool = False
    device: str = "auto"
    eval_beam: int = 3
    eval_batch_size: int = 64
    no_java: bool = False

    from_args = classmethod(_from)


def add_run_options(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("run"), {
        "output": dict(required=True, help="run directory: last/, best/, metrics.jsonl, curves.png"),
        "resume": dict(action="store_true", help="continue from OUTPUT/last exactly where it stopped"),
        "device": dict(default="auto"),
        "eval_beam": dict(type=int, default=3, help="beam size of the validation captions"),
        "eval_batch_size": dict(type=int, default=64),
        "no_java": dict(action="store_true", help="score with Python tokenization, skip METEOR"),
    })


# --------------------------------------------------------------------------------------------------------- bundles

@dataclass(frozen=True)
class CaptionTraining:
    """What `captioner train` was asked (training/train.py's train())."""
    data: CaptionData
    model: ModelOptions
    scst: ScstOptions
    optim: Optimisation
    run: RunOptions
    record: dict = field(default_factory=dict, compare=False)  # metrics.json's "args"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CaptionTraining":
        scst = ScstOptions.from_args(args)
        optim = Optimisation.from_args(args)
        if optim.lr is None:
            optim = replace(optim, lr=5e-5 if scst.scst else 2e-3)
        return cls(CaptionData.from_args(args), ModelOptions.from_args(args), scst, optim, RunOptions.from_args(args),
                   recorded(args, lr=optim.lr))


@dataclass(frozen=True)
class VQATraining:
    """What `captioner train --task vqa|joint` was asked (training/train_vqa.py's train()). model.embed_dim and
    hidden_dim are resolved (32 for --task vqa, whose caption decoder is untrained, else 256 and 512)."""
    task: str
    vqa_data: VQAData
    data: CaptionData
    model: ModelOptions
    head: VQAHeadOptions
    optim: Optimisation
    run: RunOptions
    record: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "VQATraining":
        small = args.task == "vqa"
        model = ModelOptions.from_args(args)
        model = replace(model, embed_dim=model.embed_dim or (32 if small else 256),
                        hidden_dim=model.hidden_dim or (32 if small else 512))
        optim = replace(Optimisation.from_args(args), channels_last=False)  # no --channels-last: VQA runs NCHW
        return cls(args.task, VQAData.from_args(args), CaptionData.from_args(args), model,
                   VQAHeadOptions.from_args(args), optim, RunOptions.from_args(args), recorded(args))


# ------------------------------------------------------------------------------------------------------- distill

@dataclass(frozen=True)
class DistillImages:
    """The images distillation learns from (no labels) and reports teacher agreement on."""
    inputs: tuple[str, ...] = ()
    dataset: str = "karpathy"
    annotations: str | None = None
    images: str | None = None
    split: str = "train"
    val_split: str | None = "val"
    max_val_images: int = 500
    workers: int = 2

    from_args = classmethod(_from)


def add_distill_images(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images (no labels are used)")
    g.add_argument("inputs", nargs="*", help="extra image files, folders, globs or @list.txt")
    _add(g, {
        "dataset": dict(choices=["karpathy", "coco"], default="karpathy"),
        "annotations": dict(help="take the images of this dataset split (with --images)"),
        "images": dict(help="image root of --annotations"),
        "split": dict(default="train", help="split of --annotations to learn from"),
        "val_split": dict(default="val", help="split of --annotations to report teacher agreement on"),
        "max_val_images": dict(type=int, default=500),
        "workers": dict(type=int, default=2),
    })


@dataclass(frozen=True)
class StudentOptions:
    """The student: the caption model's encoder layout."""
    arch: str = "compact"
    encoder_layers: str | None = None
    fc_dims: str | None = None
    image_size: int | None = None

    from_args = classmethod(_from)

    def model_config(self) -> ModelConfig:
        return override_encoder(preset(self.arch), self.encoder_layers, self.fc_dims, self.image_size)


def add_student_options(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("student (the caption model's encoder)"), {
        "arch": dict(default="compact", help="compact, vgg11/13/16/19 (optionally _bn)"),
        "encoder_layers": dict(help="custom VGG layer list, as for captioner train"),
        "fc_dims": dict(help="encoder FC widths, as for captioner train"),
        "image_size": dict(type=int, help="student crop size (use the caption model's)"),
    })


@dataclass(frozen=True)
class TeacherOptions:
    """The ImageNet teacher and the distillation loss."""
    teacher: str = "efficientnet-lite0"
    teacher_size: int = 224
    temperature: float = 1.0
    feature_weight: float = 1.0
    statistics_images: int = 2048
    min_scale: float = 0.25

    from_args = classmethod(_from)


def add_teacher_options(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("teacher"), {
        "teacher": dict(default="efficientnet-lite0",
                        help="the ImageNet network: efficientnet-lite0 (the names of training.distill.TEACHERS)"),
        "teacher_size": dict(type=int, default=224, help="crop size the teacher sees"),
        "temperature": dict(type=float, default=1.0),
        "feature_weight": dict(type=float, default=1.0, help="weight of the cosine feature loss next to KL"),
        "statistics_images": dict(type=int, default=2048,
                                  help="training images that set the mean/std used to standardise the teacher's "
                                       "features"),
        "min_scale": dict(type=float, default=0.25, help="smallest random-resized-crop area"),
    })


@dataclass(frozen=True)
class CachedLabels:
    """Distillation from a `captioner label` run instead of a live teacher."""
    labels: str | None = None
    hold_out: tuple[str, ...] | None = None
    object_weight: float = 1.0
    count_weight: float = 1.0
    object_threshold: float = 0.5

    from_args = classmethod(_from)


def add_cached_labels(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("cached labels (captioner label): the teacher and a COCO detector ran once; no teacher "
                              "here"), {
        "labels": dict(metavar="RUN", help="learn from this label run's photos and their cached views, teacher "
                                           "outputs and detected objects (every labelled photo but --hold-out and "
                                           "--val-split)"),
        "hold_out": dict(nargs="+", metavar="INPUT",
                         help="photos (files, folders, globs, @list.txt) never learnt from; with --labels they are "
                              "the held-out set the agreement is measured on"),
        "object_weight": dict(type=float, default=1.0, help="weight of the object presence loss (BCE)"),
        "count_weight": dict(type=float, default=1.0, help="weight of the object count loss"),
        "object_threshold": dict(type=float, default=0.5, help="detector score that counts an object"),
    })


@dataclass(frozen=True)
class DistillRun:
    """Where a distillation run is written and where it starts from."""
    out: str
    resume: bool = False
    init_from: str | None = None
    device: str = "auto"

    from_args = classmethod(_from)


def add_distill_output(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("output"), {
        "out": dict(required=True, help="run directory: encoder.safetensors, metrics.jsonl, training state"),
        "resume": dict(action="store_true", help="continue the run in --out"),
        "init_from": dict(metavar="RUN|MODEL",
                          help="start the student (and the teacher-feature statistics) from an earlier run's last "
                               "state, with a fresh optimizer and schedule: a warm restart for a run whose val KL was "
                               "still falling; or from a saved caption model's encoder (its layout and preprocessing; "
                               "the student flags are ignored), whose prediction heads are first fitted to the "
                               "teacher (with --labels: to the cached targets, objects and counts too) by least "
                               "squares; with --labels only a saved model is accepted"),
        "device": dict(default="auto"),
    })


DISTILL_DEFAULTS = {"epochs": 30, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05}


@dataclass(frozen=True)
class DistillTraining:
    """What `captioner distill` was asked (training/distill.py's distill())."""
    images: DistillImages
    student: StudentOptions
    teacher: TeacherOptions
    labels: CachedLabels
    optim: Optimisation
    run: DistillRun

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DistillTraining":
        return cls(DistillImages.from_args(args), StudentOptions.from_args(args), TeacherOptions.from_args(args),
                   CachedLabels.from_args(args), Optimisation.from_args(args), DistillRun.from_args(args))
