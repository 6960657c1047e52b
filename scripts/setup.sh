#!/usr/bin/env bash
# Create (or refresh) a virtual environment with qlora and the torch build that fits this box.
#   bash scripts/setup.sh            # auto: CUDA build if nvidia-smi sees a GPU, else the CPU build
#   bash scripts/setup.sh --cpu      # force the CPU build (small, no CUDA packages)
#   bash scripts/setup.sh --cuda     # force the CUDA build from PyPI
#   bash scripts/setup.sh --dry-run  # print the commands, run nothing
# Environment: QLORA_VENV (default .venv), QLORA_TORCH (default 2.13.0), PYTHON (default python3).
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

mode=auto
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu ;;
    --cuda) mode=cuda ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QLORA_VENV:-$root/.venv}
torch_version=${QLORA_TORCH:-2.13.0}
python=${PYTHON:-python3}

if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi

run() {
  echo "+ $*"
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

[ -x "$venv/bin/python" ] || run "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# torch first, so the package's `torch>=2.4` requirement is already met and pulls nothing more.
installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
# A CPU build is "+cpu"; the CUDA build from PyPI carries no local label (or "+cuXYZ" from PyTorch's index).
if [[ "$installed" == "$torch_version"* ]] && { { [ "$mode" = cuda ] && [[ "$installed" != *+cpu ]]; } || { [ "$mode" = cpu ] && [[ "$installed" == *+cpu ]]; }; }; then
  echo "torch $installed already installed"
elif [ "$mode" = cuda ]; then
  if [[ "$installed" == *+cpu ]]; then
    # pip counts 2.13.0+cpu as satisfying torch==2.13.0 and would keep it: a venv first made without a
    # visible GPU (a docker build, the CPU demo) would then train with "torch sees no CUDA GPU".
    echo "replacing the CPU-only torch $installed with the CUDA build"
    run "${pip[@]}" uninstall -y torch
  fi
  # PyPI's Linux wheel of torch is the CUDA build.
  run "${pip[@]}" install "torch==$torch_version"
  if [ "$dry_run" = 0 ]; then
    installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
    if [[ "$installed" == *+cpu ]]; then
      echo "setup.sh: --cuda asked for the CUDA build of torch, but pip installed $installed (a CPU wheel found through pip's configuration); install torch==$torch_version from PyPI by hand" >&2
      exit 1
    fi
  fi
else
  # The CPU build (+cpu) lives on PyTorch's own index; a plain `torch` from PyPI would bring GBs of CUDA
  # libraries. A local wheel found through pip's configured find-links is used when present.
  run "${pip[@]}" install "torch==$torch_version+cpu" 2>/dev/null \
    || run "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
fi

run "${pip[@]}" install -q -e "${root}[dev]"
if [ "$mode" = cuda ]; then
  # Fused RMSNorm/RoPE/SwiGLU kernels: GPU only, so not a hard dependency.
  run "${pip[@]}" install -q liger-kernel
fi
echo "qlora is ready: $venv/bin/qlora (torch build: $mode)"
