#!/usr/bin/env bash
# Short fixed-seed runs of every training objective (caption cross-entropy, SCST, VQA, joint, distillation) on a
# 200-photo Flickr8k subset, 2 epochs each, fp32: run it before and after a change to the training code, then
#   python recipes/regression_compare.py runs/regression-before runs/regression-after
# prints every metric that differs (timings left out). ~10 min on the 2-core CPU.
#   DATA=../shared/data/flickr8k RUN=runs/regression-before bash recipes/regression-runs.sh
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
RUN=${RUN:-runs/regression}
mkdir -p "$RUN"
# the subset: the first 200 train and 50 val photos of the Karpathy file, as a Karpathy file
python3 - "$DATA/dataset_flickr8k.json" "$RUN/subset.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keep = [i for i in d["images"] if i["split"] == "train"][:200] + [i for i in d["images"] if i["split"] == "val"][:50]
json.dump({"dataset": "flickr8k-subset", "images": keep}, open(sys.argv[2], "w"))
PY
D=(--annotations "$RUN/subset.json" --images "$DATA")
SMALL=(--arch compact --image-size 64 --encoder-layers 16,M,32,M,64,M --fc-dims 128 --embed-dim 64 --hidden-dim 128
       --cell lstm --min-count 2)
COMMON=(--batch-size 16 --workers 0 --amp off --no-java --seed 0)
VQA=(--vqa-dataset easy-vqa --max-train-questions 2000 --max-val-questions 300 --vqa-embed-dim 16 --vqa-hidden-dim 32
     --vqa-mlp-dim 64 --questions-per-image 4)
captioner train "${D[@]}" "${SMALL[@]}" "${COMMON[@]}" --epochs 2 --output "$RUN/caption"
captioner train --scst --init-from "$RUN/caption/best" "${D[@]}" "${COMMON[@]}" --epochs 2 --output "$RUN/scst"
captioner train --task vqa "${VQA[@]}" --arch compact --image-size 64 --encoder-layers 16,M,32,M,64,M --fc-dims 128 \
    "${COMMON[@]}" --epochs 2 --output "$RUN/vqa"
captioner train --task joint "${D[@]}" "${VQA[@]}" "${SMALL[@]}" "${COMMON[@]}" --epochs 2 --output "$RUN/joint"
captioner distill "${D[@]}" --split train --val-split val --max-val-images 50 --arch compact --image-size 64 \
    --encoder-layers 16,M,32,M,64,M --fc-dims 128 --teacher-size 128 --statistics-images 128 --epochs 2 \
    --batch-size 16 --workers 0 --amp off --seed 0 --warmup-steps 10 --out "$RUN/distill"
for r in caption scst vqa joint distill; do echo "== $r"; cat "$RUN/$r/metrics.jsonl"; done
