"""Self-critical sequence training: the CIDEr-D reward, the REINFORCE loss, and `captioner train --scst`."""
from __future__ import annotations

import json

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from captioner.checkpoint import load_pretrained, save_pretrained
from captioner.config import VQAConfig
from captioner.features import ImageFeatures
from captioner.model import CaptionModel
from training import train as train_mod
from training.cider import CiderD
from training.datasets import pad_captions
from training.optim import optimizer_step
from training.scst import ObjectRecall, ScstLoss, bleu4, reference_corpus, rewards, scst_step, words
from training.options import ScstOptions

from tests.conftest import tiny_model_config
from tests.test_train import _args, tiny_karpathy  # noqa: F401  (fixture)

REFS = {
    1: ["a dog runs on the grass", "a brown dog running in a field", "the dog is playing outside"],
    2: ["two people ride bikes down a street", "people on bicycles in the city", "a man and a woman cycling"],
    3: ["a child eats ice cream", "a little girl with an ice cream cone", "kid eating a cone"],
}
CANDS = {1: "a dog running on grass", 2: "a man rides a bike on a street", 3: "a dog eats a cone"}


def test_cider_d_matches_pycocoevalcap_when_the_corpus_is_the_scored_set():
    ids: dict[str, int] = {}
    enc = lambda s: tuple(ids.setdefault(w, len(ids)) for w in s.split())  # noqa: E731
    mean, per_image = Cider().compute_score(REFS, {k: [v] for k, v in CANDS.items()})
    ours = CiderD([[enc(r) for r in REFS[k]] for k in REFS])
    got = [ours.score(enc(CANDS[k]), [enc(r) for r in REFS[k]]) for k in REFS]
    assert got == pytest.approx(list(per_image), rel=1e-9, abs=1e-12)
    assert sum(got) / 3 == pytest.approx(mean)


def test_reward_prefers_the_right_caption_and_caches_references():
    refs = [[(4, 5, 6, 2), (4, 5, 7, 2)], [(8, 9, 10, 2), (8, 9, 11, 2)]]  # <eos> = 2 ends every reference
    cider = CiderD(refs)
    # two captions per image: image 0 gets [4, 5, 6] and [8, 9, 10], image 1 the same two
    r = rewards(cider, refs, [0, 1], [[4, 5, 6], [8, 9, 10], [4, 5, 6], [8, 9, 10]], per_image=2)
    assert r[0] > r[1] and r[3] > r[2]  # an image's own words win
    assert r[0] == pytest.approx(r[3])
    assert set(cider._ref_cache) == {0, 1}


def test_bleu_weight_adds_sentence_bleu4_with_eos_as_a_word():
    refs = [[(4, 5, 6, 7, 8, 2), (4, 5, 9, 7, 8, 2)], [(10, 11, 12, 13, 2)]]
    seqs = [[4, 5, 6, 7, 8], [4, 5, 6, 13], [10, 11, 12, 13]]  # image 0 twice (one exact reference), image 1 once
    idx, per = [0, 1], 2  # seqs[j] belongs to image idx[j // 2]: 0, 0, 1
    got = bleu4(refs, idx, seqs, per)
    want = Bleu(4).compute_score({0: ["4 5 6 7 8 2", "4 5 9 7 8 2"], 1: ["4 5 6 7 8 2", "4 5 9 7 8 2"],
                                  2: ["10 11 12 13 2"]},
                                 {0: ["4 5 6 7 8 2"], 1: ["4 5 6 13 2"], 2: ["10 11 12 13 2"]}, verbose=0)[1][3]
    assert got.tolist() == pytest.approx(want)
    assert got[0] == pytest.approx(1.0) and got[2] == pytest.approx(1.0) and got[1] < 0.5
    cider = CiderD(refs)
    plain = rewards(cider, refs, idx, seqs, per)
    assert rewards(cider, refs, idx, seqs, per, bleu_weight=0.5) == pytest.approx(plain + 0.5 * got)


def test_words_stop_at_eos():
    t = torch.tensor([[5, 6, 2, 0, 0], [7, 2, 8, 2, 0], [5, 5, 5, 5, 5]])  # EOS_ID = 2, PAD_ID = 0
    assert words(t) == [[5, 6], [7], [5, 5, 5, 5, 5]]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_loss_moves_a_caption_with_the_sign_of_its_advantage(sign):
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = CaptionModel(cfg).eval()
    v = ImageFeatures(torch.randn(1, cfg.encoder.feature_dim))
    inp, tgt = pad_captions([[5, 6, 7]], 8)

    def logp():
        with torch.no_grad():
            lp = torch.log_softmax(model.decoder(v, inp), -1).gather(2, tgt[..., None])
        return lp.sum().item()

    before = logp()
    loss = ScstLoss(model)(v, torch.tensor([0]), inp, tgt, torch.tensor([sign]))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    assert (logp() - before) * sign > 0


def test_object_recall_is_the_share_of_detected_objects_a_caption_names(tmp_path):
    from captioner.tokenizer import Vocabulary
    from test_label import fake_run

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in "abcd":
        (photos / f"{name}.jpg").write_bytes(b"")
    (tmp_path / "link").symlink_to(photos)  # the training records name the photos through a link
    run = fake_run(tmp_path / "labels", [str(photos / f"{n}.jpg") for n in "abc"],
                   [[("dog", 0.9, 0.1, 0.1, 0.5, 0.9), ("person", 0.8, 0.5, 0.1, 0.9, 0.9), ("cat", 0.3, 0, 0, 1, 1)],
                    [], [("giraffe", 0.9, 0.2, 0.2, 0.8, 0.8)]])
    vocab = Vocabulary.build(["a man walks his dog", "two puppies run", "a giraffe eats", "a hot dog"], min_count=1)
    obj = ObjectRecall(run, [str(tmp_path / "link" / f"{n}.jpg") for n in "abcd"], vocab)
    assert obj.present == [{"dog", "person"}, set(), {"giraffe"}, set()]  # cat below 0.5; d was never labelled
    enc = lambda text: vocab.encode(text)  # noqa: E731
    got = obj([0, 0, 0, 0, 1, 2, 3], [enc("a man walks his dog"), enc("two puppies run"), enc("a hot dog"),
                                      enc("a giraffe eats"), enc("a dog"), enc("a giraffe eats"), enc("a dog")], 1)
    assert got.tolist() == [1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0]  # "a hot dog" names no dog


