#!/usr/bin/env bash
# Measures what one event costs each component, the inputs of the capacity
# model in docs/capacity.md: for each group size, a fresh single-server
# stack (nats-server with monitoring, etcd, redis-server, SQLite), one task
# pod and two reference gateways as processes on the shipped defaults; a
# saturating workload of sessions of that size; then, per event and per
# delivery: the pod's CPU time, Redis commands and bytes, NATS messages and
# bytes, and batch-v1 frames the gateways received.
#
#   scripts/capacity.sh              sizes 2 10 100 1000
#   CAPACITY_SIZES="2 100" scripts/capacity.sh
#
# Prints one line per size and, last, the same as JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

SIZES=${CAPACITY_SIZES:-2 10 100 1000}
DELIVERIES=${CAPACITY_DELIVERIES:-200000}

say() { echo "capacity: $*" >&2; }

resonance_ensure_tools
say "building (release)"
cargo build --release --bin resonance-task >&2
BIN=$PWD/target/release/resonance-task
TICK=$(getconf CLK_TCK)

WORK=$(mktemp -d -t resonance-capacity.XXXXXX)
pids=()
stop_all() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  pids=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT

start() { resonance_start "$@"; }

# An HTTP GET on loopback with bash alone.
get() { # port, path
  exec 3<>"/dev/tcp/127.0.0.1/$1"
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
  cat <&3
  exec 3<&-
}
# A number field of a JSON answer (compact or pretty-printed); 0 if absent.
field() { local v; v=$(grep -o "\"$1\": *[0-9]*" | head -1 | tr -dc 0-9); echo "${v:-0}"; }
nats_counter() { get "$NATS_MON" /varz | field "$1"; }
redis_counter() { redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | grep "^$1:" | cut -d: -f2; }
pod_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$POD_PID/stat"; }
frames() {
  local total=0 g
  for g in "$G1_HTTP" "$G2_HTTP"; do
    total=$((total + $(get "$g" /stats | field batches)))
  done
  echo "$total"
}
snapshot() {
  echo "$(pod_cpu_ticks) $(redis_counter total_commands_processed) $(redis_counter total_net_input_bytes) $(redis_counter total_net_output_bytes) $(nats_counter in_msgs) $(nats_counter out_msgs) $(nats_counter in_bytes) $(nats_counter out_bytes) $(frames)"
}

results=()
for size in $SIZES; do
  rm -rf "${WORK:?}"/*
  resonance_free_ports NATS_PORT NATS_MON ETCD_PORT ETCD_PEER
  resonance_free_ports REDIS_PORT G1_HTTP G2_HTTP
  resonance_start_engines capacity -m "$NATS_MON" || { say "a server did not start; see $WORK/*.log"; exit 1; }
  resonance_wait_port "$NATS_MON" 300 || { say "NATS monitoring did not start"; exit 1; }
  export RESONANCE_TASK__LOG__LEVEL=warn

  users=$(( size * 40 > 4000 ? size * 40 : 4000 ))
  sessions=$(( users / size ))
  events=$(( DELIVERIES / size ))
  [ "$events" -gt 50000 ] && events=50000
  "$BIN" seed --users "$users" --sessions "${size}x${sessions}" >&2
  # Every user online, half on each gateway.
  half=$((users / 2))
  start gateway-001 "$BIN" gateway --id gateway-001 --users "0..$half" --http "127.0.0.1:$G1_HTTP" --ready-file "$WORK/g1.ready"
  start gateway-002 "$BIN" gateway --id gateway-002 --users "$half..$users" --http "127.0.0.1:$G2_HTTP" --ready-file "$WORK/g2.ready"
  RESONANCE_TASK__LOG__LEVEL=info RESONANCE_TASK__ADMIN__LISTEN=127.0.0.1:0 start pod "$BIN" run
  POD_PID=${pids[-1]}
  for _ in $(seq 600); do
    [ -s "$WORK/g1.ready" ] && [ -s "$WORK/g2.ready" ] && grep -q consuming "$WORK/pod.log" && break
    sleep 0.1
  done
  grep -q consuming "$WORK/pod.log" || { say "the pod did not start:"; for f in "$WORK"/pod.log "$WORK"/gateway-*.log; do echo "== $f"; tail -n 5 "$f"; done >&2; exit 1; }

  say "$size-member sessions: $events events, unpaced"
  read -r -a before <<<"$(snapshot)"
  "$BIN" workload --events "$events" --rate 0 \
    --stats "http://127.0.0.1:$G1_HTTP/stats,http://127.0.0.1:$G2_HTTP/stats" >"$WORK/workload.txt"
  read -r -a after <<<"$(snapshot)"
  delivered=$(grep -o 'delivered *[0-9]*' "$WORK/workload.txt" | head -1 | awk '{ print $NF }')
  stop_all

  d() { echo $(( after[$1] - before[$1] )); }
  line=$(awk -v size="$size" -v ev="$events" -v dl="$delivered" -v tick="$TICK" \
    -v cpu="$(d 0)" -v cmds="$(d 1)" -v rin="$(d 2)" -v rout="$(d 3)" \
    -v nin="$(d 4)" -v nout="$(d 5)" -v nbin="$(d 6)" -v nbout="$(d 7)" -v fr="$(d 8)" 'BEGIN {
      us = cpu / tick * 1e6
      printf "{\"group_size\":%d,\"events\":%d,\"deliveries\":%d,\"pod_cpu_us_per_event\":%.1f,\"pod_cpu_us_per_delivery\":%.2f,\"redis_commands_per_event\":%.1f,\"redis_bytes_per_event\":%.0f,\"nats_msgs_per_event\":%.2f,\"nats_bytes_per_event\":%.0f,\"gateway_frames_per_event\":%.2f}",
        size, ev, dl, us / ev, us / dl, cmds / ev, (rin + rout) / ev, (nin + nout) / ev, (nbin + nbout) / ev, fr / ev
    }')
  say "$line"
  results+=("$line")
done

printf '%s\n' "${results[@]}"
