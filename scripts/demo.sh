#!/usr/bin/env bash
# The built-in tiny demo, on CPU with no network: set up, train three adapters (sql, json, and orders,
# a chat assistant) on one shipped tiny base, then compare them with the base on held-out data, switch and
# mix them, continue sql with DPO, and hold a two-turn conversation with the base and the chat adapter.
#   bash scripts/demo.sh             # everything (a few minutes on 2 CPU cores)
#   bash scripts/demo.sh --dry-run   # print the commands only
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry_run=0
case "${1:-}" in
  -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "demo.sh: unknown option $1" >&2; exit 2 ;;
esac

step() {
  printf '\n\033[1m$ %s\033[0m\n' "$*"
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

if [ "$dry_run" = 0 ]; then bash "$root/scripts/setup.sh" --cpu; fi
cd "$root"
export PATH="${QLORA_VENV:-$root/.venv}/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # everything the demo needs ships in recipes/tiny
started=$(date +%s)

step qlora train recipes/tiny-sql.yaml --force
step qlora train recipes/tiny-json.yaml --force
step qlora train recipes/tiny-orders.yaml --force
step qlora adapters list
step qlora eval --data recipes/tiny/sql/test.jsonl -a none -a sql -a json --mix sql=0.5,json=0.5 --sql --out runs/eval-sql.json
step qlora eval --data recipes/tiny/json/test.jsonl -a none -a sql -a json --mix sql=0.5,json=0.5 --out runs/eval-json.json
step qlora generate --compare -a sql -a json "Which model has the highest seats in cars?" --input "table cars (model, brand, color, price, seats)"
step qlora generate -a sql -a json --prompts recipes/tiny/demo-prompts.jsonl
step qlora generate --mix sql=0.7,json=0.3 "Which model has the highest seats in cars?" --input "table cars (model, brand, color, price, seats)"
step qlora eval --data recipes/tiny/orders/test.jsonl -a none -a orders --out runs/eval-orders.json
# Preference tuning continues the sql adapter: the right query preferred over the same query turned around.
step qlora train recipes/tiny-sql-dpo.yaml --force
step qlora eval --data recipes/tiny/sql/test.jsonl -a none -a sql -a sql-dpo --sql --out runs/eval-sql-dpo.json
step qlora eval --data recipes/tiny/sql/test-preferences.jsonl -a none -a sql -a sql-dpo --out runs/eval-sql-dpo-pairs.json
# A two-turn conversation, typed into --chat: each answers the second turn with its own first answer before it.
chat_turns=$'I would like 3 lamps.\nAdd 2 mugs.\n'
printf '\n\033[1m$ printf %q | qlora generate --compare -a orders --chat\033[0m\n' "$chat_turns"
if [ "$dry_run" = 0 ]; then printf '%s' "$chat_turns" | qlora generate --compare -a orders --chat; fi
echo
echo "demo finished in $(( $(date +%s) - started )) s (after set-up)"
