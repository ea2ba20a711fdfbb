"""Batched beam search vs a per-image beam loop on the same decoder and the same image features.

Both paths call captioner.decoding.beam_search on precomputed ImageFeatures (v (B, D)), so only decoding is
timed: the batched path makes one call with all images (B*K rows per step), the per-image path makes
one call per image (K rows per step), which is what neuraltalk2 / im2txt / the PyTorch tutorial do.

    python bench/decode.py                        # random-weight compact model, 2,500 words, 64 images, beam 3
    python bench/decode.py --checkpoint DIR --image-dir ../shared/data/flickr8k/images

Prints images/s for both paths, the speedup, a greedy reference, and how many top captions agree. For an
ensemble checkpoint (config.json decoder.members > 1) it also times its first member alone, batched, in the same
rounds: the price of the ensemble.

--attention [DIR] also times an attention decoder (decoder.inject = attention; DIR, or a random one of the same
shape on the same encoder) in the same rounds, batched beam on its features (with att, the conv grid), and prints
its speed as a ratio of the FC decoder's, with the size of the per-image tensors it carries for a batch of 32 x the
beam:

    python bench/decode.py --checkpoint captioner/models/default --attention models/attention \
        --image-dir ../shared/data/flickr8k/images
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from captioner.runtime import autocast, cast_weights
from captioner.config import ModelConfig, preset
from captioner.decoder import Decoder
from captioner.decoding import Hypotheses, beam_search, greedy_search
from captioner.features import ImageFeatures
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.tokenizer import BOS_ID, EOS_ID, Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchenv import CLOCKS, check_clock, describe, interleaved  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--beam", type=int, default=3, help="beam size (default 3)")
    p.add_argument("--max-length", type=int, default=None, help="caption words (default: the config's max_length)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: random-weight compact model)")
    p.add_argument("--image-dir", default=None,
                   help="with --checkpoint: encode the first N images of this folder for v (default: noise images)")
    p.add_argument("--vocab-size", type=int, default=2500, help="words for the random model (Flickr8k-sized)")
    p.add_argument("--image-scale", type=float, default=8.0,
                   help="random model: W_ih is multiplied by this so different images give different captions")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1, see bench/README.md; 0 = torch's default, all cores)")
    p.add_argument("--precision", default="fp32,bf16",
                   help="comma list of fp32/bf16/fp16, each timed as Captioner(precision=...) runs it (autocast)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: this process's CPU time, for --threads 1 on a busy shared machine")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", nargs="?", const="random", default=None, metavar="DIR",
                   help="also time an attention decoder: the checkpoint DIR, or (no DIR) a random one of the same shape")
    return p


def attention_twin(model: CaptionModel, path: str, n: int, image_dir: str | None, device: torch.device,
                   image_scale: float):
    """The attention decoder to compare and its grids for the same images."""
    if path == "random":
        from dataclasses import replace

        cfg = ModelConfig.from_dict(model.cfg.to_dict())
        cfg.decoder = replace(cfg.decoder, inject="attention", members=1)
        att = CaptionModel(cfg).to(device)
        att.encoder.load_state_dict(model.encoder.state_dict())
        with torch.no_grad():
            att.decoder.layers[0].W_ih.weight.mul_(image_scale)
    else:
        from captioner.checkpoint import load_pretrained

        att, _ = load_pretrained(path, device)
    features, _ = load_features(att.eval(), n, image_dir, device)
    return att.decoder.eval(), features


def random_model(vocab_size: int, image_scale: float) -> tuple[CaptionModel, Vocabulary]:
    cfg = preset("compact")  # default decoder dims
    cfg.vocab_size = vocab_size
    model = CaptionModel(cfg)
    with torch.no_grad():
        # nn.Linear's init makes W_ih·v small next to W_hh·h, so every image would get the same caption
        model.decoder.layers[0].W_ih.weight.mul_(image_scale)
    vocab = Vocabulary([f"w{i}" for i in range(vocab_size - 4)])
    return model.eval(), vocab


def load_features(model: CaptionModel, n: int, image_dir: str | None, device: torch.device
                  ) -> tuple[ImageFeatures, str]:
    """The features of n images for a checkpoint: encode real images when a folder is given, else noise images."""
    from captioner.preprocess import eval_transform, to_tensor

    pre = model.cfg.preprocess
    if image_dir:
        if not Path(image_dir).is_dir():
            raise ValueError(f"--image-dir {image_dir}: no such folder")
        paths = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if len(paths) < n:
            sys.exit(f"error: {image_dir} holds {len(paths)} images, need {n}")
        tf = eval_transform(pre)
        x = torch.stack([to_tensor(p, pre, tf) for p in paths])
        src = f"{n} images from {image_dir}"
    else:
        x = torch.randn(n, 3, pre.image_size, pre.image_size)
        src = f"{n} Gaussian-noise images (pass --image-dir for real ones)"
    with torch.inference_mode():
        features = ImageFeatures.cat([model.encode(x[i:i + 16].to(device)) for i in range(0, n, 16)])
    return features, src


def per_image(decoder: Decoder, v: ImageFeatures, beam: int, max_length: int) -> list[Hypotheses]:
    gen = GenerationConfig(beam_size=beam)
    return [beam_search(decoder, v[i:i + 1], gen, max_length) for i in range(len(v))]


def strip(seq: list[int]) -> list[int]:
    """Word ids up to and including <eos>; the tail is <pad> and its length depends on the batch."""
    return seq[: seq.index(EOS_ID) + 1] if EOS_ID in seq else seq


@torch.no_grad()
def rescore(decoder: Decoder, one: ImageFeatures, seq: list[int]) -> float:
    """Sum of log-probabilities of ``seq`` (ending in <eos>) given one image's features, by teacher forcing in fp32."""
    with torch.autocast(one.device.type, enabled=False):
        tokens = torch.tensor([[BOS_ID] + seq[:-1]], device=one.device)
        logp = torch.log_softmax(decoder(one.float(), tokens).float(), -1)  # (1, T, V)
        return logp[0].gather(1, torch.tensor(seq, device=one.device)[:, None]).sum().item()


