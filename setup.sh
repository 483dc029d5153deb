#!/usr/bin/env bash
# Creates .venv with a Python that nnabla 1.39 has wheels for (3.8-3.10) and installs
# the pinned requirements. Usage: bash setup.sh [extra requirements file ...]
set -euo pipefail
cd "$(dirname "$0")"

supported() { "$1" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 10)))' 2>/dev/null; }

find_python() {
    local candidates=()
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)"/versions/3.10.*/bin/python)
    fi
    candidates+=("$HOME"/.pyenv/versions/3.10.*/bin/python python3.10 python3.9 python3.8 python3)
    for candidate in "${candidates[@]}"; do
        if command -v "$candidate" >/dev/null 2>&1 && supported "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ] || ! supported .venv/bin/python; then
    if ! python=$(find_python); then
        echo "setup.sh: no Python 3.8-3.10 found (nnabla 1.39 has no wheels for newer versions)." >&2
        echo "setup.sh: install one, e.g. 'pyenv install 3.10' or your distribution's python3.10 with venv, then rerun." >&2
        exit 1
    fi
    echo "setup.sh: creating .venv with $python ($("$python" --version 2>&1))"
    rm -rf .venv
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
for requirements in requirements.txt "$@"; do
    .venv/bin/python -m pip install --quiet -r "$requirements"
done
.venv/bin/python -c 'import nnabla; print("setup.sh: nnabla", nnabla.__version__, "ready in .venv")'
