#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that scripts/gpu-check.sh installs on an offline GPU box.
#   bash scripts/gpu-wheels.sh            # into .whl/ at the repo root (git-ignored), then check the size
#   bash scripts/gpu-wheels.sh --dry-run  # print the pip command, download nothing
#   bash scripts/gpu-wheels.sh --list     # print the pinned NAME==VERSION, one a line
# The box: x86-64 Linux, CPython 3.12, with torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15 and
# their usual company already installed; these are the packages qlora needs that it lacks, and nothing
# else (--no-deps). Environment: PYTHON (default python3), QLORA_WHEELS (default .whl),
# QLORA_CARRY_MIB (default 64: the limit on the repo plus the wheels together).
# Exit codes: 0 done; 1 a download failed or the carry would be too large; 2 usage.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

# Versions tested together in this repo's .venv (pyproject: transformers>=5.0, peft>=0.21, trl>=1.16,
# bitsandbytes>=0.50, datasets>=4.0, pydantic>=2.8). Their own requirements, read off each wheel's
# METADATA, are met by what the box has (torch>=2.3, transformers>=4.56, accelerate>=1.4,
# huggingface-hub>=0.25, pyarrow>=21, pandas, fsspec, xxhash, triton) or by one of these.
WHEELS=(
  bitsandbytes==0.50.2        # NF4 quantization and paged AdamW; one wheel holds the CUDA 12 and 13 builds
  trl==1.16.0                 # SFTTrainer
  peft==0.21.2                # the box has a peft of unknown version: carry the one tested here
  datasets==5.2.0             # TRL's and qlora's data handling
  dill==0.4.1                 # datasets
  multiprocess==0.70.19       # datasets
  pydantic==2.14.4            # the recipe schema
  pydantic-core==2.50.5       # pydantic (compiled)
  annotated-types==0.8.0      # pydantic
  typing-inspection==0.4.5    # pydantic
  typing-extensions==4.16.0   # pydantic 2.14 needs a newer one than torch's images sometimes carry
  liger-kernel==0.8.5         # fused RMSNorm/RoPE/SwiGLU: the qlora arm of the benchmark uses it on CUDA
)

dry_run=0
list=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --list) list=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-wheels.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
  esac
done

pins=()
for entry in "${WHEELS[@]}"; do pins+=("${entry%% *}"); done
if [ "$list" = 1 ]; then
  printf '%s\n' "${pins[@]}"
  exit 0
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels=${QLORA_WHEELS:-$root/.whl}
python=${PYTHON:-python3}
limit_mib=${QLORA_CARRY_MIB:-64}

# The one documented command: binary wheels for CPython 3.12 on manylinux x86-64, no dependencies resolved
# (the box's own packages satisfy them; pip here would pick versions for this machine instead).
command=("$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  -d "$wheels" "${pins[@]}")
echo "+ ${command[*]}"
if [ "$dry_run" = 1 ]; then exit 0; fi

mkdir -p "$wheels"
"${command[@]}" || { echo "gpu-wheels.sh: pip download failed (is PyPI reachable from here?)" >&2; exit 1; }

# One version of each package only: two stop the box's `pip install --no-index` altogether.
stale=()
for file in "$wheels"/*.whl; do
  name=$(basename "$file")
  keep=0
  for pin in "${pins[@]}"; do
    project=${pin%%==*}
    version=${pin##*==}
    prefix="${project//-/_}-${version}-"
    if [[ "${name,,}" == "${prefix,,}"* ]]; then keep=1; fi
  done
  if [ "$keep" = 0 ]; then stale+=("$file"); fi
done
if [ "${#stale[@]}" -gt 0 ]; then
  echo "gpu-wheels.sh: removing wheels not pinned here: ${stale[*]##*/}"
  rm -f -- "${stale[@]}"
fi

# What travels to the box is the repo's tracked files plus the wheels: both must fit the carry limit.
wheel_bytes=$(du -cb "$wheels"/*.whl | tail -1 | cut -f1)
repo_bytes=$(cd "$root" && git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" { sum += $1 } END { print sum + 0 }')
total_mib=$(( (wheel_bytes + repo_bytes) / 1048576 ))
ls -l "$wheels"
echo "wheels: $(( wheel_bytes / 1048576 )) MiB; repo: $(( repo_bytes / 1048576 )) MiB; together: $total_mib MiB (limit $limit_mib MiB)"
if [ "$total_mib" -ge "$limit_mib" ]; then
  echo "gpu-wheels.sh: the repo and the wheels together exceed $limit_mib MiB" >&2
  exit 1
fi