def main(args: argparse.Namespace) -> int:
    if args.images < 1 or args.beam < 1 or args.repeats < 1:
        sys.exit("error: --images, --beam and --repeats must be >= 1")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in ("fp32", "bf16", "fp16") for p in precisions):
        sys.exit(f"error: --precision must be a comma list of fp32, bf16, fp16; got {args.precision!r}")
    if args.threads < 0:
        sys.exit("error: --threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    check_clock(args.clock, device)
    torch.manual_seed(args.seed)

    if args.checkpoint:
        from captioner.checkpoint import load_pretrained
        from captioner.preprocess import ImageError

        try:
            model, vocab = load_pretrained(args.checkpoint, device)
            v, src = load_features(model, args.images, args.image_dir, device)
        except (ValueError, OSError, ImageError) as e:  # CheckpointError and ImageError are ValueErrors
            sys.exit(f"error: {e}")
        weights = f"weights from {args.checkpoint}"
    else:
        model, vocab = random_model(args.vocab_size, args.image_scale)
        model.to(device)
        fc = torch.relu(torch.randn(args.images, model.cfg.encoder.feature_dim, device=device))  # ReLU-like v
        v = ImageFeatures(fc)
        src = f"{args.images} random ReLU feature vectors"
        weights = f"RANDOM weights (W_ih x {args.image_scale:g}); captions are gibberish, timings are what count"
    cfg: ModelConfig = model.cfg
    decoder = model.decoder.eval()
    max_length = args.max_length or cfg.max_length
    dcfg = cfg.decoder

    print(describe(device, args.clock))
    print(f"model: {weights}")
    print(f"decoder: cell={dcfg.cell} inject={dcfg.inject} embed={dcfg.embed_dim} hidden={dcfg.hidden_dim} "
          f"layers={dcfg.num_layers} vocab={cfg.vocab_size} feature_dim={cfg.encoder.feature_dim}")
    print(f"features: {src}; beam={args.beam} max_length={max_length} repeats={args.repeats} (median; paths timed round-robin after 1 warm-up each)")
    print(f"config.json: {json.dumps(cfg.to_dict(), separators=(',', ':'))}")

    att = None
    if args.attention:
        att = attention_twin(model, args.attention, args.images, args.image_dir, device, args.image_scale)
        a = att[0]
        print(f"attention decoder: {args.attention}; att {tuple(att[1].att.shape[1:])}, attention_dim "
              f"{a.cfg.attention_dim}, gate {a.cfg.attention_gate}")
    ok = True
    for prec in precisions:
        # inference mode, as `captioner caption` and `captioner evaluate` run: autocast's weight-cast cache is off in
        # it, so a low precision's float32 weights are cast again at every call
        with torch.inference_mode(), autocast(device, prec):
            ok &= bench_precision(prec, decoder, v, vocab, args.beam, max_length, args.repeats, device, args.clock,
                                  att)
    return 0 if ok else 1


def bench_precision(prec: str, decoder: Decoder, v: ImageFeatures, vocab: Vocabulary, beam: int, max_length: int,
                    repeats: int, device: torch.device, clock: str, att=None) -> bool:
    """Time batched beam, per-image beam and batched greedy (and in a low precision, batched beam with the weights
    stored in it); True when every top caption agrees."""
    n, gen = len(v), GenerationConfig(beam_size=beam)
    paths = {
        "batched": lambda: beam_search(decoder, v, gen, max_length),
        "per_image": lambda: per_image(decoder, v, beam, max_length),
        "greedy": lambda: greedy_search(decoder, v, max_length),
    }
    members = getattr(decoder, "members", None)
    if members is not None:
        paths["member"] = lambda: beam_search(members[0], v, gen, max_length)
    if att is not None:
        paths["attention"] = lambda: beam_search(att[0], att[1], gen, max_length)
    if prec != "fp32":  # the weights stored in the precision's dtype, as Captioner.from_pretrained loads them
        stored = copy.deepcopy(decoder)
        cast_weights(stored, prec)
        paths["stored"] = lambda: beam_search(stored, v, gen, max_length)
    res = interleaved(paths, device, repeats, clock=clock)
    (t_batch, times_b, hyp_b), (t_loop, times_l, hyp_l), (t_greedy, times_g, _) = list(res.values())[:3]

    def row(name: str, t: float, times: list[float]) -> None:
        spread = f"runs {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} ms"
        print(f"  {name:<30} {n / t:>8.1f} images/s  {t * 1e3:>8.1f} ms / {n} images  ({spread})")

    print(f"\n[{prec}]")
    row(f"beam {beam}, batched (1 call)", t_batch, times_b)
    row(f"beam {beam}, per-image ({n} calls)", t_loop, times_l)
    row("greedy, batched (reference)", t_greedy, times_g)
    if members is not None:
        t_member, times_m, _ = res["member"]
        row(f"beam {beam}, member 0 alone", t_member, times_m)
        print(f"  ensemble of {len(members)} / one member: {t_batch / t_member:.2f}x the time")
    if att is not None:
        t_att, times_a, hyp_a = res["attention"]
        row(f"beam {beam}, batched, attention", t_att, times_a)
        length = lambda h: h.lengths[:, 0].float().mean().item()  # noqa: E731  (decoding stops at the last <eos>)
        ratio = t_att / t_batch
        print(f"  attention / FC decoding time: {ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'NOT met'}); "
              f"mean caption length {length(hyp_a):.1f} vs {length(hyp_b):.1f} tokens")
        ann, wa = att[0].precompute(att[1][:1])  # a_i (1, P, C), W_a a_i (1, P, A)
        fc_row = sum(t.numel() for t in decoder.precompute(v[:1])) * 4
        per_row = (ann.numel() + wa.numel()) * 4  # float32 bytes
        print(f"  attention carries a_i {tuple(ann.shape[1:])} and W_a a_i {tuple(wa.shape[1:])} per beam row: "
              f"{32 * beam * per_row / 2**20:.1f} MiB for batch 32 x beam {beam} (FC: W_ih v, "
              f"{32 * beam * fc_row / 2**20:.2f} MiB), plus {32 * beam * max_length} "
              f"x {ann.shape[1]} floats of recorded maps when asked for")
    if prec != "fp32":
        t_stored, times_s, hyp_s = res["stored"]
        row(f"beam {beam}, batched, {prec} weights", t_stored, times_s)
        same_s = sum(torch.equal(a, b) and torch.equal(x, y) for a, b, x, y in
                     zip(hyp_s.tokens, hyp_b.tokens, hyp_s.log_probs, hyp_b.log_probs))
        print(f"  weights stored in {prec} / float32 weights cast by autocast: {t_batch / t_stored:.2f}x images/s; "
              f"identical n-best token lists and log-probs {same_s}/{n}")
    else:
        same_s = n
    speedup = t_loop / t_batch
    print(f"  speedup batched / per-image: {speedup:.1f}x  (target >= 10x: {'met' if speedup >= 10 else 'NOT met'})")

    # agreement of the top hypothesis per image (pad tails differ in length, so compare up to <eos>)
    top_b = [strip(s) for s in hyp_b.tokens[:, 0].tolist()]
    top_l = [strip(h.tokens[0, 0].tolist()) for h in hyp_l]
    lp_b = hyp_b.log_probs[:, 0].tolist()
    lp_l = [h.log_probs[0, 0].item() for h in hyp_l]
    same = sum(a == b for a, b in zip(top_b, top_l))
    distinct = len({tuple(s) for s in top_b})
    mean_len = statistics.mean(len(s) for s in top_b)
    print(f"  identical top captions: {same}/{n}  (distinct captions across images: {distinct}/{n}, "
          f"mean length {mean_len:.1f} tokens incl. <eos>)")
    all_ties = True
    for i, (a, b) in enumerate(zip(top_b, top_l)):
        if a != b:
            # Rescore both captions by teacher forcing in fp32: if each path scored its own caption right and the
            # two are (near-)equally likely, rounding of a batched (M=B*K) vs a B=1 (M=K) matmul flipped a
            # ranking; if a path's own score is off, or one caption is clearly better, something is wrong.
            ra, rb = rescore(decoder, v[i:i + 1], a), rescore(decoder, v[i:i + 1], b)
            tol = 1e-3 if prec == "fp32" else 2e-2 * len(a)  # bf16 logits carry ~3 significant digits
            scored_right = abs(ra - lp_b[i]) < tol and abs(rb - lp_l[i]) < tol
            tie = scored_right and abs(ra - rb) < tol
            all_ties &= tie
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            kind = "near-tie: rounding flipped a ranking" if tie else "NOT a tie: look for a bug"
            print(f"  image {i}: first differs at token {k}\n"
                  f"    batched {lp_b[i]:.5f} (rescored {ra:.5f}) {vocab.decode(a)!r}\n"
                  f"    single  {lp_l[i]:.5f} (rescored {rb:.5f}) {vocab.decode(b)!r}\n    -> {kind}")
    print(f"  example caption: {vocab.decode(top_b[0])!r} (logp {lp_b[0]:.2f})")
    return (same == n or all_ties) and same_s == n


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
