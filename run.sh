#!/usr/bin/env bash
# Set up .venv on first use (or when setup.py changed), then run the main job or the tests.
#   ./run.sh [run_recbole_fmrl.py args...]   train + evaluate (default: FMRLRec on bundled ml-100k)
#   ./run.sh test [pytest args...]           the test suite
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
stamp=.venv/.setup-$(sha256sum setup.py | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade "pip<26.2"
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.setup-*; touch "$stamp"
fi
if [ "${1:-}" = "test" ]; then
  shift
  exec .venv/bin/python -m pytest -q "$@"  # pytest.ini: testpaths = tests
fi
exec .venv/bin/python run_recbole_fmrl.py "$@"
