#!/usr/bin/env bash
# Reproduces captioner/models/default: compact VGG-style encoder (from scratch, no ImageNet weights) + LSTM decoder
# trained on Flickr8k train, selected by val CIDEr-D, exported with fp16 weights, then evaluated on val at beam 3.
#   DATA=../shared/data/flickr8k bash recipes/default-model.sh
# On a 2-core CPU the threads setting matters: one torch process per core pair, OMP_NUM_THREADS=1 when anything
# else runs beside it (two 2-thread processes on 2 cores slow each other down ~10x).
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
RUN=${RUN:-runs/default-model}
captioner train --annotations "$DATA/dataset_flickr8k.json" --images "$DATA" \
    --arch compact --image-size 112 --cell lstm --epochs 10 --batch-size 32 --seed 0 --output "$RUN"
captioner train --annotations "$DATA/dataset_flickr8k.json" --images "$DATA" \
    --arch compact --image-size 112 --cell lstm --epochs 10 --batch-size 32 --seed 0 --image-blind --output "$RUN-blind"
captioner export --checkpoint "$RUN/best" --out captioner/models/default --name flickr8k-compact-lstm --version 1
captioner evaluate --annotations "$DATA/dataset_flickr8k.json" --images "$DATA" --split val --beam-size 3 \
    --out "$RUN/default-val.json"
