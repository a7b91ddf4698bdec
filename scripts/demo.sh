#!/usr/bin/env bash
# THE demo command: runs the example project against an installed declcache[all].
#
# Usage: bash scripts/demo.sh [example_project args...]
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[all]'

exec .venv/bin/python -m example_project "$@"
