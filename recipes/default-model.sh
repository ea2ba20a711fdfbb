#!/usr/bin/env bash
# Reproduces captioner/models/default (version 7, the everyday-world model): one compact VGG-style encoder (112 px,
# as v6) shared by an LSTM caption decoder that has read COCO's language and a multiple-choice VQA head that counts.
#   1. recipes/v6-model.sh: default model v6 (Flickr8k; ~4.5 h on a 2-core CPU). v7's encoder starts from v6's.
#   2. recipes/everyday-photos.sh: 15,689 photos (Flickr8k, coco-mini, 6,056 COCO-2014 photos and 2,300 ImageNet
#      photos from three public repositories at fixed commits) labelled once by a COCO detector and EfficientNet-Lite3,
#      the encoder distilled on them, pseudo-references from the COCO sentence pool, questions from captions and
#      detections, joint caption + VQA training, a fresh decoder and the VQA head on the final encoder (~4 h on the
#      2-core CPU; the COCO test ids are dropped before anything opens a photo).
#   3. The fair image-blind baseline: a VQA model trained with v = 0 on the same real-photo questions (~5 min).
#   4. The fp16 weights evaluated exactly as they ship (beam 3): captions on coco-mini val (COCO's language) and on
#      Flickr8k val, answers on the real-photo val questions (with the blind model beside them) and on easy-VQA test;
#      then shipped with those metrics.
#   DATA=../shared/data bash recipes/default-model.sh
#   (needs: pip install -e ".[distill,label,vqa]"; network access to GitHub for the photos of step 2)
# On a 2-core CPU the threads setting matters: one torch process at a time, OMP_NUM_THREADS=1 for anything beside it.
set -euo pipefail
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/v7}
OUT=${OUT:-captioner/models/default}

# 1-2. v6, then the everyday-world steps on top of it (both resumable: rerun after an interruption)
DATA="$DATA/flickr8k" COCO="$DATA/coco-mini" RUN=runs/default-model bash recipes/v6-model.sh
DATA="$DATA" RUN="$RUN" V6=runs/default-model/v6 bash recipes/everyday-photos.sh

# 3. answers without the image, on the same questions
captioner train --task vqa --image-blind --vqa-dataset v7w --vqa-annotations "$RUN/vqa/questions.json" --vqa-images / \
    --vqa-embed-dim 128 --vqa-hidden-dim 256 --vqa-mlp-dim 512 --vqa-dropout 0.2 --questions-per-image 10 \
    --epochs 6 --lr 2e-3 --warmup-steps 100 --seed 0 --output "$RUN/real-vqa-blind" \
    $( [ -d "$RUN/real-vqa-blind/last" ] && echo --resume )

# 4. evaluate the fp16 weights as they will ship, then ship them with those metrics
M="$RUN/model-v7"
captioner evaluate --checkpoint "$M" --dataset coco --annotations "$DATA/coco-mini/annotations/captions_val2017.json" \
    --images "$DATA/coco-mini/val2017" --out "$RUN/coco-mini-val.json"
captioner evaluate --checkpoint "$M" --annotations "$DATA/flickr8k/dataset_flickr8k.json" --images "$DATA/flickr8k" \
    --split val --out "$RUN/f8k-val.json"
captioner evaluate --task vqa --checkpoint "$M" --dataset v7w --annotations "$RUN/vqa/questions.json" --images / \
    --split val --blind-checkpoint "$RUN/real-vqa-blind/best" --out "$RUN/real-vqa-val.json"
captioner evaluate --task vqa --checkpoint "$M" --dataset easy-vqa --split test --out "$RUN/easy-vqa-test.json"
DOMAIN="Everyday photos: people, animals, vehicles, food, kitchens and streets (COCO's and Flickr8k's world): captions, and multiple-choice questions about them (is there, how many, what colour, where, what animal, what is it doing); easy-VQA's synthetic shapes. Captions name the main objects far more often than v6 but are still often wrong on busy scenes."
captioner export --checkpoint "$RUN/vqa-final/best" --out "$OUT" --dtype fp16 --version 7 \
    --name coco-flickr8k-labels-distilled-compact-lstm --domain "$DOMAIN" \
    --metrics "$RUN/f8k-val.metrics.json" --metrics "$RUN/coco-mini-val.metrics.json" \
    --metrics "$RUN/real-vqa-val.metrics.json" --metrics "$RUN/easy-vqa-test.metrics.json" \
    $([ -f "$OUT/README.md" ] && echo --card "$OUT/README.md")   # keep the hand-written model card
