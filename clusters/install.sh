#!/usr/bin/env bash
# Install raysys on a cluster node from the checkout this script lives in, the
# way the README does:
#
#   install.sh            `make venv` in the project (.venv; torch installed only
#                         when absent), or the same pip steps when make is missing
#   install.sh --system   the same pip steps into the Python on PATH, for images
#                         that already ship Ray (rayproject/ray for KubeRay)
#
# RAYSYS_RAY_VERSION pins Ray to the version of the machine that launches the
# cluster: nodes that join later must run the same Ray as the head.
# RAYSYS_PYTHON picks the interpreter for .venv (default: the newest python3.1x
# >= 3.10 found).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

is_usable() {
    [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 &&
        "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

find_python() {
    local candidate
    for candidate in "${RAYSYS_PYTHON:-}" python3.13 python3.12 python3.11 python3.10 \
        python3 "$HOME/anaconda3/bin/python3" "$HOME/miniconda3/bin/python3" \
        /opt/conda/bin/python3; do
        if is_usable "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

pip_steps() {  # the steps of the Makefile's venv target, into interpreter $1
    local py="$1" extra="${2:-}"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -c "import torch" 2>/dev/null ||
        "$py" -m pip install --quiet torch==2.13.0 ||
        "$py" -m pip install --quiet torch
    "$py" -m pip install --quiet -e "$root$extra"
}

if [ "${1:-}" = "--system" ]; then
    py="$(command -v python3 || command -v python)"
    pip_steps "$py"
else
    base="$(find_python)" || {
        echo "install.sh: no Python >= 3.10 on $(hostname); install one or set RAYSYS_PYTHON" >&2
        exit 1
    }
    if command -v make >/dev/null 2>&1; then
        make -C "$root" venv PYTHON="$base"
    else
        test -x "$root/.venv/bin/python" || "$base" -m venv "$root/.venv"
        pip_steps "$root/.venv/bin/python" "[test]"
    fi
    py="$root/.venv/bin/python"
fi

if [ -n "${RAYSYS_RAY_VERSION:-}" ]; then
    "$py" -m pip install --quiet "ray[default]==${RAYSYS_RAY_VERSION}"
fi
"$py" -c "import ray, raysys; print('raysys installed with Ray', ray.__version__)"
