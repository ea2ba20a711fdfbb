"""Datasets, training and evaluation.

    engine.py      the one training engine: epoch loop, AMP, clipping, LR schedule, DDP-aware saving, --resume,
                   metrics.jsonl, curves.png; fit(objective, optim, device); build_or_load_model()
    options.py     the training commands' options, declared once as groups: a function adding an argument group to
                   a parser and a frozen dataclass per group; the command entry functions (main(args)) build them
                   from the Namespace, and nothing below them takes the Namespace
    train.py       the caption objective (cross-entropy; --scst: scst.py's self-critical step, cider.py's reward)
    train_vqa.py   the VQA and joint caption + VQA objective (vqa_data.py: the question sets)
    distill.py     the distillation objective (an ImageNet teacher -> the VGG-style encoder); distill_labels.py
                   the same from cached labels (teacher features and logits, detected objects and counts)
    label.py       `captioner label`: a COCO detector and EfficientNet-Lite3 run once over photos, cached;
                   pseudo_refs.py: captions from a text-only pool that name a labelled photo's objects
    datasets.py    Karpathy / COCO caption files; features.py the frozen-encoder feature cache
    evaluate.py, evaluate_vqa.py, metrics.py   scoring; distributed.py   the torchrun set-up in one place
"""
