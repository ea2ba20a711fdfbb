"""Greedy, beam search and sampling: agreement with each other, with per-image runs and with teacher forcing."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from captioner.decoding import Hypotheses, beam_search, greedy_search, sample
from captioner.features import ImageFeatures
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocabulary
from tests.conftest import TINY_WORDS, tiny_model_config

MAX_LEN = 8
CAPTIONS = [
    "a dog runs on the grass",
    "a cat in the water",
    "two people on the grass",
    "a man in red",
    "a red ball in the water",
    "the dog runs in the water",
    "two cats on a red ball",  # "cats" is not in the vocabulary: <unk> must be learnt too
    "a man runs",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(cell: str = "lstm", inject: str = "every", steps: int = 40, seed: int = 0) -> CaptionModel:
    """A tiny model half-trained on the 8 captions below from random features: its captions vary in length
    and its beams hold real alternatives (a random tiny net only stops at once or repeats one word forever)."""
    torch.manual_seed(seed)
    model = CaptionModel(tiny_model_config(cell, inject=inject, dropout=0.0))
    inp, tgt = caption_batch(Vocabulary(TINY_WORDS), CAPTIONS)
    v = features(8, seed=123)
    opt = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model.decoder(v, inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=PAD_ID)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def caption_batch(vocab: Vocabulary, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing input (<bos> w1 .. wn <pad>..) and target (w1 .. wn <eos> <pad>..), both (N, T)."""
    ids = [vocab.encode(c) for c in captions]
    T = max(map(len, ids)) + 1
    inp = torch.tensor([[BOS_ID] + s + [PAD_ID] * (T - 1 - len(s)) for s in ids])
    tgt = torch.tensor([s + [EOS_ID] + [PAD_ID] * (T - 1 - len(s)) for s in ids])
    return inp, tgt


def features(n: int = 6, seed: int = 1) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(torch.rand(n, 32, generator=g))  # v non-negative like the encoder's ReLU output


