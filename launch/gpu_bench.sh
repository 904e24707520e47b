#!/usr/bin/env bash
# The one-GPU benchmark in two steps, for a GPU machine without network access:
#
#   launch/gpu_bench.sh fetch [--official-repo PATH]   # here, with network: wheels into .whl/
#   launch/gpu_bench.sh run [OUT_DIR] [--official-repo PATH] [-- BENCH_ARGS...]   # there
#
# `fetch` downloads, for Python 3.12 on manylinux x86_64, the wheels that a machine with
# python3, jax[cuda] and numpy lacks to run cosmos_jax (flax, optax, grain, ...), and for the
# official PyTorch step (its open_clip needs torchvision, regex and ftfy; torch is assumed).
# With --official-repo it also copies that checkout's src/ (their open_clip and training)
# into .whl/official, so that the one folder carries everything. jax and jaxlib are never
# downloaded: the GPU machine's own (CUDA) build is used.
#
# `run` installs the carried wheels into a temporary folder (not into the machine's Python)
# and runs `python3 -m cosmos_jax.bench.gpu`: the ViT-B/16 COSMOS step in bfloat16 at the
# largest batch that fits, per attention kernel (docs/gpu.md). OUT_DIR defaults to
# runs/gpu_bench; BENCH_ARGS after `--` go to the benchmark (e.g. --cap 256, --budget-s 200,
# --config.model.remat=True). The official step runs when --official-repo is given or
# .whl/official exists.
#
# Environment: PYTHON (default python3), WHEELS (default .whl), TORCHVISION (the version
# matching the GPU machine's torch: 0.26.0 for torch 2.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
TORCHVISION="${TORCHVISION:-0.26.0}"

# Versions run together with jax 0.11.2 on Python 3.12 (docs/gpu.md); flax 0.12.10 is the
# first release that declares jax >= 0.11. orbax-checkpoint and tensorstore are left out:
# the benchmark saves nothing and grain imports orbax only if it is there.
JAX_SIDE=(
  flax==0.12.10 optax==0.2.8 ml_collections==1.1.0 PyYAML==6.0.4 msgpack==1.2.4
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 treescope==0.1.10
  grain==0.2.18 array_record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0 psutil==7.2.2
  protobuf==7.36.2 attrs==26.1.0 prometheus_client==0.26.0
  pillow==13.0.0 tokenizers==0.23.3 ftfy==6.3.1 wcwidth==0.9.4 tqdm==4.70.1
)
OFFICIAL_SIDE=(regex==2026.11.19)

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

download() {   # download DEST SPEC...: binary wheels for CPython 3.12 on manylinux x86_64
  local dest="$1"; shift
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d "$dest" "$@"
}

stage_official() {   # copies the official checkout's src/ (and its commit) into .whl/official
  local repo="$1"
  [[ -d "$repo/src/open_clip" && -d "$repo/src/training" ]] || {
    echo "error: $repo is not a checkout of ExplainableML/cosmos (no src/open_clip)" >&2; exit 2; }
  rm -rf "$WHEELS/official"
  mkdir -p "$WHEELS/official"
  cp -r "$repo/src" "$WHEELS/official/src"
  git -C "$repo" rev-parse HEAD > "$WHEELS/official/COMMIT" 2>/dev/null || true
}

cmd_fetch() {
  local official=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --official-repo) official="${2:?--official-repo needs a path}"; shift 2 ;;
      -h|--help) usage ;;
      *) echo "error: unknown argument to fetch: $1" >&2; usage 2 ;;
    esac
  done
  mkdir -p "$WHEELS"
  download "$WHEELS" "${JAX_SIDE[@]}" "${OFFICIAL_SIDE[@]}" "torchvision==$TORCHVISION"
  [[ -z "$official" ]] || stage_official "$official"
  du -sh "$WHEELS"
  ls "$WHEELS"
}

cmd_run() {
  local out="$ROOT/runs/gpu_bench" official="" bench_args=()
  if [[ $# -gt 0 && "$1" != -* ]]; then out="$1"; shift; fi
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --official-repo) official="${2:?--official-repo needs a path}"; shift 2 ;;
      --) shift; bench_args=("$@"); break ;;
      -h|--help) usage ;;
      *) echo "error: unknown argument to run: $1 (benchmark options go after --)" >&2; usage 2 ;;
    esac
  done
  compgen -G "$WHEELS/*.whl" > /dev/null || {
    echo "error: no wheels in $WHEELS: run 'launch/gpu_bench.sh fetch' on a machine with network" >&2
    exit 2; }
  [[ -n "$official" || ! -d "$WHEELS/official/src" ]] || official="$WHEELS/official"
  [[ -z "$official" || -d "$official/src/open_clip" ]] || {
    echo "error: $official is not a checkout of ExplainableML/cosmos (no src/open_clip)" >&2
    exit 2; }
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/cosmos_gpu_site.XXXXXX")"
  trap 'rm -rf "$SITE"' EXIT
  local wheels=() torch=1 wheel
  "$PYTHON" -c 'import torch' 2>/dev/null || torch=0
  for wheel in "$WHEELS"/*.whl; do   # torchvision only beside a torch to match
    [[ $torch == 1 || "$(basename "$wheel")" != torchvision-* ]] && wheels+=("$wheel")
  done
  echo "installing ${#wheels[@]} wheels into $SITE"
  if "$PYTHON" -m pip --version > /dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" \
      ${wheels[@]+"${wheels[@]}"}
  else   # no pip there: unpacking a wheel is all that importing it needs
    "$PYTHON" -c 'import sys, zipfile
for w in sys.argv[2:]: zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" "${wheels[@]}"
  fi
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"   # absolute: the benchmark runs from the checkout's root
  [[ -z "$official" ]] || official="$(cd "$official" && pwd)"
  local args=(--out "$out")
  [[ -z "$official" ]] || args+=(--official-repo "$official")
  cd "$ROOT"
  PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m cosmos_jax.bench.gpu "${args[@]}" ${bench_args[@]+"${bench_args[@]}"}
}

case "${1:-}" in
  fetch) shift; cmd_fetch "$@" ;;
  run) shift; cmd_run "$@" ;;
  -h|--help|'') usage ;;
  *) echo "error: unknown step '$1' (fetch or run)" >&2; usage 2 ;;
esac
