#!/usr/bin/env bash
# Refresh constraints.txt: install the newest releases requirements*.txt allow into a fresh virtual environment,
# run the tests there, and only if they pass write what was installed to constraints.txt (torch stays pinned by
# setup.sh). Review the diff before committing it: it is what every newcomer's first run will install.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
sed 's/ -c constraints.txt//' scripts/setup.sh > "$venv/setup-unconstrained.sh"  # the same set-up, unpinned
bash "$venv/setup-unconstrained.sh"
python3 -m pytest -q
{
  grep '^#' constraints.txt | sed "s/([0-9-]*, Python [0-9.]*, torch [^)]*)/($(date -u +%F), Python $(python3 -c 'import sys; print(".".join(map(str, sys.version_info[:2])))'), torch $(python3 -c 'import torch; print(torch.__version__)'))/"
  python3 -m pip freeze --exclude-editable | grep -v -iE '^(torch|nvidia-[a-z0-9-]*|triton)=='
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt refreshed from a passing run; review: git diff constraints.txt"
