#!/usr/bin/env bash
# Copy adapters and runs to or from another machine or a bucket; only complete checkpoints and adapters travel.
#   bash scripts/sync.sh push adapters user@host:qlora/adapters   # rsync over ssh
#   bash scripts/sync.sh push runs s3://my-bucket/qlora/runs       # aws s3 sync (needs the aws CLI)
#   bash scripts/sync.sh pull gs://my-bucket/qlora/adapters adapters  # gsutil -m rsync -r (needs gsutil)
#   bash scripts/sync.sh --dry-run push adapters /mnt/backup/adapters  # print the command, run nothing
# Usage: sync.sh [--dry-run] push|pull SRC DEST
#   push: SRC is a local folder; DEST is user@host:path, s3://..., gs://... or a local path.
#   pull: SRC is any of those; DEST is a local folder (created if missing).
# DEST ends up holding SRC's contents (SRC/x -> DEST/x). Nothing is deleted on either side, so running it
# again only copies what changed. Left out: qlora's unfinished writes (`.staging/` in a run folder, where a
# checkpoint is saved before it appears, and `.NAME.partial-PID` / `.NAME.replaced-PID` folders of an adapter
# being written), so a copy taken mid-training holds only checkpoints and adapters that were complete.
# Exit codes: 0 synced (for rsync, also when files vanished mid-copy: a checkpoint rotated away);
# 2 usage error; 127 the needed tool is missing; else the tool's own exit code.
set -euo pipefail

usage() { sed -n '2,/^set /{/^#/{s/^# \{0,1\}//;p;};}' "$0"; }
die() { echo "sync.sh: $*" >&2; exit 2; }

dry_run=0
positional=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $arg" ;;
    *) positional+=("$arg") ;;
  esac
done
[ "${#positional[@]}" = 3 ] || { usage >&2; die "expected push|pull SRC DEST"; }
direction=${positional[0]}
src=${positional[1]}
dest=${positional[2]}

# Which tool a location needs: s3, gs, or rsync (a user@host:path, host:path or local path).
kind() {
  case "$1" in
    s3://*) echo s3 ;;
    gs://*) echo gs ;;
    *) echo rsync ;;
  esac
}
# A local path has no `host:` before its first slash (./a:b and /x/a:b are local).
is_local() { [ "$(kind "$1")" = rsync ] && [[ "$1" != [!/.]*:* || "${1%%:*}" == */* ]]; }

case "$direction" in
  push) is_local "$src" || die "push: SRC must be a local folder, got $src"
        [ "$dry_run" = 1 ] || [ -d "$src" ] || die "push: no folder $src" ;;
  pull) is_local "$dest" || die "pull: DEST must be a local folder, got $dest" ;;
  *) usage >&2; die "first argument must be push or pull, got $direction" ;;
esac
if [ "$(kind "$src")" != rsync ] && [ "$(kind "$dest")" != rsync ]; then
  die "one side must be local: $src -> $dest"
fi
remote=$src
[ "$direction" = pull ] || remote=$dest

src=${src%/}
dest=${dest%/}
case "$(kind "$remote")" in
  s3)
    tool=aws
    # aws s3 sync matches --exclude globs against the key below SRC/DEST, and * crosses slashes.
    cmd=(aws s3 sync "$src" "$dest" --exclude '.staging/*' --exclude '*/.staging/*'
         --exclude '*.partial-*' --exclude '*.replaced-*')
    ;;
  gs)
    tool=gsutil
    # gsutil rsync takes one -x: a Python regex matched against the path below SRC.
    cmd=(gsutil -m rsync -r -x '(^|.*/)\.staging/.*|.*\.partial-[0-9]+/.*|.*\.replaced-[0-9]+/.*' "$src" "$dest")
    ;;
  rsync)
    tool=rsync
    # Trailing slash on SRC: copy its contents into DEST rather than a SRC folder inside DEST.
    cmd=(rsync -a --human-readable --exclude '.staging/' --exclude '*.partial-*/' --exclude '*.replaced-*/'
         "$src/" "$dest/")
    ;;
esac

printf '+'; printf ' %q' "${cmd[@]}"; echo
if [ "$dry_run" = 1 ]; then exit 0; fi
if ! command -v "$tool" >/dev/null 2>&1; then
  case "$tool" in
    rsync) hint="apt-get install -y rsync (or your system's package manager)" ;;
    aws) hint="pip install awscli, or see https://aws.amazon.com/cli/" ;;
    gsutil) hint="install the Google Cloud SDK: https://cloud.google.com/sdk/docs/install" ;;
  esac
  echo "sync.sh: $tool is needed to sync $src -> $dest but is not installed; $hint" >&2
  exit 127
fi
if [ "$direction" = pull ]; then mkdir -p "$dest"; fi
if [ "$tool" = rsync ] && is_local "$dest"; then mkdir -p "$(dirname "$dest")"; fi

status=0
"${cmd[@]}" || status=$?
if [ "$tool" = rsync ] && [ "$status" = 24 ]; then
  # rsync 24: some source files vanished during the copy, e.g. an old checkpoint rotated away by save_limit.
  echo "sync.sh: some files vanished while copying (checkpoint rotation); the rest was synced" >&2
  status=0
fi
exit "$status"
