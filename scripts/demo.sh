#!/usr/bin/env bash
# The whole stack on one machine: private nats-server (JetStream), etcd and
# redis-server on free loopback ports, a SQLite database, 2 task pods and 2
# reference gateways as separate processes; seeds sessions of mixed sizes,
# publishes a sample workload (a live line of delivered/expected while it
# runs), waits for it to settle and prints a delivery report. Everything it
# started is stopped on exit (Ctrl-C too), unless --keep.
#
#   scripts/demo.sh          report as text
#   scripts/demo.sh --json   ... and as one JSON object on the last line
#   scripts/demo.sh --keep   leave the stack running (and a private
#                            Prometheus with the alert rules, if installed)
#                            and print where to look and how to stop it
#
# Exits non-zero if any expected delivery was lost.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

json=()
keep=0
for arg in "$@"; do
  case "$arg" in
    --json) json=(--json) ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

USERS=${DEMO_USERS:-2400}
EVENTS=${DEMO_EVENTS:-4000}
RATE=${DEMO_RATE:-2000}
SESSIONS=${DEMO_SESSIONS:-2x300,10x100,100x30,1000x4,2400x1}

say() { echo "demo: $*" >&2; }

resonance_ensure_tools
say "building (release; the first build takes several minutes)"
cargo build --release --bin resonance-task >&2
demo_started=$SECONDS
BIN=$PWD/target/release/resonance-task

WORK=$(mktemp -d -t resonance-demo.XXXXXX)
pids=()
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  if [ "$keep" = 1 ] && [ "$code" -eq 0 ]; then
    printf '%s\n' "${pids[@]}" >"$WORK/pids"
    kept_report
    exit 0
  fi
  # Last started first: pods drain while gateways and servers still run.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  if [ "$code" -ne 0 ]; then
    say "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$code"
}

