"""Decoder ensembles: the mixture's arithmetic, search on it, and building one with train --fresh-decoder + export."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from captioner.checkpoint import CheckpointError, load_pretrained, save_pretrained
from captioner.decoder import Decoder, DecoderEnsemble
from captioner.features import ImageFeatures
from captioner.generation import GenerationConfig
from captioner.cli.export import add_decoders
from captioner.cli.export import main as export_main
from captioner.cli.parsers import export as export_parser
from captioner.model import CaptionModel
from captioner.tokenizer import Vocabulary
from tests.conftest import TINY_WORDS, tiny_model_config
from tests.test_train import _args, tiny_karpathy  # noqa: F401  (fixture)
from training import train as train_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def ensemble_of(*seeds: int, cell: str = "lstm", num_layers: int = 1) -> tuple[CaptionModel, list[Decoder]]:
    """A tiny model whose decoder is an ensemble of independently initialised members."""
    cfg = tiny_model_config(cell, num_layers=num_layers, dropout=0.0)
    members = []
    for s in seeds:
        torch.manual_seed(s)
        d = Decoder(cfg.decoder, cfg.vocab_size, cfg.encoder.feature_dim).eval()
        with torch.no_grad():
            d.layers[0].W_ih.weight.mul_(10)  # make v matter
            d.h0.normal_(0, 0.5)
        members.append(d)
    cfg.decoder.members = len(seeds)
    torch.manual_seed(0)
    model = CaptionModel(cfg).eval()
    model.decoder.members = torch.nn.ModuleList(copy.deepcopy(members))
    return model, members


def test_ensemble_is_the_mean_of_member_probabilities():
    model, members = ensemble_of(1, 2, 3, num_layers=2)
    v = ImageFeatures(torch.randn(4, model.cfg.encoder.feature_dim))
    tokens = torch.randint(1, model.cfg.vocab_size, (4, 5))
    with torch.no_grad():
        p = torch.stack([F.softmax(m(v, tokens), -1) for m in members]).mean(0)
        got = model.decoder(v, tokens)
    torch.testing.assert_close(got.exp(), p, atol=1e-6, rtol=1e-5)
    # one step at a time through the stacked state gives the same mixture as teacher forcing
    dec = model.decoder
    state, pre = dec.init_state(4), dec.precompute(v)
    with torch.no_grad():
        for t in range(tokens.size(1)):
            logits, state, _ = dec.step(tokens[:, t], state, pre, t)
            torch.testing.assert_close(logits, got[:, t], atol=1e-5, rtol=1e-5)
            assert torch.allclose(logits.exp().sum(-1), torch.ones(4))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_ensemble_of_copies_searches_like_its_member(beam_size):
    """Mixing a decoder with itself changes nothing: same captions and log-probabilities as the single decoder."""
    model, (member, twin) = ensemble_of(5, 5)
    assert torch.equal(member.W_hy.weight, twin.W_hy.weight)
    single = copy.deepcopy(model)
    single.decoder = member
    v = ImageFeatures(torch.randn(6, model.cfg.encoder.feature_dim))
    gen = GenerationConfig(beam_size=beam_size)
    a, b = model.generate(features=v, generation=gen), single.generate(features=v, generation=gen)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=1e-5)


def test_ensemble_beam_search_follows_the_mixture():
    """The beam's log-probability of its caption is the mixture's, and it differs from either member's search."""
    model, members = ensemble_of(11, 12)
    v = ImageFeatures(torch.randn(8, model.cfg.encoder.feature_dim))
    hyp = model.generate(features=v, generation=GenerationConfig(beam_size=3))
    seq = hyp.tokens[:, 0]
    inp = torch.cat([torch.full((8, 1), 1), seq[:, :-1]], 1)  # <bos> then the caption
    with torch.no_grad():
        logp = model.decoder(v, inp).gather(2, seq[..., None]).squeeze(2)
    mask = torch.arange(seq.size(1))[None] < hyp.lengths[:, 0, None]
    torch.testing.assert_close((logp * mask).sum(1), hyp.log_probs[:, 0], atol=1e-4, rtol=1e-4)


def test_ensemble_checkpoint_round_trip(tmp_path):
    model, _ = ensemble_of(1, 2)
    save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "ens")
    cfg = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert cfg["decoder"]["members"] == 2
    loaded, _ = load_pretrained(tmp_path / "ens")
    assert isinstance(loaded.decoder, DecoderEnsemble) and len(loaded.decoder.members) == 2
    v = ImageFeatures(torch.randn(3, model.cfg.encoder.feature_dim))
    assert torch.equal(loaded.generate(features=v).tokens, model.generate(features=v).tokens)
    # a single decoder's config.json has no members key, as before ensembles existed
    save_pretrained(CaptionModel(tiny_model_config()), Vocabulary(TINY_WORDS), tmp_path / "one")
    assert "members" not in json.loads((tmp_path / "one" / "config.json").read_text())["decoder"]


