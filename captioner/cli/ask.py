"""``captioner ask IMAGE --question "..." --choice "..." --choice "..."``: multiple-choice visual question answering.

Prints the choices with their probabilities, the chosen one marked (or one JSON object with --json). Needs a
checkpoint with a VQA head (trained with ``captioner train --task vqa`` or ``--task joint``). Exit status 2 on bad
input (unreadable image, fewer than 2 or duplicate choices, empty or over-long text, a model without a VQA head).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..checkpoint import CheckpointError
from ..preprocess import ImageError
from ..vqa import VQAInputError, VQAUnavailableError, unknown_words




def main(args: argparse.Namespace) -> int:
    from ..api import Captioner

    try:
        cap = Captioner.from_pretrained(args.checkpoint, device=args.device, precision=args.precision)
        ans = cap.answer(args.image, args.question, args.choice)
    except (VQAInputError, VQAUnavailableError, ImageError, CheckpointError) as e:
        print(f"captioner ask: error: {e}", file=sys.stderr)
        return 2
    unknown = unknown_words(cap.vocab, [args.question, *args.choice])
    if args.json:
        print(json.dumps({"image": args.image, "question": args.question, "choices": args.choice, **ans.to_dict(),
                          "unknown_words": unknown}))
        return 0
    if unknown:
        print(f"captioner ask: warning: the model does not know {', '.join(map(repr, unknown))}: it reads each as "
              "the same unknown word", file=sys.stderr)
    if not cap.can_answer:
        print("captioner ask: warning: this checkpoint says its VQA head was not trained (config.json tasks)", file=sys.stderr)
    print(f"Q: {' '.join(args.question.split())}")
    w = max(len(c) for c in args.choice)
    for i, (c, p) in enumerate(zip(args.choice, ans.probs)):
        print(f"  {'->' if i == ans.index else '  '} {c:<{w}}  {100 * p:6.2f} %")
    return 0
