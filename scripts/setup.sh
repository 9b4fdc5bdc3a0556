#!/usr/bin/env bash
# One-shot set-up on a fresh machine; every step is skipped when already done.
#   bash scripts/setup.sh          venv + torch==2.13.0 (CPU) + sparselite + Fashion-MNIST (Debian package)
#   bash scripts/setup.sh --gpu    ... + a private Mesa 25 lavapipe for LiteRT's GPU accelerator tests
# Both install the test extra and headless Chromium (Debian package, for the test that opens the export's
# HTML report in a browser); SPARSELITE_NO_BROWSER=1 leaves Chromium out (that test then skips).
set -euo pipefail
trap 'echo "[setup] failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: a bare 'torch' requirement pulls the multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  .venv/bin/pip install -q torch==2.13.0
fi
stamp=.venv/.sparselite-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing sparselite and its dependencies"
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi

data=/usr/share/datasets/fashion-mnist
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sparselite/fashion-mnist
if [ -z "${SPARSELITE_DATA:-}" ] && [ ! -f "$data/t10k-labels-idx1-ubyte.gz" ] && [ ! -f "$cache/t10k-labels-idx1-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] unpacking dataset-fashion-mnist into $cache (no root)"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb root)
    mkdir -p "$cache" && cp "$tmp"/root/usr/share/datasets/fashion-mnist/* "$cache"/ && rm -rf "$tmp"
  fi
fi

# Test set-up: the HTML report page is checked in a real browser (tests/export/test_html_report.py).
if [ -z "${SPARSELITE_NO_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package chromium (headless, for the report page's browser test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup] chromium is not installed and this is not root: the browser test will skip (apt-get install chromium)"
  fi
fi

if [ "${1:-}" = "--gpu" ]; then
  bash scripts/install_lavapipe.sh
fi
echo "[setup] ready: .venv/bin/sparselite"
