#!/usr/bin/env bash
# One-shot GPU acceptance run on a fresh H100/H200 box without internet, in at most 8 minutes.
#   bash scripts/gpu-check.sh              # install .whl/, then doctor, the gpu tests, plan vs measured memory, the benchmark
#   bash scripts/gpu-check.sh --dry-run    # print every command with its time budget; check what needs no GPU
#   bash scripts/gpu-check.sh --cpu --shape small --budget 1800   # the whole run on a machine without a GPU
# Beforehand, where PyPI is reachable: bash scripts/gpu-wheels.sh (the wheels the box lacks, into .whl/).
# Writes BENCHMARKS.md, gpu-check.json and gpu-check.log into $QLORA_CHECK_DIR, else $OUT, else gpu-check/.
# Options: --shape mistral7b|small (default mistral7b), --budget SECONDS for all steps (default 470).
# Environment: PYTHON (default python3), QLORA_WHEELS (default .whl), QLORA_SITE (default /tmp/site).
# Exit codes: 0 every step passed and every target was met; 1 a step failed or ran out of time (the
#   others still ran; the report says which); 2 usage; 3 cannot start (no GPU without --cpu, no python,
#   repo files missing); 4 every step passed but a target was missed (plan within 10% of measured peak).
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
cpu=0
shape=mistral7b
budget=470
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --cpu) cpu=1 ;;
    --shape) shape=${2:-}; shift ;;
    --budget) budget=${2:-}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$shape" in
  mistral7b|small) ;;
  *) echo "gpu-check.sh: --shape must be mistral7b or small, not '$shape'" >&2; exit 2 ;;
esac
if ! [[ "$budget" =~ ^[0-9]+$ ]] || [ "$budget" -lt 60 ]; then
  echo "gpu-check.sh: --budget must be a number of seconds, at least 60" >&2
  exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
wheels=${QLORA_WHEELS:-$root/.whl}
site=${QLORA_SITE:-/tmp/site}
out_dir=${QLORA_CHECK_DIR:-${OUT:-$root/gpu-check}}
work=${TMPDIR:-/tmp}/qlora-gpu-check
log=$out_dir/gpu-check.log
recorded="bash scripts/gpu-check.sh --shape $shape --budget $budget"
if [ "$cpu" = 1 ]; then recorded+=" --cpu"; fi

# Nominal seconds per step for the default 470 s (480 s less the grace a killed step gets); --budget scales
# them. A step may run until the sum of its own and the earlier steps' budgets: time an earlier step left
# unused passes on, and a step that overruns is stopped there, so the later steps keep theirs.
STEP_NAMES=(install doctor gpu-tests plan-memory benchmark report)
STEP_SECONDS=(20 25 100 105 200 20)

# ------------------------------------------------------------------------------------ prerequisites

problems=()
note() { echo "  $1"; }