def test_object_weight_adds_its_share_of_the_reward():
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = CaptionModel(cfg).eval()
    caps = [[torch.tensor([4 + i, 9 + i])] for i in range(4)]
    refs = reference_corpus(caps)
    batch = {"features": ImageFeatures(torch.randn(4, cfg.encoder.feature_dim)), "indices": torch.arange(4)}
    logs = {}
    for w in (0.0, 2.0):
        scst = ScstOptions(scst=True, scst_samples=3, scst_object_weight=w)
        objects = (lambda idx, seqs, k: torch.full((len(seqs),), 0.25)) if w else None  # noqa: E731
        _, logs[w], _ = scst_step(ScstLoss(model), model, batch, CiderD(refs), refs, scst, cfg.max_length, False,
                                  torch.Generator().manual_seed(0), torch.device("cpu"), objects)
    assert logs[2.0]["reward"][0] == pytest.approx(logs[0.0]["reward"][0] + 0.5)


def test_scst_needs_a_trained_model(tiny_karpathy, tmp_path):  # noqa: F811
    ann, root = tiny_karpathy
    with pytest.raises(SystemExit, match="--init-from"):
        train_mod.main(_args(ann, root, tmp_path / "x", "--scst"))
    with pytest.raises(SystemExit, match="--scst-labels"):
        train_mod.main(_args(ann, root, tmp_path / "x", "--scst", "--init-from", str(tmp_path), "--scst-object-weight", "1"))


@pytest.mark.parametrize("baseline,bleu_weight", [("mean", 0.0), ("greedy", 0.0), ("mean", 1.0)])
def test_scst_raises_the_reward(baseline, bleu_weight):
    """Four 'images' (random features), each with its own two-word reference: from a random decoder, SCST steps
    must make the sampled captions earn clearly more CIDEr-D."""
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = CaptionModel(cfg)
    caps = [[torch.tensor([4 + i, 9 + i])] for i in range(4)]
    refs = reference_corpus(caps)
    cider = CiderD(refs)
    batch = {"features": ImageFeatures(torch.randn(4, cfg.encoder.feature_dim)), "indices": torch.arange(4)}
    scst = ScstOptions(scst=True, scst_samples=5, scst_baseline=baseline, scst_bleu_weight=bleu_weight)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    def epoch(e: int) -> float:
        """20 engine steps (training/engine.py does the same around each objective step); the mean reward."""
        model.eval()  # as the SCST objective runs it
        g, rewards_ = torch.Generator().manual_seed(0 * 1000 + e), []  # --seed 0
        for _ in range(20):
            loss, logs, _ = scst_step(ScstLoss(model), model, batch, cider, refs, scst, cfg.max_length, False, g,
                                      torch.device("cpu"))
            optimizer_step(loss, opt, sched, scaler, params, 5.0)  # --grad-clip 5
            rewards_.append(logs["reward"][0])
        return sum(rewards_) / len(rewards_)

    first = epoch(0)
    for e in range(1, 6):
        last = epoch(e)
    # from ~0.5 to 2.5-6 over seeds 0-2 and both baselines; an unchanged policy stays at ~0.5
    assert last > first + 1.5, (first, last)


def test_scst_command_fine_tunes_and_keeps_vqa_metrics(tiny_karpathy, tmp_path):  # noqa: F811
    ann, root = tiny_karpathy
    xe = tmp_path / "xe"
    train_mod.main(_args(ann, root, xe, "--epochs", "1", "--freeze-encoder"))
    m = json.loads((xe / "best" / "metrics.json").read_text())
    m.update(tasks=["caption", "vqa"], val_accuracy=0.5)  # as a joint run would write it, with its VQA head
    xe_model, xe_vocab = load_pretrained(xe / "best")
    save_pretrained(xe_model.with_vqa_head(VQAConfig(embed_dim=8, hidden_dim=8, mlp_dim=8)), xe_vocab, xe / "best",
                    metrics=m)
    start = {k: v.clone() for k, v in load_pretrained(xe / "best")[0].state_dict().items()}
    out = tmp_path / "scst"
    from test_label import fake_run  # detected objects for the object reward (the captions name none of them)
    photos = sorted(str(p) for p in (root / "images").glob("*.jpg"))
    labels = fake_run(tmp_path / "labels", photos, [[("dog", 0.9, 0.1, 0.1, 0.5, 0.9)]] * len(photos))
    model = train_mod.main(_args(ann, root, out, "--scst", "--init-from", str(xe / "best"), "--freeze-encoder",
                                 "--epochs", "2", "--scst-baseline", "greedy", "--scst-object-weight", "0.5",
                                 "--scst-labels", str(labels)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["train_reward"] >= 0 for r in rows)
    saved = json.loads((out / "last" / "metrics.json").read_text())
    assert saved["tasks"] == ["caption", "vqa"] and saved["val_accuracy"] == 0.5 and saved["args"]["lr"] == 5e-5
    end = model.state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("decoder."))
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith("encoder."))
