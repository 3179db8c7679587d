#!/usr/bin/env bash
# Create benchmarks/.venv-nnunet with nnU-Net v2 installed, for benchmarks that compare samunet with nnU-Net.
# nnU-Net lives in its own virtual environment so that samunet never imports nnunetv2 at run time; the
# benchmarks call its console scripts (nnUNetv2_plan_and_preprocess, ...) as separate executables.
#
# Usage: benchmarks/setup_nnunet_env.sh            (uses python3 from PATH)
#        PYTHON=python3.11 benchmarks/setup_nnunet_env.sh
#        NNUNET_SPEC="nnunetv2==2.6.2" benchmarks/setup_nnunet_env.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-nnunet"
python="${PYTHON:-python3}"
spec="${NNUNET_SPEC:-nnunetv2}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install "$spec"

if [ -x "$venv/bin/nnUNetv2_plan_and_preprocess" ]; then
    version="$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("nnunetv2"))')"
    echo "nnunetv2 $version installed; executable: $venv/bin/nnUNetv2_plan_and_preprocess"
else
    echo "error: nnUNetv2_plan_and_preprocess not found in $venv/bin after installation" >&2
    exit 1
fi
