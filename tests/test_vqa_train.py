"""`captioner train --task vqa|joint` and `captioner evaluate --task vqa` on a tiny synthetic Visual7W set."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captioner.api import Captioner
from captioner.checkpoint import CheckpointError
from captioner.cli import main as cli
from training import engine, train_vqa
from captioner.cli import parsers

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
TINY = ["--encoder-layers", "8,M,16,M,16,M", "--fc-dims", "32", "--image-size", "32", "--vqa-embed-dim", "16",
        "--vqa-hidden-dim", "16", "--vqa-mlp-dim", "32", "--vqa-dropout", "0", "--workers", "0", "--amp", "off",
        "--warmup-steps", "1", "--lr", "1e-2", "--batch-size", "4", "--min-count", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 images of one coloured square each; per image a colour question (4 choices) and a yes/no question;
    a Visual7W file (train/val) and a Karpathy caption file for the same images."""
    root = tmp_path_factory.mktemp("vqa-data")
    (root / "images").mkdir()
    v7w, karpathy = [], []
    names = list(COLOURS)
    for n in range(24):
        colour = names[n % 4]
        rng = np.random.default_rng(n)
        a = rng.integers(0, 40, (36, 36, 3)).astype(np.uint8)
        a[6:30, 6:30] = COLOURS[colour]
        Image.fromarray(a).save(root / "images" / f"v7w_{n}.png")
        split = "val" if n >= 16 else "train"
        asked = names[(n * 7) % 4]
        v7w.append({"image_id": n, "filename": f"v7w_{n}.png", "split": split, "qa_pairs": [
            {"qa_id": 2 * n, "type": "what", "question": "What colour is the square?", "answer": colour,
             "multiple_choices": [c for c in names if c != colour]},
            {"qa_id": 2 * n + 1, "type": "yes/no", "question": f"Is the square {asked}?",
             "answer": "yes" if asked == colour else "no", "multiple_choices": ["no" if asked == colour else "yes"]}]})
        caps = [f"a {colour} square", f"the {colour} square on a dark background"]
        karpathy.append({"filename": f"v7w_{n}.png", "filepath": "images", "imgid": n, "split": split,
                         "sentences": [{"raw": c, "tokens": c.split(), "imgid": n, "sentid": 2 * n + j}
                                       for j, c in enumerate(caps)]})
    (root / "v7w.json").write_text(json.dumps({"dataset": "v7w_telling", "images": v7w}))
    (root / "karpathy.json").write_text(json.dumps({"dataset": "tiny", "images": karpathy}))
    return root


