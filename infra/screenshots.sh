#!/usr/bin/env bash
# Screenshots of the Prefect UI for the README (docs/screenshots/*.png), taken with headless Chromium
# (Debian: `apt-get install chromium`) against the real local stack:
#
#   1. infra/start_local_stack.sh --s3 on free ports (server with UI, `cyclej serve`, moto S3)
#   2. `cyclej run --preset tiny --until context` on s3:// with `context` failing at step 3 → Failed
#   3. the UI's Retry call (state AwaitingRetry) → `cyclej serve` resumes it → Completed
#   4. the run page while Failed (Retry button, the resume-point artifact in the graph, project logs),
#      the same page after the retry, and the artifacts page. (The run page's tabs are client state: a
#      `?tab=` in the URL does not open one, so artifacts are shown through the graph and /artifacts.)
#
#   infra/screenshots.sh [OUT_DIR]      # default docs/screenshots; takes ~3 min on 2 cores
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CYCLEJ_BIN:-$HERE/.venv/bin}"
OUT="${1:-$HERE/docs/screenshots}"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser)}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
free_port() { "$BIN/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
export PREFECT_PORT S3_PORT
PREFECT_PORT="$(free_port)"
S3_PORT="$(free_port)"

stack_pid=""
cleanup() {
  local status=$?
  if [[ $status != 0 && -f "$WORK/stack/cyclej-serve.log" ]]; then tail -30 "$WORK/stack/cyclej-serve.log" >&2; fi
  if [[ -n "$stack_pid" ]]; then kill "$stack_pid" 2>/dev/null; wait "$stack_pid" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

CYCLEJ_STACK_HOME="$WORK/stack" "$HERE/infra/start_local_stack.sh" --s3 >"$WORK/stack.log" 2>&1 &
stack_pid=$!
for _ in $(seq 1 360); do grep -q "Ctrl-C stops" "$WORK/stack.log" && break; sleep 0.5; done
grep -q "Ctrl-C stops" "$WORK/stack.log" || { cat "$WORK/stack.log" >&2; exit 1; }

export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api" AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export CYCLEJ_CACHE="${CYCLEJ_CACHE:-$WORK/cache}"

set +e
CYCLEJ_FAULT=context:3:error "$BIN/cyclej" run --preset tiny --storage s3://cyclej/runs --until context \
  --set orchestration.retries=0 2>"$WORK/run.log"
set -e
RUN_ID="$(grep -oE "flow run '[^']+' \(([0-9a-f-]{36})\)" "$WORK/run.log" | grep -oE '[0-9a-f-]{36}')"
UI="http://127.0.0.1:$PREFECT_PORT"

shoot() {  # name url
  rm -rf "$WORK/chrome"
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$WORK/chrome" --hide-scrollbars \
    --window-size=1500,1000 --virtual-time-budget=20000 --screenshot="$OUT/$1.png" "$2" >/dev/null 2>&1
  echo "$OUT/$1.png"
}

shoot run-failed "$UI/runs/flow-run/$RUN_ID"

# What the UI's Retry button sends; `cyclej serve` picks the run up and resumes it from step 2.
"$BIN/python" - "$RUN_ID" <<'EOF'
import sys, time
from uuid import UUID
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import State

run_id = UUID(sys.argv[1])
with get_client(sync_client=True) as client:
    client.set_flow_run_state(run_id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                            message="Retry from the UI"), force=False)
    started = False
    for _ in range(600):
        state = client.read_flow_run(run_id).state
        started = started or not state.is_final()
        if started and state.is_final():
            break
        time.sleep(1)
    print("retried run:", state.name)
    sys.exit(0 if state.is_completed() else 1)
EOF

shoot run-retried "$UI/runs/flow-run/$RUN_ID"
shoot artifacts "$UI/artifacts"