def test_members_must_be_positive():
    with pytest.raises(ValueError, match="members"):
        tiny_model_config(members=0)


# ------------------------------------------------------------------ train --fresh-decoder, export --add-decoders

def test_fresh_decoder_members_export_as_an_ensemble(tiny_karpathy, tmp_path, capsys):  # noqa: F811
    ann, root = tiny_karpathy
    train_mod.main(_args(ann, root, tmp_path / "base", "--epochs", "1"))
    base = tmp_path / "base" / "best"
    train_mod.main(_args(ann, root, tmp_path / "m1", "--epochs", "1", "--init-from", str(base), "--fresh-decoder",
                         "--freeze-encoder", "--seed", "1"))
    b, _ = load_pretrained(base)
    m1, _ = load_pretrained(tmp_path / "m1" / "best")
    for k, t in b.encoder.state_dict().items():  # frozen: the encoder is the base's, bit for bit
        assert torch.equal(t, m1.encoder.state_dict()[k])
    first = b.decoder.layers[0].W_hh.weight
    assert not torch.allclose(first, m1.decoder.layers[0].W_hh.weight)  # a new decoder, not the base's trained one

    out = tmp_path / "export"
    assert export_main(export_parser().parse_args(["--checkpoint", str(base), "--out", str(out),
                                                   "--add-decoders", str(tmp_path / "m1" / "best")])) == 0
    assert "2 caption decoders" in capsys.readouterr().out
    ens, _ = load_pretrained(out)
    assert ens.cfg.decoder.members == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert "CIDEr-D" not in metrics  # one member's run metrics are not the ensemble's
    assert [m["checkpoint"] for m in metrics["members"]] == ["base/best", "m1/best"]  # portable: no build paths
    assert all("CIDEr-D" in m for m in metrics["members"])
    v = ImageFeatures(torch.randn(5, ens.cfg.encoder.feature_dim))
    tokens = torch.randint(1, ens.cfg.vocab_size, (5, 4))
    with torch.no_grad():
        members = torch.stack([F.log_softmax(d(v, tokens), -1) for d in (b.decoder, m1.decoder)])
        want = torch.logsumexp(members, 0) - math.log(2)
        got = ens.decoder(v, tokens)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16 storage


def test_plain_export_keeps_a_single_decoder(tiny_checkpoint, tmp_path):
    out = tmp_path / "export"
    assert export_main(export_parser().parse_args(["--checkpoint", str(tiny_checkpoint), "--out", str(out)])) == 0
    a, _ = load_pretrained(tiny_checkpoint)
    b, _ = load_pretrained(out)
    assert isinstance(b.decoder, Decoder) and b.cfg.decoder.members == 1
    v = ImageFeatures(torch.randn(4, a.cfg.encoder.feature_dim))
    assert torch.equal(a.generate(features=v).tokens, b.generate(features=v).tokens)


def test_add_decoders_refuses_members_of_another_encoder(tiny_karpathy, tmp_path, capsys):  # noqa: F811
    ann, root = tiny_karpathy
    train_mod.main(_args(ann, root, tmp_path / "a", "--epochs", "1", "--seed", "1"))
    train_mod.main(_args(ann, root, tmp_path / "b", "--epochs", "1", "--seed", "2"))
    a, vocab = load_pretrained(tmp_path / "a" / "best")
    with pytest.raises(CheckpointError, match="encoder weights differ"):
        add_decoders(a, vocab, [str(tmp_path / "b" / "best")])
    rc = export_main(export_parser().parse_args(["--checkpoint", str(tmp_path / "a" / "best"), "--out",
                                                 str(tmp_path / "x"), "--add-decoders", str(tmp_path / "b" / "best")]))
    assert rc == 2 and "encoder weights differ" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_add_decoders_refuses_another_vocabulary(tmp_path):
    model = CaptionModel(tiny_model_config())
    save_pretrained(model, Vocabulary(list(reversed(TINY_WORDS))), tmp_path / "other")
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        add_decoders(model, Vocabulary(TINY_WORDS), [str(tmp_path / "other")])


def test_fresh_decoder_needs_init_from(tiny_karpathy, tmp_path):  # noqa: F811
    ann, root = tiny_karpathy
    with pytest.raises(SystemExit, match="--fresh-decoder needs --init-from"):
        train_mod.main(_args(ann, root, tmp_path / "r", "--fresh-decoder"))
