"""One model from two runs on the same frozen encoder and vocabulary: the caption decoder of one, the rest (encoder,
VQA head) of the other. The caption decoder and the VQA head train apart on one frozen encoder (recipes/everyday-photos.sh,
steps 7-9); this joins them without a training step. The base's vocabulary may extend the decoder's (a VQA run's
--init-from grows it by the questions' words): the decoder then gets those words' rows, never emitted until trained.

    python recipes/swap_decoder.py --base runs/v7/vqa-head/best --decoder-from runs/v7/decoder/best --out runs/v7/joined
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from captioner.checkpoint import load_pretrained, read_metrics, save_pretrained  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="model whose encoder and VQA head are kept")
    p.add_argument("--decoder-from", required=True, help="model whose caption decoder replaces the base's")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    base, vocab = load_pretrained(a.base)
    donor, donor_vocab = load_pretrained(a.decoder_from)
    if list(vocab.itos[: len(donor_vocab)]) != list(donor_vocab.itos):
        raise SystemExit("the decoder's vocabulary is not the base's (nor its start): its word ids would not match")
    if len(vocab) > len(donor_vocab):  # the base's --init-from grew it by its questions' words: grow the donor alike
        donor.grow_vocab(len(vocab))
    if base.cfg.to_dict()["decoder"] != donor.cfg.to_dict()["decoder"]:
        raise SystemExit(f"decoder configs differ: {base.cfg.to_dict()['decoder']} vs {donor.cfg.to_dict()['decoder']}")
    b, d = base.encoder.state_dict(), donor.encoder.state_dict()
    if any(not torch.equal(b[k], d[k]) for k in b):
        raise SystemExit("the two models have different encoder weights: the decoder was fitted to another v")
    base.decoder.load_state_dict(donor.decoder.state_dict())
    metrics = {**(read_metrics(a.base) or {}), **(read_metrics(a.decoder_from) or {})}
    save_pretrained(base, vocab, a.out, metrics=metrics)
    print(f"{a.out}: encoder and VQA head of {a.base}, caption decoder of {a.decoder_from}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
