#!/usr/bin/env bash
# Build the image and run it as an operator would (read-only root, tmpfs /tmp, drain time), then caption a photo,
# stop it and check it drained and exited 0. Needs a Docker engine; prints the image size.
#   bash bench/docker_smoke.sh [--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
tag=captioner:smoke
docker build -q -t "$tag" "$@" . >/dev/null
echo "image size: $(docker image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}')"
id=$(docker run -d -p 127.0.0.1::8000 --stop-timeout 60 --read-only --tmpfs /tmp "$tag")
trap 'docker rm -f "$id" >/dev/null 2>&1 || true' EXIT
port=$(docker port "$id" 8000 | head -1 | cut -d: -f2)
for _ in $(seq 180); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 1
done
curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { docker logs "$id" | tail -20; exit 1; }
curl -fs -F "image=@service/static/samples/elephant.jpg" "http://127.0.0.1:$port/v1/captions" | head -c 300; echo
docker stop "$id" >/dev/null
status=$(docker inspect "$id" --format '{{.State.ExitCode}}')
echo "exit status after docker stop: $status"
[ "$status" = 0 ]
