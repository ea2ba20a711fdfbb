"""The VQA head on tiny configs: shapes, choice masking, permutation, padding invariance, config round trip."""
from __future__ import annotations

import json

import pytest
import torch

from captioner.config import ModelConfig, VQAConfig
from captioner.features import ImageFeatures
from captioner.model import CaptionModel
from captioner.tokenizer import PAD_ID, Vocabulary
from captioner.vqa import VQAUnavailableError, encode_batch, pad_choices
from tests.conftest import TINY_WORDS, tiny_model_config


def tiny_vqa_model(cell: str = "lstm", seed: int = 0) -> CaptionModel:
    cfg = tiny_model_config()
    cfg.vqa = VQAConfig(cell=cell, embed_dim=8, hidden_dim=12, mlp_dim=16, dropout=0.0)
    torch.manual_seed(seed)
    return CaptionModel(cfg).eval()


VOCAB = Vocabulary(TINY_WORDS)


def _batch(questions, choices):
    q, c, m, _ = encode_batch(VOCAB, VQAConfig(), questions, choices)
    return q, c, m


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_shapes_and_mixed_choice_counts(cell):
    model = tiny_vqa_model(cell)
    q, c, m = _batch(["a dog on the grass", "two people in the water"], [["red", "ball", "cat", "dog"], ["a man", "two"]])
    assert c.shape == (2, 4, 2) and m.tolist() == [[True] * 4, [True, True, False, False]]
    logits = model.answer_logits(ImageFeatures(torch.randn(2, 32)), q, c, m)
    assert logits.shape == (2, 4)
    p = logits.softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(2))
    assert p[1, 2:].max() == 0  # padding choices get exactly zero probability


def test_masked_choices_never_win_even_with_real_tokens():
    model = tiny_vqa_model()
    q, c, m = _batch(["a dog"] * 3, [["red", "ball", "cat"]] * 3)
    free = model.answer_logits(ImageFeatures(torch.randn(3, 32)), q, c, m)
    # mask out whichever choice won: it must lose and carry no probability, whatever its tokens say
    m2 = m.clone()
    m2[torch.arange(3), free.argmax(-1)] = False
    v = ImageFeatures(torch.randn(3, 32))
    logits = model.answer_logits(v, q, c, m2)
    p = logits.softmax(-1)
    assert (p[~m2] == 0).all()
    assert m2[torch.arange(3), logits.argmax(-1)].all()
    # the real choices keep their logits: masking only touches the masked ones
    full = model.answer_logits(v, q, c, m)
    assert torch.allclose(logits[m2], full[m2])


def test_permuting_choices_permutes_probabilities():
    model = tiny_vqa_model("gru")
    v = ImageFeatures(torch.randn(1, 32))
    choices = ["red ball", "a cat", "the dog", "two people", "water"]
    q, c, m = _batch(["a man on the grass"], [choices])
    p = model.answer_logits(v, q, c, m).softmax(-1)[0]
    perm = [3, 0, 4, 1, 2]
    q2, c2, m2 = _batch(["a man on the grass"], [[choices[i] for i in perm]])
    p2 = model.answer_logits(v, q2, c2, m2).softmax(-1)[0]
    assert torch.allclose(p2, p[perm], atol=1e-6)
    assert not torch.allclose(p, p[perm])  # the probabilities do differ, so the check means something


def test_padding_in_a_batch_changes_nothing():
    """A short question next to a long one (more padding; the backward RNN starts at its own last word)."""
    model = tiny_vqa_model("lstm")
    v = ImageFeatures(torch.randn(2, 32))
    alone = model.answer_logits(v[:1], *_batch(["a dog"], [["red", "cat"]]))
    q, c, m = _batch(["a dog", "two people on the grass in the water"], [["red", "cat"], ["a red ball", "cat", "man"]])
    together = model.answer_logits(v, q, c, m)
    assert q.shape[1] > 2 and c.shape[2] > 1
    assert torch.allclose(alone[0], together[0, :2], atol=1e-5)


def test_answers_depend_on_image_and_question():
    model = tiny_vqa_model()
    with torch.no_grad():
        for layer in (model.vqa.q_fwd, model.vqa.q_bwd):
            layer.W_ih.weight.mul_(20)
    q, c, m = _batch(["a dog", "a dog"], [["red", "cat", "ball"]] * 2)
    v = ImageFeatures(torch.randn(2, 32) * 3)
    lg = model.answer_logits(v, q, c, m)
    assert not torch.allclose(lg[0], lg[1])
    blind = model.answer_logits(ImageFeatures(torch.zeros(2, 32)), q, c, m)  # the image-blind path: v = 0
    assert torch.allclose(blind[0], blind[1])
    q2, c2, m2 = _batch(["two people", "a dog"], [["red", "cat", "ball"]] * 2)
    assert not torch.allclose(model.answer_logits(v, q2, c2, m2)[0], lg[0])


def test_backward_reaches_encoder_and_head():
    model = tiny_vqa_model().train()
    q, c, m = _batch(["a dog"], [["red", "cat"]])
    images = torch.randn(2, 3, 32, 32)
    v = model.encode(images)
    loss = torch.nn.functional.cross_entropy(model.answer_logits(v[:1], q, c, m), torch.tensor([1]))
    loss.backward()
    assert model.encoder.features[0].weight.grad.abs().sum() > 0
    assert model.vqa.a_rnn.W_xh.weight.grad.abs().sum() > 0
    assert model.decoder.W_hy.weight.grad is None  # the caption decoder takes no part


def test_caption_only_model_has_no_head():
    model = CaptionModel(tiny_model_config())
    assert model.vqa is None and not any(k.startswith("vqa.") for k in model.state_dict())
    q, c, m = _batch(["a dog"], [["red", "cat"]])
    with pytest.raises(VQAUnavailableError, match="no VQA head"):
        model.answer_logits(ImageFeatures(torch.zeros(1, 32)), q, c, m)


def test_config_round_trip_and_old_configs():
    cfg = tiny_vqa_model().cfg
    d = json.loads(cfg.to_json())
    assert d["vqa"]["hidden_dim"] == 12
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.vqa, VQAConfig)
    old = tiny_model_config()
    assert "vqa" not in json.loads(old.to_json())  # caption-only config.json is unchanged
    assert ModelConfig.from_json(old.to_json()).vqa is None
    d["vqa"] = None  # an explicit null is a caption-only model too ...
    with pytest.raises(ValueError, match="no VQA head"):  # ... which cannot say it was trained to answer
        ModelConfig.from_dict(d)
    d["tasks"] = ["caption"]
    assert ModelConfig.from_dict(d).vqa is None
    d["vqa"] = {"cell": "lstm", "bogus": 1}
    with pytest.raises(ValueError, match="unknown keys in config.vqa"):
        ModelConfig.from_dict(d)
    d["vqa"] = {"cell": "transformer"}
    with pytest.raises(ValueError, match="vqa.cell"):
        ModelConfig.from_dict(d)


def test_pad_choices_layout():
    tokens, mask = pad_choices([[[5, 6], [7]], [[8], [9], [10, 11, 12]]])
    assert tokens.shape == (2, 3, 3)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert tokens[0, 2].tolist() == [PAD_ID] * 3 and tokens[1, 2].tolist() == [10, 11, 12]