# Where to look at a kept stack, and how to stop it.
kept_report() {
  local prom="not installed (apt-get install prometheus); scrape the URLs above"
  [ -n "$PROM_PORT" ] && prom="http://127.0.0.1:$PROM_PORT (alerts: http://127.0.0.1:$PROM_PORT/alerts)"
  cat >&2 <<KEPT
demo: the stack keeps running (logs and data in $WORK)
  pods' metrics:    http://127.0.0.1:$POD1_ADMIN/metrics  http://127.0.0.1:$POD2_ADMIN/metrics
  pods' readiness:  http://127.0.0.1:$POD1_ADMIN/readyz  http://127.0.0.1:$POD2_ADMIN/readyz
  gateways' stats:  http://127.0.0.1:$G1_HTTP/stats  http://127.0.0.1:$G2_HTTP/stats
  Prometheus:       $prom
  its environment:  export RESONANCE_TASK__NATS__URL=$RESONANCE_TASK__NATS__URL RESONANCE_TASK__REDIS__ADDR=$RESONANCE_TASK__REDIS__ADDR RESONANCE_TASK__ETCD__ENDPOINTS=$RESONANCE_TASK__ETCD__ENDPOINTS RESONANCE_TASK__DATABASE__URL='$RESONANCE_TASK__DATABASE__URL'
  then try:         $BIN dlq list
                    $BIN workload --events 1000 --rate 500 --stats http://127.0.0.1:$G1_HTTP/stats,http://127.0.0.1:$G2_HTTP/stats
  stop it:          kill \$(cat $WORK/pids); rm -rf $WORK
KEPT
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() { resonance_start "$@"; }

resonance_free_ports NATS_PORT ETCD_PORT ETCD_PEER REDIS_PORT
resonance_free_ports G1_HTTP G2_HTTP POD1_ADMIN POD2_ADMIN
PROM_PORT=

say "starting nats-server :$NATS_PORT, etcd :$ETCD_PORT, redis-server :$REDIS_PORT in $WORK"
resonance_start_engines demo || { say "a server did not start; see $WORK/*.log"; exit 1; }
export RESONANCE_TASK__LOG__LEVEL=${RESONANCE_TASK__LOG__LEVEL:-info}

say "seeding $USERS users into sessions $SESSIONS"
RESONANCE_TASK__LOG__LEVEL=warn "$BIN" seed --users "$USERS" --sessions "$SESSIONS" >&2

# Users 0..45% on gateway-001, 45..90% on gateway-002, the rest offline.
split1=$((USERS * 45 / 100)); split2=$((USERS * 90 / 100))
say "starting 2 reference gateways (users 0..$split1, $split1..$split2; $((USERS - split2)) offline)"
start gateway-001 "$BIN" gateway --id gateway-001 --users "0..$split1" --http "127.0.0.1:$G1_HTTP" --ready-file "$WORK/gateway-001.ready"
start gateway-002 "$BIN" gateway --id gateway-002 --users "$split1..$split2" --http "127.0.0.1:$G2_HTTP" --ready-file "$WORK/gateway-002.ready"

say "starting 2 task pods"
RESONANCE_TASK__SERVICE__NAME=task-pod-1 RESONANCE_TASK__ADMIN__LISTEN="127.0.0.1:$POD1_ADMIN" start pod-1 "$BIN" run
RESONANCE_TASK__SERVICE__NAME=task-pod-2 RESONANCE_TASK__ADMIN__LISTEN="127.0.0.1:$POD2_ADMIN" start pod-2 "$BIN" run

wait_for() { # description, test command...
  local what=$1; shift
  local tries=600
  until "$@"; do
    tries=$((tries - 1))
    if [ "$tries" -le 0 ]; then say "timed out waiting for $what; logs in $WORK"; exit 1; fi
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { say "a process exited while waiting for $what; logs in $WORK"; tail -5 "$WORK"/*.log >&2; exit 1; }
    done
    sleep 0.1
  done
}
wait_for "gateways" test -s "$WORK/gateway-001.ready" -a -s "$WORK/gateway-002.ready"
wait_for "pods" grep -q consuming "$WORK/pod-1.log" "$WORK/pod-2.log"
wait_for "pod 2" grep -q consuming "$WORK/pod-2.log"

if [ "$keep" = 1 ] && command -v prometheus >/dev/null; then
  resonance_free_ports PROM_PORT
  cat >"$WORK/prometheus.yml" <<PROM
global: {scrape_interval: 5s, evaluation_interval: 5s}
rule_files: [$PWD/deploy/prometheus/alerts.yml]
scrape_configs:
  - job_name: resonance-task
    static_configs: [{targets: ["127.0.0.1:$POD1_ADMIN", "127.0.0.1:$POD2_ADMIN"]}]
  - job_name: resonance-gateway
    static_configs: [{targets: ["127.0.0.1:$G1_HTTP", "127.0.0.1:$G2_HTTP"]}]
PROM
  say "starting a private Prometheus on :$PROM_PORT with the alert rules"
  start prometheus prometheus --config.file="$WORK/prometheus.yml" \
    --storage.tsdb.path="$WORK/prometheus" --web.listen-address="127.0.0.1:$PROM_PORT"
fi

say "pods' metrics: http://127.0.0.1:$POD1_ADMIN/metrics http://127.0.0.1:$POD2_ADMIN/metrics"
say "publishing $EVENTS events at $RATE/s"
status=0
RESONANCE_TASK__LOG__LEVEL=warn "$BIN" workload --events "$EVENTS" --rate "$RATE" \
  --stats "http://127.0.0.1:$G1_HTTP/stats,http://127.0.0.1:$G2_HTTP/stats" "${json[@]}" || status=$?

# What the pods' own metrics say, summed over both pods (plain bash HTTP, so
# no curl is needed).
scrape() {
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 0
  printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
sum() { echo "$metrics" | grep -F "$1" | grep -v '^#' | awk '{ s += $NF } END { printf "%d", s }'; }
# The gateways have everything; give the pods a moment to record their acks.
for _ in $(seq 50); do
  metrics=$( { scrape "$POD1_ADMIN"; scrape "$POD2_ADMIN"; } )
  [ "$(sum 'resonance_task_events_in_flight')" = 0 ] && break
  sleep 0.1
done
say "pods' /metrics: deliveries delivered $(sum 'resonance_task_deliveries_total{outcome="delivered"'), offline $(sum 'resonance_task_deliveries_total{outcome="offline"'), events acked $(sum 'resonance_task_events_total{outcome="acked"}'), dead-lettered $(sum 'resonance_task_events_total{outcome="dead_lettered"}')"
say "the demo took $((SECONDS - demo_started)) s after the build"
exit "$status"
