#!/usr/bin/env bash
# Time a newcomer's `make test` up to its first test: git clone, install with an empty pip cache, collection.
# Usage: tools/time_install.sh [REPO]   (default: this repository's committed HEAD)
set -euo pipefail
repo=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PIP_CACHE_DIR=$work/pip-cache
t0=$(date +%s.%N)
git clone -q "$repo" "$work/clone"
cd "$work/clone"
make .venv/installed > "$work/install.log" 2>&1 || { tail -20 "$work/install.log"; exit 1; }
t1=$(date +%s.%N)
.venv/bin/python -m pytest --collect-only -q -m "not gpu" > /dev/null
t2=$(date +%s.%N)
python3 -c "import sys; a, b, c = map(float, sys.argv[1:]); print(f'install {b - a:.0f} s, collection {c - b:.0f} s, clone to first test {c - a:.0f} s')" "$t0" "$t1" "$t2"
