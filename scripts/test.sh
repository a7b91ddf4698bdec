#!/usr/bin/env bash
# THE test command: lint, format check, type check, tests (and the docs build when there are docs).
#
# Usage: bash scripts/test.sh [pytest args...]
# Creates .venv when missing, installs the project with its dev extra, makes the test servers
# available (scripts/services.sh), then stops at the first failing step. pytest's exit code 5
# ("no tests collected") fails the run like any other non-zero code.
set -euo pipefail

cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv"
    python3 -m venv .venv
fi
step "installing declcache[dev] into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

# The venv's tools (ruff, mypy, python, mkdocs) come first.
export PATH="$PWD/.venv/bin:$PATH"

step "services"
bash scripts/services.sh

step "ruff check"
ruff check .

step "ruff format --check"
ruff format --check .

step "mypy"
mypy

step "pytest $*"
python -m pytest "$@"

if [[ -f mkdocs.yml ]]; then
    step "mkdocs build --strict"
    if ! command -v mkdocs >/dev/null 2>&1; then
        echo "mkdocs.yml exists but mkdocs is not installed in .venv: add it to the dev extra" >&2
        exit 1
    fi
    mkdocs build --strict --site-dir "$(mktemp -d)"
fi
