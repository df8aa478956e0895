#!/usr/bin/env bash
# Download the wheels that a CUDA machine without internet needs for scripts/gpu_check.sh into .whl/
# (Python 3.12, manylinux x86_64). That machine already has torch, torchvision, numpy, opencv-python-headless,
# pyyaml, tqdm, matplotlib (so pillow), psutil, scipy, click, onnx and onnxruntime; it lacks ultralytics,
# pycocotools, albumentations and lap, and their dependencies below. Versions: the ones this project is
# tested with. Left out on purpose: polars (about 40 MB, only ultralytics' own trainer/plots import it;
# the carried files are limited to 64 MiB), ultralytics-platform/httpx (hub only), gdown (downloads only).
#
#   bash scripts/gpu_wheels.sh [DEST]      # DEST defaults to .whl (git-ignored via .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
wheels=(
    ultralytics==8.4.190 ultralytics-thop==2.2.3 nvidia-ml-py==13.615.71
    pycocotools==2.0.11 lap==0.5.13
    albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
    requests==2.34.2 urllib3==2.7.0 idna==3.13 charset-normalizer==3.4.7 certifi==2026.5.20
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
du -sh "$dest"
ls "$dest"
