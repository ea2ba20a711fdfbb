"""Captioner.answer / answer_many / answer_batch, input errors, checkpoints with a VQA head, `captioner ask`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.api import Answer, Captioner
from captioner.checkpoint import load_pretrained, save_pretrained
from captioner.cli import _pick
from captioner.cli import main as cli
from captioner.features import ImageFeatures
from captioner.tokenizer import Vocabulary
from captioner.vqa import VQAInputError, VQAUnavailableError
from tests.conftest import TINY_WORDS
from tests.test_vqa_model import tiny_vqa_model


@pytest.fixture
def vqa_checkpoint(tmp_path):
    model = tiny_vqa_model()
    with torch.no_grad():  # a stronger image term, so different images give different answers
        for layer in (model.vqa.q_fwd, model.vqa.q_bwd):
            layer.W_ih.weight.mul_(30)
    return save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "vqa-ckpt", metrics={"tasks": ["vqa"]})


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_answer_and_batches_agree(vqa_checkpoint, images):
    cap = Captioner.from_pretrained(vqa_checkpoint, device="cpu")
    assert cap.has_vqa and cap.tasks == ["vqa"]
    qs = ["a dog on the grass?", "two people?", "a red ball?"]
    cs = [["red", "cat"], ["a man", "two people", "water", "grass"], ["ball", "dog", "cat"]]
    many = cap.answer_many(images, qs, cs)
    for im, q, c, a in zip(images, qs, cs, many):
        one = cap.answer(im, q, c)
        assert isinstance(one, Answer) and one.index == a.index and one.text == c[one.index]
        assert len(one.probs) == len(c) and abs(sum(one.probs) - 1) < 1e-5
        assert one.probs == pytest.approx(a.probs, abs=1e-5)  # mixed choice counts in one batch change nothing
        assert one.probs[one.index] == max(one.probs)
    v = cap.encode(cap.preprocess(images))
    batch = cap.answer_batch(v, qs, cs)  # the service's path: one shared encoder pass
    assert [len(a.probs) for a in batch] == [2, 4, 3]
    assert sum((a.probs for a in batch), []) == pytest.approx(sum((a.probs for a in many), []), abs=1e-5)
    d = batch[1].to_dict()
    assert set(d) == {"index", "answer", "probs"} and d["answer"] in cs[1]
    # the image matters: the same question on different images gets different probabilities
    same = cap.answer_many(images, ["a dog?"] * 3, [["red", "cat", "ball"]] * 3)
    assert len({tuple(round(p, 4) for p in a.probs) for a in same}) > 1


@pytest.mark.parametrize("question, choices, match", [
    ("a dog?", ["red"], "at least 2 choices"),
    ("a dog?", [], "at least 2 choices"),
    ("a dog?", [f"choice {i}" for i in range(33)], "at most 32 choices"),
    ("", ["red", "cat"], "question is empty"),
    ("   \n ", ["red", "cat"], "question is empty"),
    ("?!", ["red", "cat"], "has no words"),
    ("a dog?", ["red", "  "], "choice 2 is empty"),
    ("a dog?", ["red", "..."], "choice 2 .* has no words"),
    ("a dog?", ["Red.", "cat", "red"], r"choices 1 and 3 are the same answer \('Red\.' and 'red'\)"),
    ("x" * 1001, ["red", "cat"], "1001 characters long; the limit is 1000"),
    ("a dog?", ["red", "y" * 5000], "choice 2 is 5000 characters"),
    ("a dog?", "red, cat", "must be a list"),
    ("a dog?", ["red", 3], "choice 2 must be a string"),
    (None, ["red", "cat"], "question must be a string"),
])
def test_bad_input_is_a_clear_error(vqa_checkpoint, images, question, choices, match):
    cap = Captioner.from_pretrained(vqa_checkpoint, device="cpu")
    with pytest.raises(VQAInputError, match=match):
        cap.answer(images[0], question, choices)


def test_long_text_is_truncated_not_rejected(vqa_checkpoint, images):
    cap = Captioner.from_pretrained(vqa_checkpoint, device="cpu")
    long_q = " ".join(["dog"] * 200)  # 799 characters: under the limit, truncated to max_question_words
    a = cap.answer(images[0], long_q, ["red " * 50, "cat"])
    b = cap.answer(images[0], " ".join(["dog"] * cap.cfg.vqa.max_question_words), ["red " * 16, "cat"])
    assert a.probs == pytest.approx(b.probs, abs=1e-6)


def test_batch_shape_errors(vqa_checkpoint, images):
    cap = Captioner.from_pretrained(vqa_checkpoint, device="cpu")
    with pytest.raises(VQAInputError, match="2 images, 1 questions"):
        cap.answer_many(images[:2], ["a dog?"], [["red", "cat"]])
    with pytest.raises(VQAInputError, match=r"features\.fc must be \(B=1, 32\), got \(3, 32\)"):
        cap.answer_batch(ImageFeatures(torch.zeros(3, 32)), ["a dog?"], [["red", "cat"]])


def test_caption_only_checkpoint(tiny_checkpoint, images):
    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu")  # written before VQA existed: no "vqa" key
    assert "vqa" not in json.loads((tiny_checkpoint / "config.json").read_text())
    assert not cap.has_vqa and cap.tasks == ["caption"]
    assert cap.caption(images[0])[0].text  # captions still work
    with pytest.raises(VQAUnavailableError, match="has no VQA head"):
        cap.answer(images[0], "a dog?", ["red", "cat"])


def test_checkpoint_round_trip_with_vqa_head(vqa_checkpoint):
    cfg = json.loads((vqa_checkpoint / "config.json").read_text())
    assert cfg["vqa"]["hidden_dim"] == 12
    model, vocab = load_pretrained(vqa_checkpoint)
    ref = tiny_vqa_model()
    with torch.no_grad():
        for layer in (ref.vqa.q_fwd, ref.vqa.q_bwd):
            layer.W_ih.weight.mul_(30)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert {k for k in sd if k.startswith("vqa.")} == {k for k in ref_sd if k.startswith("vqa.")} != set()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)


def test_ask_cli(vqa_checkpoint, tiny_checkpoint, tmp_path, capsys):
    img = tmp_path / "q.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(img)
    assert cli(["ask", str(img), "-q", "what colour is the ball?", "-c", "red", "-c", "a cat",
                "--checkpoint", str(vqa_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: what colour is the ball?") and out.count("->") == 1 and "a cat" in out
    assert cli(["ask", str(img), "-q", "a dog?", "-c", "red", "-c", "cat", "-c", "ball", "--json",
                "--checkpoint", str(vqa_checkpoint)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["answer"] == ["red", "cat", "ball"][d["index"]] and len(d["probs"]) == 3
    # bad input: exit status 2 and one clear line, no traceback
    for argv, msg in [(["-c", "red"], "at least 2 choices"), (["-c", "red", "-c", "RED"], "same answer"),
                      (["-c", "red", "-c", "cat", "--checkpoint", str(tiny_checkpoint)], "no VQA head")]:
        if "--checkpoint" not in argv:
            argv = argv + ["--checkpoint", str(vqa_checkpoint)]
        assert cli(["ask", str(img), "-q", "a dog?"] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("captioner ask: error:") and msg in err
    assert cli(["ask", str(tmp_path / "nope.jpg"), "-q", "a dog?", "-c", "a", "-c", "b",
                "--checkpoint", str(vqa_checkpoint)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_task_is_an_ordinary_option_that_picks_the_options_and_the_module():
    from captioner.cli import parsers

    assert _pick("train", ["--task", "vqa", "--output", "x"]) == (parsers.train_vqa, "training.train_vqa")
    assert _pick("train", ["--task=joint"])[1] == "training.train_vqa"
    assert _pick("evaluate", ["--task", "vqa"])[1] == "training.evaluate_vqa"
    assert _pick("train", ["--output", "x", "--task", "caption", "--epochs", "1"]) == (parsers.train, "training.train")
    assert _pick("evaluate", ["--task=caption"]) == (parsers.evaluate, "training.evaluate")
    assert _pick("caption", ["--task", "vqa"])[1] == "captioner.cli.caption"  # caption has no --task: argparse says so
    with pytest.raises(SystemExit, match="must be one of caption, vqa"):
        _pick("evaluate", ["--task", "joint"])
    # every parser of a command with tasks declares --task, so the value the user gave is in its Namespace
    assert parsers.train().parse_args(["--annotations", "a", "--images", "i", "--output", "o"]).task == "caption"
    assert parsers.train_vqa().parse_args(["--task", "joint", "--output", "o"]).task == "joint"
