#!/usr/bin/env bash
# Download COCO 2017 keypoints (train2017 19 GB, val2017 1 GB, annotations) into DIR (default: datasets/coco),
# the layout data/coco-kp.yaml expects: DIR/images/{train,val}2017, DIR/annotations/person_keypoints_*.json.
# Usage: bash scripts/get_coco.sh [DIR]      then: kapao train --data coco  (from the folder holding datasets/,
# or with KAPAO_DATASETS pointing at it)
set -euo pipefail
dir="${1:-datasets/coco}"
mkdir -p "$dir/images"
get() {  # url, unzip-into
  local f; f="$(basename "$1")"
  echo "Downloading $1 ..."
  curl -fL --retry 3 -C - "$1" -o "$dir/$f"
  unzip -q -o "$dir/$f" -d "$2" && rm "$dir/$f"
}
get http://images.cocodataset.org/annotations/annotations_trainval2017.zip "$dir"
get http://images.cocodataset.org/zips/val2017.zip "$dir/images"
get http://images.cocodataset.org/zips/train2017.zip "$dir/images"
echo "COCO keypoints ready in $dir"
