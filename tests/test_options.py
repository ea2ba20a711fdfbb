"""The training commands' options (training/options.py): declared once as groups, composed by the command parsers,
passed down as typed frozen dataclasses; the argparse Namespace stops at the command layer."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from captioner.cli import RUNS, parsers
from training import options
from training.options import (CaptionData, CaptionTraining, DistillTraining, ModelOptions, Optimisation, RunOptions,
                               ScstOptions, VQAData, VQAHeadOptions, VQATraining)

ROOT = Path(__file__).resolve().parents[1]
CAPTION = ["--annotations", "a.json", "--images", "imgs", "--output", "runs/x"]
VQA = ["--task", "vqa", "--output", "runs/x"]
JOINT = ["--task", "joint", "--annotations", "a.json", "--images", "imgs", "--output", "runs/x"]


# ------------------------------------------------------------------------------------------- the Namespace's reach

def _entry_functions() -> set[tuple[str, str]]:
    """(file, 'main') of every module the captioner command runs: the command layer's entry functions."""
    return {(str(Path(*module.split("."))) + ".py", "main") for _, module in RUNS.values()}


def _takes_args(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A parameter named args (not *args), or one annotated as an argparse Namespace."""
    a = fn.args
    for p in (*a.posonlyargs, *a.args, *a.kwonlyargs):
        ann = ast.unparse(p.annotation) if p.annotation is not None else ""
        if p.arg == "args" or ann.endswith("Namespace"):
            return True
    return False


def test_no_function_below_the_command_layer_takes_args():
    """training/ and captioner/ (outside captioner/cli/, the command layer) take typed options or plain values. The
    exceptions: the entry functions the captioner command calls with the Namespace (captioner.cli.RUNS' main), the
    from_args() constructors that turn it into typed options (training/options.py's _from and recorded, the
    Namespace's two readers), and torch's __torch_function__ protocol."""
    entry = _entry_functions() | {("training/options.py", "_from"), ("training/options.py", "recorded")}
    allowed = {"from_args", "__torch_function__"}
    offenders = []
    files = [*(ROOT / "training").rglob("*.py"), *(ROOT / "captioner").rglob("*.py")]
    for path in files:
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("captioner", "cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _takes_args(node):
                if node.name in allowed or ((str(rel), node.name) in entry and node in tree.body):
                    continue
                offenders.append(f"{rel}:{node.lineno} {node.name}")
    assert not offenders, offenders
    assert ("training/train.py", "main") in entry and ("training/distill.py", "main") in entry


def test_the_scan_sees_an_args_parameter(tmp_path):
    fn = ast.parse("def f(model, args, device): pass\ndef g(*args): pass\ndef h(x: argparse.Namespace): pass").body
    assert [_takes_args(f) for f in fn] == [True, False, True]


# -------------------------------------------------------------------------------------------------- the groups

def test_amp_choices_are_the_runtime_precisions_and_off():
    from captioner import runtime

    assert options.AMP == (*runtime.PRECISIONS, "off") == (*parsers.PRECISIONS, "off")


def test_the_groups_build_typed_frozen_options():
    opts = CaptionTraining.from_args(parsers.train().parse_args(CAPTION + ["--epochs", "3", "--cell", "gru"]))
    assert opts.data == CaptionData(annotations="a.json", images="imgs")
    assert opts.model == ModelOptions(cell="gru")
    assert opts.scst == ScstOptions()
    assert opts.optim == Optimisation(epochs=3)  # lr resolved to 2e-3
    assert opts.run == RunOptions(output="runs/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.optim.lr = 1.0  # type: ignore[misc]
    # every option of the command lands in exactly one group (plus --task)
    declared = {a.dest for a in parsers.train()._actions if a.dest != "help"}
    grouped = {f.name for g in (CaptionData, ModelOptions, ScstOptions, Optimisation, RunOptions)
               for f in dataclasses.fields(g)}
    assert declared - grouped == {"task"}

    v = VQATraining.from_args(parsers.train_vqa().parse_args(VQA + ["--vqa-dataset", "v7w", "easy-vqa"]))
    assert v.task == "vqa" and v.vqa_data == VQAData(vqa_dataset=("v7w", "easy-vqa"))
    assert v.head == VQAHeadOptions() and v.head.config().hidden_dim == 256
    declared = {a.dest for a in parsers.train_vqa()._actions if a.dest != "help"}
    grouped = {f.name for g in (VQAData, CaptionData, ModelOptions, VQAHeadOptions, Optimisation, RunOptions)
               for f in dataclasses.fields(g)}
    assert declared - grouped == {"task"}
    assert grouped - declared == {"feature_views", "fresh_decoder", "channels_last"}  # `train` only: their off value

    d = DistillTraining.from_args(parsers.distill().parse_args(["x.jpg", "--out", "runs/d"]))
    assert d.images.inputs == ("x.jpg",) and d.run.out == "runs/d" and d.optim.epochs == 30


def test_each_command_keeps_its_own_defaults():
    """The defaults that differ between `train` and `train --task vqa|joint` (and distill) stay as they were."""
    cap = parsers.train().parse_args(CAPTION)
    vqa = parsers.train_vqa().parse_args(VQA)
    dis = parsers.distill().parse_args(["--out", "d"])
    assert (cap.min_count, vqa.min_count) == (5, 3)
    assert (cap.inject, vqa.inject) == (None, "every")
    assert (cap.embed_dim, cap.hidden_dim, vqa.embed_dim, vqa.hidden_dim) == (256, 512, None, None)
    assert (cap.lr, vqa.lr, dis.lr) == (None, 2e-3, 2e-3)
    assert (cap.epochs, cap.batch_size, cap.weight_decay) == (10, 32, 0.0)
    assert (dis.epochs, dis.batch_size, dis.weight_decay) == (30, 64, 0.05)
    assert (cap.cell, vqa.cell) == ("rnn", "rnn")
    # resolved where the commands resolve them
    assert CaptionTraining.from_args(cap).optim.lr == 2e-3
    scst = CaptionTraining.from_args(parsers.train().parse_args(CAPTION + ["--scst"]))
    assert scst.optim.lr == 5e-5 and scst.record["lr"] == 5e-5  # metrics.json records the rate used
    small = VQATraining.from_args(vqa).model
    joint = VQATraining.from_args(parsers.train_vqa().parse_args(JOINT)).model
    assert (small.embed_dim, small.hidden_dim, joint.embed_dim, joint.hidden_dim) == (32, 32, 256, 512)
    # the help says where the defaults differ
    text = " ".join(parsers.train().format_help().split())
    assert "3 with --task vqa|joint" in text and "--task vqa: 32" in text
    with pytest.raises(SystemExit):  # caption training needs its data; --task joint checks it when it runs
        parsers.train().parse_args(["--output", "o"])


def test_the_record_is_the_command_line():
    args = parsers.train_vqa().parse_args(JOINT + ["--vqa-dataset", "v7w"])
    rec = VQATraining.from_args(args).record
    assert rec["vqa_dataset"] == ["v7w"] and rec["task"] == "joint" and rec["embed_dim"] is None
    assert set(rec) == set(vars(args))


def test_vqa_parser_takes_the_attention_options_and_they_reach_the_model():
    """--inject attention with --task vqa|joint: its --attention-* options are accepted and used (before, the parser
    took --inject attention but not them, so the defaults were used silently)."""
    args = parsers.train_vqa().parse_args(JOINT + ["--inject", "attention", "--attention-dim", "8",
                                                   "--no-attention-gate", "--attention-penalty", "0.25"])
    opts = VQATraining.from_args(args)
    cfg = opts.model.model_config(20, 16, "x", opts.head.config())
    assert cfg.attention and cfg.decoder.attention_dim == 8 and cfg.decoder.attention_gate is False
    assert opts.model.attention_penalty == 0.25
    # unchanged defaults: what --task joint --inject attention built before
    default = VQATraining.from_args(parsers.train_vqa().parse_args(JOINT + ["--inject", "attention"])).model
    assert (default.attention_dim, default.attention_gate, default.attention_penalty) == (256, True, 1.0)


def test_model_config_matches_the_presets():
    from captioner.config import override_encoder, preset

    m = ModelOptions(arch="compact", encoder_layers="8,M,16,M", fc_dims="32", image_size=32, cell="gru")
    cfg = m.model_config(12, 16, "run")
    want = override_encoder(preset("compact", cell="gru", inject="every", embed_dim=256, hidden_dim=512, num_layers=1,
                                   dropout=0.5, attention_dim=256, attention_gate=True), "8,M,16,M", "32", 32)
    want.vocab_size, want.max_length, want.name = 12, 16, "run"
    assert cfg == want
    with pytest.raises(ValueError):
        ModelOptions(cell="transformer").model_config(12, 16, "run")
    kept = cfg.decoder
    assert m.fresh_decoder_config(dataclasses.replace(kept, members=3)) == kept  # same shape, one member
    att = dataclasses.replace(m, inject="attention", attention_dim=8).fresh_decoder_config(kept)
    assert att.inject == "attention" and att.attention_dim == 8 and att.cell == "gru"


def test_parsers_compose_the_groups_and_stay_light():
    """The parsers module declares no training option itself: each comes from a group of training/options.py."""
    text = (ROOT / "captioner" / "cli" / "parsers.py").read_text()
    for flag in ("--epochs", "--min-count", "--inject", "--output", "--vqa-cell", "--teacher-size"):
        assert f'"{flag}"' not in text, flag