def mixed_features(n: int = 6) -> ImageFeatures:
    """Half the training features (fluent captions) and half fresh ones (less certain captions)."""
    return ImageFeatures.cat([features(8, seed=123)[: n // 2], features(n - n // 2)])


def trim(seq: torch.Tensor) -> list[int]:
    """Word ids up to and including <eos>."""
    out = []
    for i in seq.tolist():
        out.append(i)
        if i == EOS_ID:
            break
    return out


def check_well_formed(h: Hypotheses, max_length: int) -> None:
    """Every sequence: words, one <eos> within max_length + 1 tokens, then only <pad>."""
    B, n, T = h.tokens.shape
    assert T <= max_length + 1
    assert h.log_probs.shape == h.scores.shape == h.lengths.shape == (B, n)
    for b in range(B):
        for k in range(n):
            seq = h.tokens[b, k].tolist()
            assert EOS_ID in seq, seq
            e = seq.index(EOS_ID)
            assert h.lengths[b, k] == e + 1
            assert all(i not in (PAD_ID, BOS_ID, EOS_ID) for i in seq[:e]), seq
            assert all(i == PAD_ID for i in seq[e + 1:]), seq


def teacher_forced_log_prob(decoder, one: ImageFeatures, seq: list[int]) -> float:
    """Sum of log p(w_t | w_<t, v) of a sequence ending in <eos> given one image's features, from forward()."""
    inp = torch.tensor([[BOS_ID] + seq[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(decoder(one, inp).float(), -1)[0]  # (T, V)
    return logp.gather(1, torch.tensor(seq)[:, None]).sum().item()


def trigrams(seq: list[int]) -> list[tuple[int, ...]]:
    words = [i for i in seq if i not in (EOS_ID, PAD_ID)]
    return [tuple(words[i:i + 3]) for i in range(len(words) - 2)]


def rig_repeater(model: CaptionModel, word: int = 5) -> CaptionModel:
    """Make the decoder prefer one word above all (and <eos> least), so that it repeats itself."""
    with torch.no_grad():
        model.decoder.W_hy.weight.mul_(0.01)
        model.decoder.W_hy.bias.zero_()
        model.decoder.W_hy.bias[word] = 8.0
        model.decoder.W_hy.bias[word + 1] = 6.0
        model.decoder.W_hy.bias[word + 2] = 5.0
        model.decoder.W_hy.bias[EOS_ID] = -8.0
    return model


# ------------------------------------------------------------------------------------ greedy == beam 1

@pytest.mark.parametrize("cell,inject", [("rnn", "every"), ("gru", "first"), ("lstm", "every"), ("lstm", "first")])
def test_beam_one_equals_greedy(cell, inject):
    model = make_model(cell, inject=inject)
    v = mixed_features()
    g = greedy_search(model.decoder, v, MAX_LEN)
    b = beam_search(model.decoder, v, GenerationConfig(beam_size=1), MAX_LEN)
    check_well_formed(g, MAX_LEN)
    check_well_formed(b, MAX_LEN)
    for i in range(len(v)):
        assert trim(g.tokens[i, 0]) == trim(b.tokens[i, 0])
    torch.testing.assert_close(g.log_probs, b.log_probs, atol=1e-5, rtol=0)
    # captions differ between images (otherwise per-image checks below would prove little)
    assert len({tuple(trim(s)) for s in g.tokens[:, 0]}) > 1


def test_greedy_log_probs_match_teacher_forcing():
    model = make_model("gru")
    v = mixed_features()
    g = greedy_search(model.decoder, v, MAX_LEN)
    for i in range(len(v)):
        seq = trim(g.tokens[i, 0])
        want = teacher_forced_log_prob(model.decoder, v[i:i + 1], seq)
        assert g.log_probs[i, 0].item() == pytest.approx(want, abs=1e-4)


# -------------------------------------------------------------------------- batched == per-image beam

@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("block_trigrams,length_penalty", [(False, 0.0), (True, 0.0), (False, 0.7), (True, 1.0)])
def test_batched_beam_equals_per_image(cell, block_trigrams, length_penalty):
    model = make_model(cell)
    v = mixed_features(8)
    gen = GenerationConfig(beam_size=3, num_captions=3, block_trigrams=block_trigrams, length_penalty=length_penalty)
    batch = beam_search(model.decoder, v, gen, MAX_LEN)
    check_well_formed(batch, MAX_LEN)
    assert batch.tokens.shape[:2] == (8, 3)
    assert len(set(batch.lengths.flatten().tolist())) > 1  # lengths vary, so length_penalty has an effect
    shorter = 0
    for i in range(len(v)):
        alone = beam_search(model.decoder, v[i:i + 1], gen, MAX_LEN)
        shorter += alone.tokens.size(-1) < batch.tokens.size(-1)
        # a lone image may finish sooner: compare after trimming trailing <pad>
        assert [trim(s) for s in batch.tokens[i]] == [trim(s) for s in alone.tokens[0]], i
        torch.testing.assert_close(batch.scores[i], alone.scores[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.log_probs[i], alone.log_probs[0], atol=1e-5, rtol=0)
        assert batch.lengths[i].tolist() == alone.lengths[0].tolist()
    assert shorter > 0  # some images did finish sooner alone: the batch kept finished beams frozen meanwhile


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_nbest_is_sorted_and_scores_are_right(length_penalty):
    model = make_model("lstm")
    v = mixed_features(4)
    h = beam_search(model.decoder, v, GenerationConfig(beam_size=4, num_captions=4, length_penalty=length_penalty),
                    MAX_LEN)
    check_well_formed(h, MAX_LEN)
    assert (h.scores[:, :-1] >= h.scores[:, 1:]).all()
    expected_scores = h.log_probs / h.lengths.float() ** length_penalty
    torch.testing.assert_close(h.scores, expected_scores)
    for i in range(len(v)):
        seqs = [trim(s) for s in h.tokens[i]]
        assert len(set(map(tuple, seqs))) == len(seqs)  # n distinct hypotheses
        for k, seq in enumerate(seqs):
            want = teacher_forced_log_prob(model.decoder, v[i:i + 1], seq)
            assert h.log_probs[i, k].item() == pytest.approx(want, abs=1e-4)


def test_beam_search_is_at_least_as_likely_as_greedy_with_wide_beam():
    # not guaranteed in general (beam search may prune the greedy path), but it holds for this seeded model
    # with a beam of 8 over an 18-word vocabulary; a broken search (e.g. wrong parent rows) fails it
    model = make_model("gru", seed=3)
    v = mixed_features(6)
    g = greedy_search(model.decoder, v, MAX_LEN)
    b = beam_search(model.decoder, v, GenerationConfig(beam_size=8), MAX_LEN)
    assert (b.log_probs[:, 0] >= g.log_probs[:, 0] - 1e-5).all()


def test_generate_takes_images_or_features():
    with pytest.raises(ValueError, match="exactly one"):
        make_model().generate()


# ------------------------------------------------------------------------------------- trigram blocking

def test_trigram_blocking():
    model = rig_repeater(make_model("rnn"))
    v = mixed_features(3)
    free = beam_search(model.decoder, v, GenerationConfig(beam_size=3, num_captions=3), MAX_LEN)
    blocking = GenerationConfig(beam_size=3, num_captions=3, block_trigrams=True)
    blocked = beam_search(model.decoder, v, blocking, MAX_LEN)
    check_well_formed(blocked, MAX_LEN)
    # the rigged model repeats itself when allowed to ...
    top = trim(free.tokens[0, 0])
    assert len(set(trigrams(top))) < len(trigrams(top)), top
    # ... and never repeats a trigram when blocking
    for b in range(3):
        for seq in blocked.tokens[b]:
            tri = trigrams(seq.tolist())
            assert len(set(tri)) == len(tri), seq.tolist()
    # the generate() path passes the option through
    gen = model.generate(features=v, generation=blocking.replace(max_length=MAX_LEN))
    assert torch.equal(gen.tokens, blocked.tokens)


# ------------------------------------------------------------------------------------------ never empty

def test_no_search_returns_an_empty_caption():
    model = make_model("lstm")
    with torch.no_grad():  # an undertrained model that ranks <eos> first at every step
        model.decoder.W_hy.bias[EOS_ID] = 50.0
    v = mixed_features(3)
    runs = [
        greedy_search(model.decoder, v, MAX_LEN),
        beam_search(model.decoder, v, GenerationConfig(beam_size=3, num_captions=3), MAX_LEN),
        sample(model.decoder, v, GenerationConfig(sample=True, num_captions=2), MAX_LEN,
               torch.Generator().manual_seed(0)),
    ]
    for h in runs:
        check_well_formed(h, MAX_LEN)
        # one word, then the <eos> the model wanted from the start
        assert (h.lengths == 2).all() and (h.tokens[..., 0] != EOS_ID).all()


# ------------------------------------------------------------------------------------------ max_length

@pytest.mark.parametrize("max_length", [1, 3, 5])
def test_max_length_is_respected(max_length):
    model = rig_repeater(make_model("lstm"))  # never wants to stop on its own
    v = mixed_features(3)
    runs = [
        greedy_search(model.decoder, v, max_length),
        beam_search(model.decoder, v, GenerationConfig(beam_size=3, num_captions=2), max_length),
        sample(model.decoder, v, GenerationConfig(sample=True, num_captions=2), max_length,
               torch.Generator().manual_seed(0)),
    ]
    for h in runs:
        check_well_formed(h, max_length)
        # forced to stop: every caption uses its full budget of words, then <eos>
        assert (h.lengths == max_length + 1).all()
    # generate() defaults to the config's max_length
    h = model.generate(features=v, generation=GenerationConfig(beam_size=2))
    check_well_formed(h, model.cfg.max_length)
    assert h.tokens.size(-1) == model.cfg.max_length + 1


# ---------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_sampling_top1_equals_greedy(cell):
    model = make_model(cell)
    v = mixed_features()
    g = greedy_search(model.decoder, v, MAX_LEN)
    s = sample(model.decoder, v, GenerationConfig(sample=True, top_k=1, temperature=1.3), MAX_LEN,
               torch.Generator().manual_seed(0))
    check_well_formed(s, MAX_LEN)
    for i in range(len(v)):
        assert trim(g.tokens[i, 0]) == trim(s.tokens[i, 0])
    torch.testing.assert_close(g.log_probs, s.log_probs, atol=1e-5, rtol=0)


def test_sampling_is_reproducible_with_a_generator():
    model = make_model("gru")
    v = mixed_features(4)

    def draw(seed: int) -> Hypotheses:
        return model.generate(features=v, generation=GenerationConfig(sample=True, num_captions=5, temperature=1.5),
                              generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.tokens, c.tokens)
    check_well_formed(a, model.cfg.max_length)
    assert (a.log_probs[:, :-1] >= a.log_probs[:, 1:]).all()  # most likely sample first
    # log_probs are under the model (temperature 1), whatever temperature drew them
    for i in range(len(v)):
        for k in range(5):
            seq = trim(a.tokens[i, k])
            want = teacher_forced_log_prob(model.decoder, v[i:i + 1], seq)
            assert a.log_probs[i, k].item() == pytest.approx(want, abs=1e-4)


def test_sampling_top_k_restricts_choices():
    model = make_model("lstm")
    v = mixed_features(2)
    s = sample(model.decoder, v, GenerationConfig(sample=True, num_captions=20, top_k=2), 1,
               torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _, _ = model.decoder.step(torch.full((2,), BOS_ID), model.decoder.init_state(2),
                                          model.decoder.precompute(v), 0)
    logits[:, [PAD_ID, BOS_ID]] = float("-inf")
    top2 = logits.topk(2, dim=1).indices
    for i in range(2):
        assert set(s.tokens[i, :, 0].tolist()) <= set(top2[i].tolist())


# ------------------------------------------------------------------------------------- overfit 8 captions



def test_overfit_eight_captions():
    from training.metrics import score_captions

    torch.manual_seed(0)
    cfg = tiny_model_config("lstm", dropout=0.0)
    cfg.encoder.dropout = 0.0
    model = CaptionModel(cfg)
    vocab = Vocabulary(TINY_WORDS)
    images = torch.randn(8, 3, 32, 32)  # distinct random images
    inp, tgt = caption_batch(vocab, CAPTIONS)  # (8, T) each
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    model.train()
    for _ in range(300):
        logits = model(images, inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=PAD_ID)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    elapsed = time.perf_counter() - start
    model.eval()
    hyp = model.generate(images=images, generation=GenerationConfig(beam_size=1))
    decoded = [vocab.decode(s) for s in hyp.tokens[:, 0]]
    targets = [vocab.decode(vocab.encode(c)) for c in CAPTIONS]
    exact = sum(d == t for d, t in zip(decoded, targets))
    assert exact >= 7, (loss.item(), list(zip(decoded, targets)))
    m = score_captions(dict(enumerate(decoded)), {i: [t] for i, t in enumerate(targets)}, use_java=False)
    assert m["BLEU-4"] >= 0.9, m
    assert elapsed < 20, elapsed


def test_unk_is_never_generated_even_when_most_likely():
    model = rig_repeater(make_model(), word=UNK_ID)  # <unk> first, then two real words
    v = features(3)
    for h in (greedy_search(model.decoder, v, MAX_LEN),
              beam_search(model.decoder, v, GenerationConfig(beam_size=3, num_captions=3), MAX_LEN),
              sample(model.decoder, v, GenerationConfig(sample=True, num_captions=4), MAX_LEN,
                     torch.Generator().manual_seed(0))):
        check_well_formed(h, MAX_LEN)
        assert UNK_ID not in h.tokens.unique().tolist()
    assert greedy_search(model.decoder, v, MAX_LEN).tokens[0, 0, 0] == UNK_ID + 1  # the runner-up word instead
