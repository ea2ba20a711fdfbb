"""CaptionModel.with_decoder / with_vqa_head: a new caption decoder or VQA head on a model, whose config and modules
agree (what --fresh-decoder, --fresh-vqa-head and `captioner export --add-decoders` do)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_pretrained, save_pretrained
from captioner.config import VQAConfig
from captioner.decoder import DecoderEnsemble, build_decoder
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.tokenizer import Vocabulary
from captioner.vqa import VQAHead
from tests.conftest import TINY_WORDS, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]


def _model(**decoder) -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel(tiny_model_config(**decoder)).eval()


def _round_trip(model: CaptionModel, tmp_path) -> CaptionModel:
    """Saved and loaded: load_pretrained rebuilds the modules from config.json and loads the weights strictly, so
    this fails unless the config describes the modules exactly."""
    loaded, _ = load_pretrained(save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "m"))
    assert loaded.cfg == model.cfg
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], rtol=0, atol=0, msg=k)
    return loaded


def test_with_decoder_builds_a_fresh_decoder_of_the_new_config(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(model.cfg.decoder, inject="attention", attention_dim=8, attention_gate=False)
    torch.manual_seed(3)
    new = model.with_decoder(cfg)
    torch.manual_seed(3)
    alone = build_decoder(cfg, model.cfg.vocab_size, replace(model.cfg, decoder=cfg).decoder_image_dim)
    # the same random numbers as building the decoder alone (as --fresh-decoder did by hand): same checkpoints
    for k, v in alone.state_dict().items():
        torch.testing.assert_close(new.decoder.state_dict()[k], v, rtol=0, atol=0)

    assert new.cfg.decoder is cfg and new.decoder.cfg is cfg and new.cfg.attention
    assert new.encoder is model.encoder and new.vqa is model.vqa is None  # shared, not copied
    assert new.training is model.training is False and not new.decoder.training
    # the original is untouched: its config still describes its own decoder
    assert model.cfg.decoder.inject == "every" and model.decoder.cfg.inject == "every"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert new.cfg.encoder == model.cfg.encoder and new.cfg.encoder is not model.cfg.encoder  # a copy

    loaded = _round_trip(new, tmp_path)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.generate(images).tokens, new.generate(images).tokens)


def test_with_decoder_validates_the_config():
    model = _model()
    with pytest.raises(ValueError, match="cell"):
        model.with_decoder(replace(model.cfg.decoder, cell="transformer"))
    with pytest.raises(ValueError, match="ensembles"):
        model.with_decoder(replace(model.cfg.decoder, inject="attention", members=2))
    with pytest.raises(ValueError, match="built for"):  # a decoder of another shape than the config says
        model.with_decoder(replace(model.cfg.decoder, hidden_dim=48), model.decoder)
    assert model.cfg.decoder.hidden_dim == 24  # nothing changed on the way


def test_with_decoder_takes_a_built_ensemble(tmp_path):
    model = _model()
    other = _model()
    cfg = replace(model.cfg.decoder, members=2)
    ensemble = DecoderEnsemble(cfg, model.cfg.vocab_size, model.cfg.decoder_image_dim)
    ensemble.members = torch.nn.ModuleList([model.decoder, other.decoder])
    new = model.with_decoder(cfg, ensemble)
    assert new.decoder is ensemble and new.cfg.decoder.members == 2 and model.cfg.decoder.members == 1
    _round_trip(new, tmp_path)
    with pytest.raises(ValueError, match="built for"):
        model.with_decoder(replace(cfg, members=3), ensemble)


def test_with_vqa_head(tmp_path):
    model = _model()
    model.train()
    head_cfg = VQAConfig(embed_dim=8, hidden_dim=8, mlp_dim=16, dropout=0.0)
    torch.manual_seed(5)
    new = model.with_vqa_head(head_cfg)
    torch.manual_seed(5)
    alone = VQAHead(head_cfg, model.cfg.vocab_size, model.cfg.encoder.feature_dim)
    for k, v in alone.state_dict().items():
        torch.testing.assert_close(new.vqa.state_dict()[k], v, rtol=0, atol=0)
    assert new.cfg.vqa is head_cfg and model.cfg.vqa is None and model.vqa is None
    assert new.encoder is model.encoder and new.decoder is model.decoder
    assert new.training and new.vqa.training
    loaded = _round_trip(new.eval(), tmp_path)
    assert loaded.vqa is not None and loaded.cfg.vqa == head_cfg

    again = new.with_vqa_head(replace(head_cfg, hidden_dim=12))  # a new head replaces the old one
    assert again.cfg.vqa.hidden_dim == 12 and again.vqa is not new.vqa and new.cfg.vqa.hidden_dim == 8
    with pytest.raises(ValueError, match="max_choices"):
        model.with_vqa_head(replace(head_cfg, max_choices=1))


@pytest.mark.parametrize("members", [1, 2])
def test_grow_vocab_keeps_what_the_model_says_about_known_words(tmp_path, members):
    """--init-from on texts with new words (e.g. easy-VQA's "triangle" on a photo-caption vocabulary) grows the word
    tables: captions (beam and greedy) and answers about known words stay as they were, the new rows are trainable,
    and the grown model saves and loads with the extended vocabulary."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(members=members) if members > 1 else tiny_model_config())
    model = model.with_vqa_head(VQAConfig(embed_dim=8, hidden_dim=8, mlp_dim=16, dropout=0.0)).eval()
    images = torch.rand(3, 3, 32, 32)
    q, ch, mask = torch.tensor([[5, 6, 7]] * 3), torch.tensor([[[8], [9], [10]]] * 3), torch.ones(3, 3, dtype=torch.bool)
    before = [model.generate(images, generation=GenerationConfig(beam_size=b)) for b in (1, 3)]
    answers = model.answer_logits(model.encode(images), q, ch, mask)
    old = {k: v.clone() for k, v in model.state_dict().items()}

    vocab = Vocabulary(TINY_WORDS).extended(["dog", "triangle", "circle", "triangle"])
    assert vocab.itos[: 4 + len(TINY_WORDS)] == Vocabulary(TINY_WORDS).itos and vocab.itos[-2:] == ["triangle", "circle"]
    model.grow_vocab(len(vocab))
    assert model.cfg.vocab_size == len(vocab) == 4 + len(TINY_WORDS) + 2
    for k, v in model.state_dict().items():  # old rows untouched, new ones present and different from each other
        if v.shape != old[k].shape:
            assert v.size(0) == len(vocab) and torch.equal(v[: old[k].size(0)], old[k]), k
    for dec in getattr(model.decoder, "members", [model.decoder]):
        assert dec.embed.weight[-2:].std() > 0 and dec.W_hy.weight.requires_grad
    assert not torch.equal(model.vqa.embed.weight[-1], model.vqa.embed.weight[-2])
    after = [model.generate(images, generation=GenerationConfig(beam_size=b)) for b in (1, 3)]
    for x, y in zip(before, after):
        assert torch.equal(x.tokens, y.tokens)
        torch.testing.assert_close(x.log_probs, y.log_probs, atol=1e-4, rtol=0)  # new words take ~e-10 of the mass
    torch.testing.assert_close(model.answer_logits(model.encode(images), q, ch, mask), answers)

    loaded, voc = load_pretrained(save_pretrained(model, vocab, tmp_path / "grown"))
    assert voc.itos == vocab.itos and loaded.cfg == model.cfg
    with pytest.raises(ValueError, match="grow_vocab"):
        model.grow_vocab(5)


def test_swap_decoder_joins_a_decoder_to_a_base_whose_vocabulary_grew(tmp_path):
    """recipes/swap_decoder.py (everyday-photos.sh step 9): the VQA run's --init-from grew the base's vocabulary by
    its questions' words; the donor's decoder, trained on the shorter vocabulary, is grown alike and writes what it
    wrote. A vocabulary that is not an extension of the donor's is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("swap_decoder", ROOT / "recipes" / "swap_decoder.py")
    swap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(swap)
    donor = _model().with_vqa_head(VQAConfig(embed_dim=8, hidden_dim=8, mlp_dim=16, dropout=0.0)).eval()
    save_pretrained(donor, Vocabulary(TINY_WORDS), tmp_path / "donor")
    base, _ = load_pretrained(tmp_path / "donor")
    torch.manual_seed(1)
    base = base.with_decoder(base.cfg.decoder)  # another decoder, to be replaced
    grown = Vocabulary(TINY_WORDS).extended(["triangle", "rectangle"])
    base.grow_vocab(len(grown))
    save_pretrained(base, grown, tmp_path / "base")
    assert swap.main(["--base", str(tmp_path / "base"), "--decoder-from", str(tmp_path / "donor"),
                      "--out", str(tmp_path / "out")]) == 0
    out, voc = load_pretrained(tmp_path / "out")
    images = torch.rand(2, 3, 32, 32)
    assert voc.itos == grown.itos and torch.equal(out.generate(images).tokens, donor.generate(images).tokens)
    save_pretrained(base, Vocabulary(["zebra", *TINY_WORDS[1:]]).extended(["x", "y"]), tmp_path / "other")
    with pytest.raises(SystemExit, match="vocabulary"):
        swap.main(["--base", str(tmp_path / "other"), "--decoder-from", str(tmp_path / "donor"), "--out",
                   str(tmp_path / "x")])
