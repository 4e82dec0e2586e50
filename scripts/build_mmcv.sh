#!/usr/bin/env bash
# Put an mmcv 2.0.1 wheel with compiled ops into the project's wheelhouse.
#
# PyPI ships only mmcv's sdist, and it does not build against torch 2.14 as published:
#   * its setup.py imports pkg_resources, so setuptools<70 and --no-build-isolation;
#   * torch 2.14's headers need C++20, so setup.py's -std=c++14/17 is rewritten;
#   * MMCV_WITH_OPS=1, because mmdet imports mmcv.ops.
# The build takes ~43 min on 2 cores, so a matching wheel is reused when one exists:
# first from the wheelhouse, then from $MMCV_WHEEL_CACHE (default ../shared/wheels).
set -euo pipefail

PY=${PY:-.venv/bin/python}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
CACHE=${MMCV_WHEEL_CACHE:-../shared/wheels}
VERSION=2.0.1
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac
case $WHEELHOUSE in /*) ;; *) WHEELHOUSE=$PWD/$WHEELHOUSE ;; esac
TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
PATTERN="mmcv-${VERSION}-${TAG}-${TAG}-linux_$(uname -m).whl"

mkdir -p "$WHEELHOUSE"
if [ -f "$WHEELHOUSE/$PATTERN" ]; then
  echo "[mmcv] using $WHEELHOUSE/$PATTERN"
  exit 0
fi
if [ -f "$CACHE/$PATTERN" ]; then
  echo "[mmcv] copying prebuilt $CACHE/$PATTERN into $WHEELHOUSE"
  cp "$CACHE/$PATTERN" "$WHEELHOUSE/"
  exit 0
fi

echo "[mmcv] no prebuilt wheel for $TAG; building mmcv $VERSION from the PyPI sdist (~43 min on 2 cores)"
# torch pulls a newer setuptools; mmcv's setup.py needs pkg_resources. Restored afterwards.
"$PY" -m pip install -q "setuptools<70" wheel ninja
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "mmcv==$VERSION" -d "$WORK"
tar -xzf "$WORK"/mmcv-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/mmcv-$VERSION"
sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
total=$(find "$SRC/mmcv/ops/csrc" \( -name '*.cpp' -o -name '*.cc' \) | wc -l)

# Progress: count the object files as the compiler writes them.
(
  start=$(date +%s)
  while sleep 60; do
    done_n=$(find "$SRC" -name '*.o' 2>/dev/null | wc -l)
    echo "[mmcv] $(( ($(date +%s) - start) / 60 )) min: compiled ${done_n}/${total} sources"
  done
) &
ticker=$!
trap 'kill $ticker 2>/dev/null || true; rm -rf "$WORK"' EXIT
# On interrupt, stop the compiler processes too, not just this script.
trap 'trap - INT TERM; kill -- -$$ 2>/dev/null || pkill -P $$ || true; exit 130' INT TERM

(cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WHEELHOUSE" . >"$WORK/build.log" 2>&1) || {
  tail -n 60 "$WORK/build.log"
  echo "[mmcv] build failed; full log above" >&2
  exit 1
}
"$PY" -m pip install -q "setuptools>=77.0.3"
echo "[mmcv] built $(ls "$WHEELHOUSE"/mmcv-"$VERSION"-*.whl)"
