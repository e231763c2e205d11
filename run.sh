#!/usr/bin/env bash
# Set up .venv on first use (or when setup.py / overrides.txt changed), then run the main job or the tests.
#   ./run.sh [run_recbole_fmrl.py args...]   train + evaluate (default: FMRLRec on bundled ml-100k)
#   ./run.sh test [pytest args...]           the test suite
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}

# uv reads no pip configuration: hand it pip's indexes, wheel folders, constraints and CA file, and let it pick
# the best version over all indexes as pip does.
uv_pip_args() {
  uv_args=(--index-strategy unsafe-best-match)
  local line key value v index=
  while IFS= read -r line; do
    key=${line%%=*} value=${line#*=}
    value=${value#\'} value=${value%\'}
    case ${key##*.} in
      index-url) [ -n "$index" ] || uv_args+=(--index-url "$value"); index=1 ;;  # the first listed wins, as in pip
      extra-index-url) for v in $value; do uv_args+=(--extra-index-url "$v"); done ;;
      find-links) for v in $value; do uv_args+=(--find-links "$v"); done ;;
      constraint) for v in $value; do uv_args+=(--constraint "$v"); done ;;
      cert) export SSL_CERT_FILE=$value ;;
    esac
  done < <(.venv/bin/python -m pip config list 2>/dev/null)
}

stamp=.venv/.setup-$(cat setup.py overrides.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q "uv>=0.9,<1"
  uv_pip_args
  # overrides.txt lifts RecBole's Ray pin (see the file)
  .venv/bin/uv pip install -q --python .venv/bin/python "${uv_args[@]}" --override overrides.txt -e ".[test]"
  rm -f .venv/.setup-*; touch "$stamp"
fi
if [ "${1:-}" = "test" ]; then
  shift
  exec .venv/bin/python -m pytest -q "$@"  # pytest.ini: testpaths = tests
fi
exec .venv/bin/python run_recbole_fmrl.py "$@"
