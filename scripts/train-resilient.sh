#!/usr/bin/env bash
# Run `qlora train` on a preemptible box: retry a preemption or crash with --resume, with exponential back-off.
#   bash scripts/train-resilient.sh [options] RECIPE [qlora train options...]
#   bash scripts/train-resilient.sh recipes/mistral7b-alpaca.yaml --set lora.r=16
# Options (before RECIPE; everything after RECIPE, or after `--`, goes to `qlora train` unchanged):
#   --max-retries N         retries after a preemption or crash (default 5)
#   --backoff SECONDS       wait before the first retry, doubled before each next one (default 30)
#   --max-backoff SECONDS   cap on that wait (default 600)
#   --dry-run               print the first command and the retry policy, run nothing
#   -h, --help              this text
# What happens on each exit of `qlora train`:
#   0                         done: exit 0.
#   1 with an "error: ..."    a problem with the recipe, data or folders: not retried, exit 1. Three of
#     line and no traceback   them only say which mode to run in, and are followed at once (no wait):
#                             "holds an interrupted run" or "train.output_dir: ... already exists" -> --resume;
#                             "--resume: ... holds no qlora run" -> start fresh;
#                             "--resume: no complete checkpoint" -> start fresh with --force (safe: qlora
#                             refuses an existing adapter before it looks at the run folder, so none exists,
#                             and the run folder it replaces has no complete checkpoint to lose).
#   2                         qlora's command-line parser refused an option: not retried, exit 2.
#   130, 143 (checkpoint saved), 137 (killed), a traceback, any other code:
#                             wait, then run again with --resume; give up after --max-retries with that code.
# SIGINT/SIGTERM to this script stop qlora (it saves a checkpoint) and exit 130/143 without retrying;
# running the same command again continues the run. This script's own usage errors exit 2; no qlora, 127.
# Environment: QLORA_VENV (use $QLORA_VENV/bin/qlora); else qlora on PATH; else .venv/bin/qlora of the repo.
set -euo pipefail

usage() { sed -n '2,/^set /{/^#/{s/^# \{0,1\}//;p;};}' "$0"; }
die() { echo "train-resilient.sh: $*" >&2; exit 2; }
log() { printf '[%s] train-resilient: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
# A whole number of retries or seconds for option $1, given as $2 (missing when the command line ended).
count() { if [[ "${2:-}" =~ ^[0-9]+$ ]]; then echo "$2"; else die "$1 needs a whole number, got '${2:-}'"; fi; }

max_retries=5
backoff=30
max_backoff=600
dry_run=0
recipe=
while [ $# -gt 0 ] && [ -z "$recipe" ]; do
  case "$1" in
    --max-retries) max_retries=$(count "$1" "${2:-}"); shift 2 ;;
    --backoff) backoff=$(count "$1" "${2:-}"); shift 2 ;;
    --max-backoff) max_backoff=$(count "$1" "${2:-}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; [ $# -gt 0 ] || break; recipe=$1; shift ;;
    -*) usage >&2; die "unknown option $1 (qlora train options go after RECIPE)" ;;
    *) recipe=$1; shift ;;
  esac
done
[ -n "$recipe" ] || { usage >&2; die "missing RECIPE"; }

# The caller's qlora options, minus --resume: this script decides when to resume.
resume=0
passthrough=()
for arg in "$@"; do
  if [ "$arg" = --resume ]; then resume=1; else passthrough+=("$arg"); fi
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${QLORA_VENV:-}" ]; then
  qlora=$QLORA_VENV/bin/qlora
elif command -v qlora >/dev/null 2>&1; then
  qlora=$(command -v qlora)
else
  qlora=$root/.venv/bin/qlora
fi

force_once=0
command_line() {
  cmd=("$qlora" train "$recipe" "${passthrough[@]}")
  if [ "$resume" = 1 ]; then cmd+=(--resume); fi
  if [ "$force_once" = 1 ]; then cmd+=(--force); fi
}

if [ "$dry_run" = 1 ]; then
  command_line
  printf '+'; printf ' %q' "${cmd[@]}"; echo
  echo "retry policy: on exit 130/137/143 or a crash, run again with --resume, up to $max_retries times,"
  echo "  waiting ${backoff}s before the first retry, doubling, at most ${max_backoff}s;"
  echo "  exit 0 stops; a one-line 'error: ...' from qlora (exit 1) is not retried."
  exit 0
fi
[ -x "$qlora" ] || { echo "train-resilient.sh: no qlora at $qlora; run scripts/setup.sh or set QLORA_VENV" >&2; exit 127; }

