#!/usr/bin/env bash
# Download CrowdPose (images, trainval and test annotations; the files the official KAPAO uses) into DIR
# (default: datasets/crowdpose), the layout data/crowdpose.yaml expects: DIR/images/, DIR/crowdpose_*.json.
# Usage: bash scripts/get_crowdpose.sh [DIR]     then: kapao val --crowdpose / kapao train --data crowdpose
set -euo pipefail
dir="${1:-datasets/crowdpose}"
mkdir -p "$dir"
gdrive() {  # google-drive-id, output file
  echo "Downloading $2 ..."
  curl -fL --retry 3 "https://drive.usercontent.google.com/download?id=$1&export=download&confirm=t" -o "$2"
}
gdrive 1VprytECcLtU4tKP32SYi_7oDRbw7yUTL "$dir/images.zip"
gdrive 13xScmTWqO6Y6m_CjiQ-23ptgX9sC-J9I "$dir/crowdpose_trainval.json"
gdrive 1FUzRj-dPbL1OyBwcIX2BgFPEaY5Yrz7S "$dir/crowdpose_test.json"
unzip -q -o "$dir/images.zip" -d "$dir" && rm "$dir/images.zip"
echo "CrowdPose ready in $dir"