check_prerequisites() {
  if command -v "$python" >/dev/null 2>&1; then
    note "python: $(command -v "$python") ($("$python" --version 2>&1))"
  else
    problems+=("no '$python' on PATH (set PYTHON)")
  fi
  local file
  for file in recipes/tiny-sql.yaml recipes/tiny/base/model.safetensors tests/test_gpu.py benchmarks/bench.py benchmarks/bench_plan.py; do
    [ -e "$file" ] || problems+=("missing $file")
  done
  local tool
  for tool in timeout tee df; do
    command -v "$tool" >/dev/null 2>&1 || problems+=("no '$tool' command (coreutils)")
  done

  local pin prefix found missing=() count=0
  while read -r pin; do
    count=$((count + 1))
    prefix="${pin%%==*}"
    prefix="${prefix//-/_}-${pin##*==}-"
    found=0
    for file in "$wheels"/*.whl; do
      [ -e "$file" ] || continue
      name=$(basename "$file")
      if [[ "${name,,}" == "${prefix,,}"* ]]; then found=1; fi
    done
    [ "$found" = 1 ] || missing+=("$pin")
  done < <(bash "$root/scripts/gpu-wheels.sh" --list)
  if [ "${#missing[@]}" = 0 ]; then
    note "wheels: $wheels holds all $count pinned wheels ($(du -sh "$wheels" | cut -f1))"
  elif [ "${#missing[@]}" = "$count" ]; then
    note "wheels: none in $wheels; the packages already installed are used (bash scripts/gpu-wheels.sh downloads them)"
  else
    note "wheels: $wheels lacks ${missing[*]}; the installed packages stand in (bash scripts/gpu-wheels.sh)"
  fi

  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    note "gpu: $(nvidia-smi -L | head -1)"
  elif [ "$cpu" = 1 ]; then
    note "gpu: none; --cpu runs everything on the CPU (figures then say nothing about a GPU)"
  elif [ "$dry_run" = 1 ]; then
    note "gpu: none visible here; a real run needs one (or --cpu)"
  else
    problems+=("no GPU visible (nvidia-smi -L); run on a GPU box, or pass --cpu to try the run anyway")
  fi

  local scratch free_gb
  scratch=${TMPDIR:-/tmp}
  free_gb=$(df -Pk "$scratch" | awk 'NR == 2 { print int($4 / 1048576) }')
  note "disk: $free_gb GB free in $scratch (the $shape base is built there or in /dev/shm: 14.5 GB for mistral7b)"
  note "output: $out_dir (BENCHMARKS.md, gpu-check.json, gpu-check.log); step outputs in $work"
}

# ------------------------------------------------------------------------------------------- steps

install=("$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site")

step_command() {
  # Sets the array `command` to step $1's command line, and `shown` to it as one would type it.
  case "$1" in
    install) command=("${install[@]}" "$wheels"/*.whl) ;;
    doctor) command=("$python" -m qlora_cli doctor recipes/tiny-sql.yaml) ;;
    # xunit1: the JUnit flavour that keeps what the tests record (losses, differences) as properties.
    gpu-tests) command=("$python" -m pytest -m gpu tests/test_gpu.py tests/test_fastpath.py -p no:cacheprovider -q -o junit_family=xunit1 "--junitxml=$work/pytest.xml") ;;
    plan-memory) command=("$python" -m benchmarks.bench_plan measure --shape "$shape" --json "$work/plan.json") ;;
    # Two timed optimizer steps of the qlora arm (32k tokens each on mistral7b) after one warm-up: the figures
    # settle there, and the three arms then fit the budget.
    benchmark) command=("$python" -m benchmarks.bench --shape "$shape" --steps 2 --json "$work/bench.json" --markdown "$work/bench.md") ;;
    report) command=("$python" -m benchmarks.bench_plan report "$work" --out "$out_dir" --command "$recorded" --budget "$budget") ;;
  esac
  if [ "$1" = install ]; then
    shown="$(printf '%q ' "${install[@]}")$(printf '%q' "$wheels")/*.whl"
  else
    shown=$(printf '%q ' "${command[@]}")
    shown=${shown% }
  fi
}

have_wheels() { compgen -G "$wheels/*.whl" >/dev/null; }

step_budgets=()
for seconds in "${STEP_SECONDS[@]}"; do step_budgets+=($((seconds * budget / 470))); done

if [ "$dry_run" = 1 ]; then
  echo "gpu-check.sh: dry run: nothing is installed, run or written"
  check_prerequisites
  echo "steps, $budget s in all (a step may use what earlier steps left):"
  for index in "${!STEP_NAMES[@]}"; do
    name=${STEP_NAMES[$index]}
    step_command "$name"
    if [ "$name" = install ] && ! have_wheels; then
      printf '  %-12s %4s s  + %s   (skipped: no wheels in %s)\n' "$name" "${step_budgets[$index]}" "$shown" "$wheels"
    else
      printf '  %-12s %4s s  + %s\n' "$name" "${step_budgets[$index]}" "$shown"
    fi
  done
  echo "environment for every step: PYTHONPATH=$root:$site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1"
  if [ "${#problems[@]}" -gt 0 ]; then
    printf 'gpu-check.sh: cannot start: %s\n' "${problems[@]}" >&2
    exit 3
  fi
  echo "gpu-check.sh: dry run ok"
  exit 0
fi

echo "gpu-check.sh: $recorded"
check_prerequisites
if [ "${#problems[@]}" -gt 0 ]; then
  printf 'gpu-check.sh: cannot start: %s\n' "${problems[@]}" >&2
  exit 3
fi

rm -rf -- "$work"
mkdir -p "$work" "$out_dir"
: >"$log"
: >"$work/steps.tsv"
# The repo's own code first, then the carried wheels, then whatever the box has.
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

started=$SECONDS
deadline=0
failed=0
report_code=0
for index in "${!STEP_NAMES[@]}"; do
  name=${STEP_NAMES[$index]}
  deadline=$((deadline + step_budgets[index]))
  limit=$((deadline - (SECONDS - started)))
  step_command "$name"
  if [ "$name" = install ] && ! have_wheels; then
    printf '%s\t-\t0\t0\t%s\n' "$name" "(skipped: no wheels in $wheels)" >>"$work/steps.tsv"
    echo "[$((SECONDS - started))s] $name: skipped, no wheels in $wheels"
    continue
  fi
  if [ "$limit" -lt 5 ]; then
    printf '%s\t124\t0\t0\t%s\n' "$name" "$shown" >>"$work/steps.tsv"
    echo "[$((SECONDS - started))s] $name: NOT RUN, no time left"
    failed=1
    continue
  fi
  echo "[$((SECONDS - started))s] $name: $shown (up to $limit s)"
  printf '\n===== %s: %s (up to %s s)\n' "$name" "$shown" "$limit" >>"$log"
  step_start=$SECONDS
  set +e
  timeout --kill-after=10 "$limit" "${command[@]}" 2>&1 | tee "$work/$name.log" >>"$log"
  code=${PIPESTATUS[0]}
  set -e
  seconds=$((SECONDS - step_start))
  if [ "$name" = report ]; then
    report_code=$code
  else
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$seconds" "$limit" "$shown" >>"$work/steps.tsv"
    if [ "$code" != 0 ]; then failed=1; fi
  fi
  case "$code" in
    0) result=ok ;;
    124|137) result="TIMED OUT" ;;
    *) result="FAILED (exit $code)" ;;
  esac
  echo "[$((SECONDS - started))s] $name: $result in $seconds s"
  if [ "$name" = report ]; then cat "$work/report.log"; fi
done

echo "gpu-check.sh: $((SECONDS - started)) s; report in $out_dir"
if [ "$failed" = 1 ] || { [ "$report_code" != 0 ] && [ "$report_code" != 4 ]; }; then exit 1; fi
if [ "$report_code" = 4 ]; then exit 4; fi
exit 0
