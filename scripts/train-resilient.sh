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
# What happens on each exit code of `qlora train` (ExitCode in qlora_cli/errors.py; the script never
# reads qlora's messages, which are for people and may change):
#   0    done: exit 0.
#   1    a problem with the recipe, data or folders (e.g. the adapter exists): not retried, exit 1.
#   2    qlora's command-line parser refused an option: not retried, exit 2.
#   14   the loss diverged: not retried (it would again), exit 14.
#   Four codes only say which mode to run in, and are followed at once (no wait, no retry used):
#   10   the run folder holds an interrupted run -> --resume;
#   11   the run folder holds a run with nothing to continue -> --resume (exports a finished run's adapter);
#   12   --resume, but the run folder holds no qlora run -> start fresh;
#   13   --resume, but no complete checkpoint -> start fresh with --force (safe: qlora refuses an existing
#        adapter before it looks at the run folder, so none exists, and the run folder it replaces has no
#        complete checkpoint to lose).
#        After two switches in a row, or a code that does not fit the mode (10 with --resume), exit with it.
#   130, 143 (checkpoint saved), 137 (killed), 70 (a crash, traceback shown), any other code:
#        wait, then run again with --resume; give up after --max-retries with that code.
# SIGINT/SIGTERM to this script stop qlora (it saves a checkpoint) and exit 130/143 without retrying;
# running the same command again continues the run. This script's own usage errors exit 2; no qlora, 127.
# Environment: QLORA_VENV (use $QLORA_VENV/bin/qlora); else qlora on PATH; else .venv/bin/qlora of the repo.
set -euo pipefail

usage() { sed -n '2,/^set /{/^#/{s/^# \{0,1\}//;p;};}' "$0"; }
die() { echo "train-resilient.sh: $*" >&2; exit 2; }
log() { printf '[%s] train-resilient: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
# A whole number of retries or seconds for option $1, given as $2 (missing when the command line ended).
count() { if [[ "${2:-}" =~ ^[0-9]+$ ]]; then echo "$2"; else die "$1 needs a whole number, got '${2:-}'"; fi; }

# qlora's exit codes (ExitCode in qlora_cli/errors.py; tests/test_scripts.py checks that they agree).
EXIT_USER_ERROR=1
EXIT_USAGE=2
EXIT_RUN_INTERRUPTED=10
EXIT_RUN_EXISTS=11
EXIT_NOTHING_TO_RESUME=12
EXIT_NO_CHECKPOINT=13
EXIT_DIVERGED=14

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
  echo "  exit 0 stops; a problem to fix (exit 1), a refused command line (2) or a diverged loss (14) is not retried;"
  echo "  exits 10-13 switch between --resume, a fresh start and --force at once (see --help)."
  exit 0
fi
[ -x "$qlora" ] || { echo "train-resilient.sh: no qlora at $qlora; run scripts/setup.sh or set QLORA_VENV" >&2; exit 127; }

child=
stop_signal=
# Forward as SIGTERM: qlora saves a checkpoint on it, and a background child ignores SIGINT until it trains.
on_signal() {
  stop_signal=$1
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi
}
exit_for_signal() { if [ "$stop_signal" = INT ]; then exit 130; else exit 143; fi; }
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# Runs cmd and sets rc. Waits for qlora to exit, also after a signal, while it saves its checkpoint.
run_attempt() {
  rc=0
  if [ -n "$stop_signal" ]; then return; fi  # stopped between attempts: start nothing
  "${cmd[@]}" &
  child=$!
  # A signal that came before $child was set found nothing to forward (the child may already have been
  # running: on a busy machine it can start before this line does); forward it now.
  if [ -n "$stop_signal" ]; then kill -TERM "$child" 2>/dev/null || true; fi
  while :; do
    if wait "$child"; then rc=0; else rc=$?; fi
    # wait returns early (>128) when a trapped signal arrives; keep waiting while qlora saves.
    kill -0 "$child" 2>/dev/null || break
  done
  child=
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
  next=
  case "$rc" in
    "$EXIT_USER_ERROR")
      log "qlora reported a problem to fix (exit $rc, see its message above): not retried"
      exit "$rc" ;;
    "$EXIT_USAGE")
      log "qlora rejected the command line (exit $rc, see its usage message above): not retried"
      exit "$rc" ;;
    "$EXIT_DIVERGED")
      log "qlora stopped a diverging run (exit $rc, see its message above): not retried"
      exit "$rc" ;;
    "$EXIT_RUN_INTERRUPTED" | "$EXIT_RUN_EXISTS") if [ "$resume" = 0 ]; then next=resume; fi ;;
    "$EXIT_NOTHING_TO_RESUME") if [ "$resume" = 1 ]; then next=fresh; fi ;;
    "$EXIT_NO_CHECKPOINT") if [ "$resume" = 1 ]; then next=fresh-force; fi ;;
    *) next=retry ;;
  esac
  if [ "$next" != retry ]; then
    if [ -z "$next" ] || [ "$hops" -ge 2 ]; then
      log "qlora exited $rc, which asks for a mode already tried (see its message above): not retried"
      exit "$rc"
    fi
    hops=$((hops + 1))
    case "$next" in
      resume) resume=1 ;;
      fresh) resume=0 ;;
      fresh-force) resume=0; force_once=1 ;;
    esac
    log "qlora exited $rc: switching to: $next"
    continue
  fi
  hops=0
  if [ "$retries" -ge "$max_retries" ]; then
    log "qlora train failed with exit $rc; giving up after $max_retries retries"
    exit "$rc"
  fi
  retries=$((retries + 1))
  sleep "$wait_s" &
  child=$!
  # A signal that came before the sleep had a pid to forward to still ends the wait.
  if [ -n "$stop_signal" ]; then kill -TERM "$child" 2>/dev/null || true; fi
  # Logged once the wait can be interrupted: tests signal this script when they read this line.
  log "qlora train failed with exit $rc (preempted, killed or crashed); retrying with --resume in ${wait_s}s"
  wait "$child" || true
  child=
  if [ -n "$stop_signal" ]; then
    log "received SIG$stop_signal while waiting: not retrying"
    exit_for_signal
  fi
  wait_s=$((wait_s * 2 > max_backoff ? max_backoff : wait_s * 2))
  resume=1
done
