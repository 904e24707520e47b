#!/usr/bin/env bash
# Runs a cosmos_jax command on this machine: once, or as N CPU processes joined through
# jax.distributed on loopback (a multi-host job in miniature, for testing).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [--processes N] [--cpu-devices D] [--port PORT] [--log-dir DIR] -- COMMAND [ARGS...]

Single host (the default, N=1): runs COMMAND as is.
  launch/local.sh -- python -m cosmos_jax.cli train --config configs/merged30m_vitb16.py --workdir runs/x

N local CPU processes on loopback (N > 1): starts COMMAND N times with
  COSMOS_COORDINATOR_ADDRESS=localhost:PORT  (PORT: --port, else a free one)
  COSMOS_NUM_PROCESSES=N  COSMOS_PROCESS_ID=0..N-1
  COSMOS_CPU_COLLECTIVES=gloo  JAX_PLATFORMS=cpu
waits for all of them and exits non-zero (stopping the others) as soon as one fails.
  launch/local.sh --processes 2 --cpu-devices 4 -- python -m cosmos_jax.cli train --config ... --workdir ...

Options:
  --processes N     number of processes (default 1)
  --cpu-devices D   CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=D,
                    JAX_PLATFORMS=cpu)
  --port PORT       coordinator port (default: a free port)
  --log-dir DIR     also write each process's output to DIR/process_<i>.log
  -h, --help        this text
EOF
}

processes=1
cpu_devices=""
port=""
log_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local.sh: no command given" >&2; usage >&2; exit 2
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --processes must be a positive integer, got '$processes'" >&2; exit 2
fi

if [[ -n "$cpu_devices" ]]; then
  # Replace any device-count flag already in XLA_FLAGS, keep the rest.
  flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
  export XLA_FLAGS="${flags} --xla_force_host_platform_device_count=${cpu_devices}"
  export JAX_PLATFORMS=cpu
fi

if [[ "$processes" -eq 1 ]]; then
  exec "$@"
fi

# Several processes on one machine share its CPU: the GPU/TPU runtimes would each claim all
# accelerators, so loopback jobs are CPU jobs.
export JAX_PLATFORMS=cpu
export COSMOS_CPU_COLLECTIVES="${COSMOS_CPU_COLLECTIVES:-gloo}"
if [[ -z "$port" ]]; then
  python_bin="$(command -v python3 || command -v python)"
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
fi
export COSMOS_COORDINATOR_ADDRESS="localhost:${port}"
export COSMOS_NUM_PROCESSES="$processes"
[[ -n "$log_dir" ]] && mkdir -p "$log_dir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 130' INT

echo "local.sh: ${processes} processes, coordinator ${COSMOS_COORDINATOR_ADDRESS}" >&2
for ((i = 0; i < processes; i++)); do
  if [[ -n "$log_dir" ]]; then
    COSMOS_PROCESS_ID="$i" "$@" > >(tee "${log_dir}/process_${i}.log" | sed -u "s/^/[p${i}] /") 2>&1 &
  else
    COSMOS_PROCESS_ID="$i" "$@" > >(sed -u "s/^/[p${i}] /") 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`, which older bash lacks and which also reports the output filters.
status=0
remaining=${#pids[@]}
declare -A done_pids=()
while [[ "$remaining" -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -n "${done_pids[$pid]:-}" ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      done_pids[$pid]=1
      remaining=$((remaining - 1))
      if [[ "$rc" -ne 0 && "$status" -eq 0 ]]; then
        echo "local.sh: process $i exited with status $rc; stopping the others" >&2
        status=$rc
        cleanup
      fi
    fi
  done
  [[ "$remaining" -gt 0 ]] && sleep 0.5
done
wait  # the output filters
exit "$status"
