"""Datasets, training and evaluation.

    engine.py      the one training engine: epoch loop, AMP, clipping, LR schedule, DDP-aware saving, --resume,
                   metrics.jsonl, curves.png; fit(objective, args, device)
    train.py       the caption objective (cross-entropy; --scst: scst.py's self-critical step, cider.py's reward)
    train_vqa.py   the VQA and joint caption + VQA objective (vqa_data.py: the question sets)
    distill.py     the distillation objective (an ImageNet teacher -> the VGG-style encoder)
    datasets.py    Karpathy / COCO caption files; features.py the frozen-encoder feature cache
    evaluate.py, evaluate_vqa.py, metrics.py   scoring; distributed.py   the torchrun set-up in one place
"""