def _vqa_args(data, out, *extra):
    return ["train", "--task", "vqa", "--vqa-dataset", "v7w", "--vqa-annotations", str(data / "v7w.json"),
            "--vqa-images", str(data / "images"), "--output", str(out), *TINY, *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vqa"
    assert cli(_vqa_args(data, out, "--epochs", "10", "--encoder-dropout", "0")) == 0
    return out


def test_training_learns(trained):
    rows = _rows(trained)
    assert [r["epoch"] for r in rows] == list(range(10))
    assert rows[-1]["train_vqa_loss"] < 0.6 * rows[0]["train_vqa_loss"]
    best = json.loads((trained / "best" / "metrics.json").read_text())
    assert best["tasks"] == ["vqa"] and best["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert best["val_accuracy"] > best["val_chance"] + 0.25  # 16 val questions, chance 0.375
    assert set(best["val_accuracy_per_type"]) == {"what", "yes/no"}
    cfg = json.loads((trained / "best" / "config.json").read_text())
    assert cfg["vqa"]["hidden_dim"] == 16 and cfg["encoder"]["layers"] == [8, "M", 16, "M", 16, "M"]
    words = json.loads((trained / "best" / "vocab.json").read_text())["itos"]
    assert {"colour", "square", "yellow", "yes", "no"} <= set(words)  # questions and answers are in the vocabulary
    state = torch.load(trained / "last" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 9
    assert "untrained" in (trained / "best" / "README.md").read_text()
    cap = Captioner.from_pretrained(trained / "best", device="cpu")
    assert cap.has_vqa and cap.tasks == ["vqa"]


def test_resume_is_exact(data, tmp_path, monkeypatch):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--epochs", "2", "--batch-size", "8"]
    assert cli(_vqa_args(data, straight, *args)) == 0
    real = engine.train_one_epoch  # the one epoch loop

    def crash_in_epoch_1(*a, **k):
        if a[5] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", crash_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        cli(_vqa_args(data, split, *args))
    monkeypatch.setattr(engine, "train_one_epoch", real)
    first = load_file(split / "last" / "model.safetensors")
    assert cli(_vqa_args(data, split, *args, "--resume")) == 0
    assert [r["epoch"] for r in _rows(split)] == [0, 1]
    a, b = load_file(straight / "last" / "model.safetensors"), load_file(split / "last" / "model.safetensors")
    assert any(not torch.equal(first[k], b[k]) for k in b)  # the resumed run did train
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cli(_vqa_args(data, tmp_path / "nothing", "--resume")) == 2  # "...training_state.pt not found", one line
    with pytest.raises(CheckpointError, match="training_state.pt not found"):
        train_vqa.main(parsers.train_vqa().parse_args(_vqa_args(data, tmp_path / "nothing", "--resume")[1:]))


def test_evaluate_with_baselines(data, trained, tmp_path, capsys):
    blind = tmp_path / "blind"
    assert cli(_vqa_args(data, blind, "--epochs", "1", "--image-blind")) == 0
    assert json.loads((blind / "best" / "metrics.json").read_text())["image_blind"] is True
    out = tmp_path / "res.json"
    assert cli(["evaluate", "--task", "vqa", "--checkpoint", str(trained / "best"), "--dataset", "v7w",
                "--annotations", str(data / "v7w.json"), "--images", str(data / "images"), "--split", "val",
                "--blind-checkpoint", str(blind / "best"), "--workers", "0", "--out", str(out),
                "--precision", "fp32"]) == 0  # as trained (--amp off): 'auto' is bf16 on a CPU with native bf16
    printed = capsys.readouterr().out
    assert "chance" in printed and "blind model" in printed
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    for k in ("image", "zero", "blind_model"):
        assert m[k]["questions"] == 16 and set(m[k]["per_type"]) == {"what", "yes/no"}
    assert m["image"]["chance"] == pytest.approx((8 * 0.25 + 8 * 0.5) / 16)
    best = json.loads((trained / "best" / "metrics.json").read_text())
    assert m["image"]["accuracy"] == pytest.approx(best["val_accuracy"])  # evaluation agrees with training
    results = json.loads(out.read_text())
    assert len(results) == 16
    assert sum(r["pred"] == r["answer"] for r in results) / 16 == pytest.approx(m["image"]["accuracy"])
    caption_only = tmp_path / "none"
    with pytest.raises(SystemExit, match="no VQA head"):
        from tests.conftest import TINY_WORDS, tiny_model_config  # noqa: F401
        from captioner.checkpoint import save_pretrained
        from captioner.model import CaptionModel
        from captioner.tokenizer import Vocabulary
        save_pretrained(CaptionModel(tiny_model_config()), Vocabulary(TINY_WORDS), caption_only)
        cli(["evaluate", "--task", "vqa", "--checkpoint", str(caption_only), "--dataset", "v7w", "--annotations",
             str(data / "v7w.json"), "--images", str(data / "images"), "--split", "val", "--workers", "0",
             "--out", str(tmp_path / "r2.json")])


def test_joint_training(data, tmp_path, monkeypatch):
    from captioner.model import CaptionModel

    batches, real_encode = [], CaptionModel.encode

    def spy(self, images):
        if self.training:
            batches.append(images.size(0))
        return real_encode(self, images)

    monkeypatch.setattr(CaptionModel, "encode", spy)
    out = tmp_path / "joint"
    assert cli(["train", "--task", "joint", "--annotations", str(data / "karpathy.json"), "--images", str(data),
                "--vqa-dataset", "v7w", "--vqa-annotations", str(data / "v7w.json"), "--vqa-images",
                str(data / "images"), "--output", str(out), "--epochs", "2", "--no-java", "--eval-beam", "1",
                "--embed-dim", "16", "--hidden-dim", "24", "--max-length", "8", *TINY]) == 0
    rows = _rows(out)
    # one encoder pass per step holds both tasks' images: 4 caption + 4 VQA; 16 train images / 4 = 4 steps, 2 epochs
    assert batches and max(batches) == 8 and len(batches) == 2 * 4, batches
    assert all(r["train_caption_loss"] > 0 and r["train_vqa_loss"] > 0 for r in rows)
    assert rows[-1]["train_caption_loss"] < rows[0]["train_caption_loss"]
    m = json.loads((out / "best" / "metrics.json").read_text())
    assert m["tasks"] == ["caption", "vqa"]
    assert m["score"] == pytest.approx(m["val_accuracy"] + m["CIDEr-D"])
    words = set(json.loads((out / "best" / "vocab.json").read_text())["itos"])
    assert {"background", "dark", "colour", "yes"} <= words  # caption-only and question-only words
    cap = Captioner.from_pretrained(out / "best", device="cpu")
    assert cap.tasks == ["caption", "vqa"]
    img = data / "images" / "v7w_17.png"
    assert cap.caption(img)[0].log_prob < 0  # the decoder runs (2 tiny epochs may well say nothing useful)
    assert len(cap.answer(img, "What colour is the square?", list(COLOURS)).probs) == 4


def test_joint_attention_takes_its_attention_options(data, tmp_path):
    """--task joint --inject attention: the --attention-* options are accepted (as by `captioner train`) and used:
    the decoder is built with them and the caption loss gets the penalty."""
    from captioner.model import CaptionModel
    from tests.conftest import tiny_model_config

    out = tmp_path / "att"
    assert cli(["train", "--task", "joint", "--annotations", str(data / "karpathy.json"), "--images", str(data),
                "--vqa-dataset", "v7w", "--vqa-annotations", str(data / "v7w.json"), "--vqa-images",
                str(data / "images"), "--output", str(out), "--epochs", "1", "--no-java", "--eval-beam", "1",
                "--embed-dim", "16", "--hidden-dim", "24", "--max-length", "8", "--inject", "attention",
                "--attention-dim", "8", "--no-attention-gate", "--attention-penalty", "0.5", *TINY]) == 0
    dec = json.loads((out / "best" / "config.json").read_text())["decoder"]
    assert (dec["inject"], dec["attention_dim"], dec["attention_gate"]) == ("attention", 8, False)
    assert json.loads((out / "best" / "metrics.json").read_text())["args"]["attention_penalty"] == 0.5
    model = CaptionModel(tiny_model_config(inject="attention", attention_dim=8))
    assert train_vqa.TaskLoss(model, 0.0, False, 0.5).caption.penalty == 0.5


def test_init_from_continues_a_trained_model(data, trained, tmp_path):
    out = tmp_path / "more"
    assert cli(_vqa_args(data, out, "--epochs", "1", "--init-from", str(trained / "best"), "--lr", "1e-4")) == 0
    before = json.loads((trained / "best" / "metrics.json").read_text())
    after = json.loads((out / "last" / "metrics.json").read_text())
    assert after["val_accuracy"] >= before["val_accuracy"] - 0.13  # starts trained (16 val questions: 2 may flip)
    assert after["val_accuracy"] > after["val_chance"] + 0.25
    assert (out / "last" / "vocab.json").read_text() == (trained / "best" / "vocab.json").read_text()
    with pytest.raises(SystemExit, match="no VQA head"):
        from captioner.checkpoint import save_pretrained
        from captioner.model import CaptionModel
        from captioner.tokenizer import Vocabulary
        from tests.conftest import TINY_WORDS, tiny_model_config
        save_pretrained(CaptionModel(tiny_model_config()), Vocabulary(TINY_WORDS), tmp_path / "caption-only")
        cli(_vqa_args(data, tmp_path / "x", "--init-from", str(tmp_path / "caption-only")))


def test_fresh_head_on_a_caption_model_mixing_datasets(data, tmp_path):
    """--fresh-vqa-head on a caption-only model, encoder frozen, two datasets mixed: the encoder and the caption
    decoder (its rows of the words it knew) come out bit for bit as they went in, the model still says it captions (with its caption metrics),
    and the per-type results name each question's dataset."""
    pytest.importorskip("easy_vqa")
    from captioner.checkpoint import save_pretrained
    from captioner.model import CaptionModel
    from captioner.tokenizer import Vocabulary
    from tests.conftest import TINY_WORDS, tiny_model_config

    src = save_pretrained(CaptionModel(tiny_model_config()), Vocabulary(TINY_WORDS), tmp_path / "caption-only")
    (src / "metrics.json").write_text(json.dumps({"tasks": ["caption"], "split": "val", "beam_size": 3,
                                                  "BLEU-4": 0.123, "CIDEr-D": 0.321}))
    out = tmp_path / "fresh"
    assert cli(_vqa_args(data, out, "--epochs", "1", "--init-from", str(src), "--fresh-vqa-head", "--freeze-encoder",
                         "--feature-cache", str(tmp_path / "cache"), "--vqa-dataset", "v7w", "easy-vqa",
                         "--max-train-questions", "40", "--max-val-questions", "20")) == 0
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "last" / "model.safetensors"))
    kept = [k for k in before if k.startswith(("decoder.", "encoder."))]
    # the vocabulary grew by the questions' words: the decoder's rows of the words it knew are the ones it had
    assert kept and all(torch.equal(before[k], after[k][: before[k].size(0)] if before[k].dim() else after[k])
                        for k in kept)
    assert after["decoder.W_hy.weight"].size(0) > before["decoder.W_hy.weight"].size(0)
    assert any(k.startswith("vqa.") for k in after)
    m = json.loads((out / "last" / "metrics.json").read_text())
    assert m["tasks"] == ["caption", "vqa"] and m["BLEU-4"] == 0.123 and m["CIDEr-D"] == 0.321
    assert m["vqa_dataset"] == "v7w+easy-vqa"
    assert {t.split("/")[0] for t in m["val_accuracy_per_type"]} == {"v7w", "easy-vqa"}
    cfg = json.loads((out / "last" / "config.json").read_text())
    assert cfg["vqa"]["hidden_dim"] == 16
    assert Captioner.from_pretrained(out / "last", device="cpu").tasks == ["caption", "vqa"]
    with pytest.raises(SystemExit, match="at most one besides easy-vqa"):
        cli(_vqa_args(data, tmp_path / "x", "--vqa-dataset", "v7w", "vqa-mc"))


def test_stop_after_ends_early_on_the_full_schedule(data, tmp_path):
    out, full = tmp_path / "boxed", tmp_path / "full"
    assert cli(_vqa_args(data, out, "--epochs", "3", "--stop-after", "1")) == 0
    assert [r["epoch"] for r in _rows(out)] == [0]
    assert cli(_vqa_args(data, full, "--epochs", "3")) == 0
    assert _rows(out)[0]["lr"] == pytest.approx(_rows(full)[0]["lr"])  # the 3-epoch cosine, not a 1-epoch one
    assert cli(_vqa_args(data, out, "--epochs", "3", "--resume")) == 0
    assert [r["epoch"] for r in _rows(out)] == [0, 1, 2]
    assert _rows(out)[-1]["val_accuracy"] == pytest.approx(_rows(full)[-1]["val_accuracy"])


def test_init_from_grows_the_vocabulary_with_new_answer_words(data, trained, tmp_path, caplog):
    """The same questions with the colours renamed to words the trained model never saw: --init-from extends its
    vocabulary (old ids kept) instead of reading every new answer as <unk> (which makes the four choices identical,
    so no training could get above chance), and the head learns the new words."""
    renamed = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden"}
    v7w = json.loads((data / "v7w.json").read_text())
    for im in v7w["images"]:
        for qa in im["qa_pairs"]:
            if qa["type"] == "what":
                qa["answer"] = renamed[qa["answer"]]
                qa["multiple_choices"] = [renamed[c] for c in qa["multiple_choices"]]
    (tmp_path / "renamed.json").write_text(json.dumps(v7w))
    out = tmp_path / "renamed"
    args = _vqa_args(data, out, "--epochs", "8", "--init-from", str(trained / "best"), "--seed", "1")
    args[args.index("--vqa-annotations") + 1] = str(tmp_path / "renamed.json")
    with caplog.at_level("INFO", logger="captioner.engine"):
        assert cli(args) == 0
    old = json.loads((trained / "best" / "vocab.json").read_text())["itos"]
    new = json.loads((out / "best" / "vocab.json").read_text())["itos"]
    assert new[: len(old)] == old and set(new[len(old):]) == set(renamed.values())
    assert "the vocabulary grows by 4 words" in caplog.text
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["val_accuracy_per_type"]["what"] >= 0.75  # 8 val questions, 4 choices each: chance 0.25
