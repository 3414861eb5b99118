#!/usr/bin/env bash
# The local stack for people who want the Prefect UI: a Prefect server (SQLite, UI on
# http://127.0.0.1:4200), `cyclej serve` (executes Retry of `cyclej run` runs from the UI or
# `prefect flow-run retry`) and, with --s3, an S3 endpoint on loopback (moto) to try `s3://` storage.
#
#   infra/start_local_stack.sh            # Prefect server only
#   infra/start_local_stack.sh --s3       # plus moto S3 on 127.0.0.1:9000 and a bucket `cyclej`
#
# Prints the variables to export in the shells that run `cyclej run`, workers or `prefect deploy`.
# Ctrl-C stops everything it started. State lives in $CYCLEJ_STACK_HOME (default ~/.cyclej-stack).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CYCLEJ_BIN:-$HERE/.venv/bin}"
[[ -x "$BIN/prefect" ]] || BIN="$(dirname "$(command -v prefect)")"
STACK_HOME="${CYCLEJ_STACK_HOME:-$HOME/.cyclej-stack}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
S3_PORT="${S3_PORT:-9000}"
WITH_S3=0
for arg in "$@"; do
  case "$arg" in
    --s3) WITH_S3=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (use --s3 or --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$STACK_HOME/prefect"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

export PREFECT_HOME="$STACK_HOME/prefect"
export PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STACK_HOME/prefect/prefect.db"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# The UI calls the API at this URL; left unset it assumes port 4200 whatever PREFECT_PORT says.
export PREFECT_UI_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
"$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$STACK_HOME/prefect-server.log" 2>&1 &
pids+=($!)

if [[ $WITH_S3 == 1 ]]; then
  "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STACK_HOME/moto.log" 2>&1 &
  pids+=($!)
fi

wait_for() {  # url, what, log
  for _ in $(seq 1 240); do
    if "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "$2 did not start; see $3" >&2
  exit 1
}
wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" "Prefect server" "$STACK_HOME/prefect-server.log"

# The runner for retries of `cyclej run` runs (they are runs of the deployment cyclej-pipeline/cyclej-run);
# with --s3 it gets the loopback endpoint's credentials, as the shells running `cyclej run` do.
serve_env=(PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api")
if [[ $WITH_S3 == 1 ]]; then
  serve_env+=(AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
              AWS_DEFAULT_REGION=us-east-1)
fi
env "${serve_env[@]}" "$BIN/cyclej" serve >"$STACK_HOME/cyclej-serve.log" 2>&1 &
pids+=($!)

echo
echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT   (log: $STACK_HOME/prefect-server.log)"
echo "Retries of cyclej runs: cyclej serve   (log: $STACK_HOME/cyclej-serve.log)"
echo "export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api"
if [[ $WITH_S3 == 1 ]]; then
  wait_for "http://127.0.0.1:$S3_PORT/" "moto S3" "$STACK_HOME/moto.log"
  # moto keeps its data in memory: the bucket is made anew each start.
  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 \
    "$BIN/python" -c "
import boto3, sys
boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket='cyclej')
" "http://127.0.0.1:$S3_PORT"
  echo "S3 (moto, in memory): http://127.0.0.1:$S3_PORT, bucket cyclej"
  echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT"
  echo "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
  echo "# then: cyclej run --preset demo --storage s3://cyclej/runs"
fi
echo
echo "Ctrl-C stops the stack."
wait
