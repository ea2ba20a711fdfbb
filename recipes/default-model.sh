#!/usr/bin/env bash
# Reproduces captioner/models/default: one compact VGG-style encoder (from scratch, no ImageNet weights) shared by an
# LSTM caption decoder (Flickr8k train) and a multiple-choice VQA head (easy-VQA train), trained jointly: every step
# puts a caption batch and a VQA batch through the encoder together (10 epochs, then 3 x 5 epochs from the best).
# Selected by val CIDEr-D + val VQA accuracy, exported with fp16 weights, then evaluated: captions on Flickr8k val
# (beam 3), VQA on the easy-VQA test split.
#   DATA=../shared/data/flickr8k bash recipes/default-model.sh        (needs: pip install easy-vqa)
# On a 2-core CPU the threads setting matters: one torch process per core pair, OMP_NUM_THREADS=1 when anything
# else runs beside it (two 2-thread processes on 2 cores slow each other down ~10x).
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
RUN=${RUN:-runs/default-model}
OUT=${OUT:-captioner/models/default}
F8K=(--annotations "$DATA/dataset_flickr8k.json" --images "$DATA")

captioner train --task joint "${F8K[@]}" --arch compact --image-size 112 --cell lstm --min-count 5 \
    --vqa-dataset easy-vqa --vqa-embed-dim 32 --vqa-hidden-dim 64 --vqa-mlp-dim 128 --vqa-dropout 0 \
    --questions-per-image 10 --epochs 10 --batch-size 32 --seed 0 --output "$RUN/stage1"
# the shape questions are learnt late: three more rounds of 5 epochs (warm restart at lr 5e-4) from the best so far
for k in 2 3 4; do
    captioner train --task joint --init-from "$RUN/stage$((k - 1))/best" "${F8K[@]}" --vqa-dataset easy-vqa \
        --questions-per-image 10 --epochs 5 --batch-size 32 --lr 5e-4 --warmup-steps 50 --seed 0 --output "$RUN/stage$k"
done
# baselines for the model card: captions without the image, answers without the image
captioner train "${F8K[@]}" --arch compact --image-size 112 --cell lstm --epochs 10 --batch-size 32 --seed 0 \
    --image-blind --output "$RUN-caption-blind"
captioner train --task vqa --vqa-dataset easy-vqa --image-blind --vqa-embed-dim 32 --vqa-hidden-dim 64 \
    --vqa-mlp-dim 128 --vqa-dropout 0 --questions-per-image 10 --batch-size 32 --epochs 10 --lr 3e-3 \
    --warmup-steps 50 --output "$RUN-vqa-blind"

captioner export --checkpoint "$RUN/stage4/best" --out "$OUT" --name flickr8k-easyvqa-compact-lstm --version 2
captioner evaluate --checkpoint "$OUT" "${F8K[@]}" --split val --beam-size 3 --out "$RUN/default-val.json"
captioner evaluate --task vqa --checkpoint "$OUT" --dataset easy-vqa --split test \
    --blind-checkpoint "$RUN-vqa-blind/best" --out "$RUN/default-easy-vqa-test.json"
