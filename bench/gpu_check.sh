#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): on a CUDA machine, the Triton tests compiled and the GPU
# path timed against vesin, OpenMM's CUDA platform and torch_geometric, with rooflines; under
# 8 minutes. `bench/gpu_check.sh --rehearse` runs the same steps on CPU under the Triton
# interpreter. Extra arguments go to gpu_check.py (--out DIR, --only PHASE ...).
#
# Needs only what the repository and a CUDA build of torch bring (torch pulls in Triton);
# vesin-torch, torch_geometric, openmm, pytest and pytest-xdist are used where installed and
# skipped otherwise. `--install` first asks pip (package registries only) for the missing ones.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python}"

args=()
install=0
rehearse=0
for a in "$@"; do
  case "$a" in
    --install) install=1 ;;
    --rehearse) rehearse=1; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check: torch is not installed (pip install torch==2.13.0)" >&2
  exit 2
fi

if [ "$install" = 1 ]; then
  torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
  for pkg in vesin-torch torch_geometric openmm pytest pytest-xdist numba; do
    mod="${pkg//-/_}"
    [ "$pkg" = "vesin-torch" ] && mod="vesin.torch"
    [ "$pkg" = "pytest-xdist" ] && mod="xdist"
    if ! "$PYTHON" -c "import $mod" 2>/dev/null; then
      timeout 180 "$PYTHON" -m pip install --quiet -c <(echo "torch==$torch_version") "$pkg" \
        || echo "gpu_check: could not install $pkg; its comparison is skipped" >&2
    fi
  done
fi

# fastff.kernels lives in kernels/ and is mapped into the package on installation; a fresh
# copy of the repository that is not installed gets the same layout from a directory of links
# (nothing is built or downloaded).
if ! (cd /tmp && PYTHONPATH="$ROOT" "$PYTHON" -c "import fastff.kernels" 2>/dev/null); then
  shim="$(mktemp -d)"
  mkdir -p "$shim/fastff"
  for f in "$ROOT"/fastff/*; do ln -s "$f" "$shim/fastff/$(basename "$f")"; done
  ln -s "$ROOT/kernels" "$shim/fastff/kernels"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONSAFEPATH=1  # the source tree's fastff/ (without kernels/) must not shadow it
fi

if [ "$rehearse" = 1 ]; then
  export TRITON_INTERPRET=1 FASTFF_BACKEND=triton
else
  unset TRITON_INTERPRET
fi
exec "$PYTHON" bench/gpu_check.py ${args[@]+"${args[@]}"}