work=$(mktemp -d "${TMPDIR:-/tmp}/train-resilient.XXXXXX")
child=
stop_signal=
trap 'rm -rf "$work"' EXIT
# Forward as SIGTERM: qlora saves a checkpoint on it, and a background child ignores SIGINT until it trains.
on_signal() {
  stop_signal=$1
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi
}
exit_for_signal() { if [ "$stop_signal" = INT ]; then exit 130; else exit 143; fi; }
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# Runs cmd; sets rc, and leaves qlora's stderr (also shown live) in $work/stderr.
run_attempt() {
  # tee ignores INT/TERM: Ctrl-C or a shutdown signals the whole group, and qlora still has to report its save.
  exec 3> >(trap '' INT TERM; exec tee "$work/stderr" >&2)
  local tee_pid=$!
  "${cmd[@]}" 2>&3 3>&- &
  child=$!
  exec 3>&-
  rc=0
  while :; do
    if wait "$child"; then rc=0; else rc=$?; fi
    # wait returns early (>128) when a trapped signal arrives; keep waiting while qlora saves.
    kill -0 "$child" 2>/dev/null || break
  done
  child=
  # tee ends when the last holder of qlora's stderr exits; a stray grandchild may keep it open, so wait 5 s at most.
  local tries=0
  while kill -0 "$tee_pid" 2>/dev/null && [ "$tries" -lt 50 ]; do sleep 0.1; tries=$((tries + 1)); done
}

# The last "error: " line of qlora's stderr when it comes after any traceback (a user error), else nothing.
user_error() {
  local clean last_error last_traceback
  clean=$(tail -n 200 "$work/stderr" | sed 's/\x1b\[[0-9;]*m//g')
  last_error=$(grep -n '^error: ' <<<"$clean" | tail -n 1 || true)
  [ -n "$last_error" ] || return 0
  last_traceback=$(grep -n 'Traceback (most recent call last)' <<<"$clean" | tail -n 1 | cut -d: -f1 || true)
  if [ "${last_error%%:*}" -gt "${last_traceback:-0}" ]; then echo "${last_error#*:}"; fi
}

attempt=0
retries=0
wait_s=$((backoff > max_backoff ? max_backoff : backoff))
hops=0  # mode switches in a row; two at most (plain -> --resume -> fresh --force), so no loop
while :; do
  command_line
  attempt=$((attempt + 1))
  log "attempt $attempt (retries used: $retries of $max_retries): ${cmd[*]}"
  run_attempt
  force_once=0
  if [ -n "$stop_signal" ]; then
    log "received SIG$stop_signal: not retrying (qlora exited $rc); run the same command again to continue"
    exit_for_signal
  fi
  if [ "$rc" = 0 ]; then
    log "qlora train succeeded (attempt $attempt)"
    exit 0
  fi
  if [ "$rc" = 2 ]; then
    log "qlora rejected the command line (exit 2, see its usage message above): not retried"
    exit 2
  fi
  message=
  if [ "$rc" = 1 ]; then message=$(user_error); fi
  if [ -n "$message" ]; then
    next=
    if [ "$resume" = 0 ] && [[ "$message" == *"holds an interrupted run"* || "$message" == "error: train.output_dir: "*" already exists; pass --force"* ]]; then
      next=resume
    elif [ "$resume" = 1 ] && [[ "$message" == "error: --resume: "*"holds no qlora run to resume"* ]]; then
      next=fresh
    elif [ "$resume" = 1 ] && [[ "$message" == "error: --resume: no complete checkpoint in "* ]]; then
      next=fresh-force
    fi
    if [ -z "$next" ] || [ "$hops" -ge 2 ]; then
      log "qlora reported a problem to fix (not retried): ${message#error: }"
      exit 1
    fi
    hops=$((hops + 1))
    case "$next" in
      resume) resume=1 ;;
      fresh) resume=0 ;;
      fresh-force) resume=0; force_once=1 ;;
    esac
    log "qlora says: ${message#error: }; switching to: $next"
    continue
  fi
  hops=0
  if [ "$retries" -ge "$max_retries" ]; then
    log "qlora train failed with exit $rc; giving up after $max_retries retries"
    exit "$rc"
  fi
  retries=$((retries + 1))
  log "qlora train failed with exit $rc (preempted, killed or crashed); retrying with --resume in ${wait_s}s"
  sleep "$wait_s" &
  child=$!
  wait "$child" || true
  child=
  if [ -n "$stop_signal" ]; then
    log "received SIG$stop_signal while waiting: not retrying"
    exit_for_signal
  fi
  wait_s=$((wait_s * 2 > max_backoff ? max_backoff : wait_s * 2))
  resume=1
done
