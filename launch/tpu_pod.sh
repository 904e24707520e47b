#!/usr/bin/env bash
# Creates (or reuses) a Cloud TPU VM, puts this repository on every worker, installs it, and
# runs the same command on all workers at once. jax.distributed needs no settings there:
# cosmos_jax.train.distributed.initialize() finds the TPU workers itself.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE [options] [-- COMMAND [ARGS...]]

Creates the TPU VM NAME if `gcloud compute tpus tpu-vm describe` does not find it, copies this
checkout (or clones --repo) to every worker, installs it with `pip install -e .[tpu]` into a
Python 3.11 virtualenv, and runs COMMAND on all workers (--worker=all). The default COMMAND:
  python -m cosmos_jax.cli train --config CONFIG --workdir WORKDIR

Options (each also read from the environment variable in brackets):
  --name NAME            TPU VM name                                   [COSMOS_TPU_NAME]
  --zone ZONE            zone, e.g. us-central2-b                      [COSMOS_TPU_ZONE]
  --project PROJECT      GCP project (default: gcloud's)               [COSMOS_TPU_PROJECT]
  --type TYPE            accelerator type (default v4-32)              [COSMOS_TPU_TYPE]
  --version VERSION      TPU software version (default tpu-ubuntu2204-base) [COSMOS_TPU_VERSION]
  --spot                 create a Spot TPU                             [COSMOS_TPU_SPOT=1]
  --repo URL             git clone URL instead of copying this checkout [COSMOS_REPO_URL]
  --ref REF              branch/tag/commit to check out with --repo    [COSMOS_REPO_REF]
  --remote-dir DIR       checkout directory on the workers (default cosmos_jax) [COSMOS_REMOTE_DIR]
  --config PATH          config for the default command (default configs/merged30m_vitb16.py) [COSMOS_CONFIG]
  --workdir DIR          workdir for the default command, a path every worker shares,
                         e.g. a bucket mounted with gcsfuse at /mnt/gcs   [COSMOS_WORKDIR]
  --skip-setup           reuse the code and virtualenv already on the workers
  --detach               run in the background on the workers (log: ~/cosmos_run.log)
  --dry-run              print the gcloud commands instead of running them
  -h, --help             this text

Examples:
  launch/tpu_pod.sh --name cosmos-v4 --zone us-central2-b --type v4-64 \
      --workdir /mnt/gcs/cosmos/vitb16
  launch/tpu_pod.sh --name cosmos-v4 --zone us-central2-b --skip-setup -- \
      python -m cosmos_jax.cli train --config configs/merged30m_vitb16.py \
      --workdir /mnt/gcs/cosmos/vitb16

A run that crashed can leave a process holding the TPU ("TPU in use"); find it on the workers
with `sudo lsof -w /dev/accel* /dev/vfio/*` and stop it by its pid.
EOF
}

name="${COSMOS_TPU_NAME:-}"
zone="${COSMOS_TPU_ZONE:-}"
project="${COSMOS_TPU_PROJECT:-}"
accel_type="${COSMOS_TPU_TYPE:-v4-32}"
version="${COSMOS_TPU_VERSION:-tpu-ubuntu2204-base}"
spot="${COSMOS_TPU_SPOT:-0}"
repo_url="${COSMOS_REPO_URL:-}"
repo_ref="${COSMOS_REPO_REF:-}"
remote_dir="${COSMOS_REMOTE_DIR:-cosmos_jax}"
config="${COSMOS_CONFIG:-configs/merged30m_vitb16.py}"
workdir="${COSMOS_WORKDIR:-}"
skip_setup=0
detach=0
dry_run=0
python_version="3.11"
venv='$HOME/cosmos_venv'   # expanded on the workers

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type|--accelerator-type) accel_type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo) repo_url="$2"; shift 2 ;;
    --ref) repo_ref="$2"; shift 2 ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --skip-setup) skip_setup=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --name and --zone (or COSMOS_TPU_NAME, COSMOS_TPU_ZONE) are required" >&2
  usage >&2
  exit 2
fi
if [[ $# -gt 0 ]]; then
  command=("$@")
else
  if [[ -z "$workdir" ]]; then
    echo "tpu_pod.sh: give --workdir (e.g. /mnt/gcs/runs/x) or a command after --" >&2
    exit 2
  fi
  # No XLA:CPU tuning on TPU workers (auto would find the chips too; off says so up front).
  command=(python -m cosmos_jax.cli train --config "$config" --workdir "$workdir"
           --config.perf.cpu_tuning=off)
fi

gcloud_args=(--zone "$zone")
[[ -n "$project" ]] && gcloud_args+=(--project "$project")

run() {
  if [[ "$dry_run" -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {  # one shell command line, run on every worker in parallel
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command "$1"
}

# 1. The TPU VM: reuse it, or create it.
if [[ "$dry_run" -eq 0 ]] && state="$(gcloud compute tpus tpu-vm describe "$name" \
    "${gcloud_args[@]}" --format='value(state)' 2>/dev/null)"; then
  echo "tpu_pod.sh: reusing TPU VM $name ($state)" >&2
  if [[ "$state" != "READY" ]]; then
    echo "tpu_pod.sh: $name is $state, not READY; start or delete it first" >&2
    exit 1
  fi
else
  echo "tpu_pod.sh: creating TPU VM $name ($accel_type, $version) in $zone" >&2
  create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}"
          --accelerator-type "$accel_type" --version "$version")
  [[ "$spot" == "1" ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. The code and its environment on every worker.
if [[ "$skip_setup" -eq 0 ]]; then
  if [[ -n "$repo_url" ]]; then
    checkout="if [ -d $(printf %q "$remote_dir")/.git ]; then git -C $(printf %q "$remote_dir") fetch --all --tags;"
    checkout+=" else git clone $(printf %q "$repo_url") $(printf %q "$remote_dir"); fi"
    [[ -n "$repo_ref" ]] && checkout+=" && git -C $(printf %q "$remote_dir") checkout $(printf %q "$repo_ref")"
    # A branch moves forward; a tag or commit (detached) stays where it is.
    checkout+=" && { git -C $(printf %q "$remote_dir") pull --ff-only 2>/dev/null || true; }"
    on_all_workers "$checkout"
  else
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    tmpdir="$(mktemp -d)"
    trap 'rm -rf "$tmpdir"' EXIT
    tarball="$tmpdir/cosmos_jax.tar.gz"
    tar -C "$repo_root" --exclude=.venv --exclude=.git --exclude='__pycache__' \
        --exclude='*.egg-info' --exclude=runs -czf "$tarball" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:cosmos_jax.tar.gz" \
        "${gcloud_args[@]}" --worker=all
    on_all_workers "mkdir -p $(printf %q "$remote_dir") && tar -xzf cosmos_jax.tar.gz -C $(printf %q "$remote_dir")"
  fi
  # TPU VM images ship an older Python; uv provides 3.11 without root.
  on_all_workers "set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh;
    export PATH=\$HOME/.local/bin:\$PATH; cd $(printf %q "$remote_dir");
    [ -x $venv/bin/python ] || uv venv --python $python_version $venv;
    uv pip install --python $venv/bin/python -e '.[tpu]'"
fi

# 3. The same command on all workers at once.
cmd_line="$(printf '%q ' "${command[@]}")"
remote="cd $(printf %q "$remote_dir") && source $venv/bin/activate && $cmd_line"
if [[ "$detach" -eq 1 ]]; then
  on_all_workers "nohup bash -c $(printf %q "$remote") > \$HOME/cosmos_run.log 2>&1 < /dev/null &"
  echo "tpu_pod.sh: started on all workers; follow with:" >&2
  echo "  gcloud compute tpus tpu-vm ssh $name --zone $zone --worker=0 --command 'tail -f ~/cosmos_run.log'" >&2
else
  on_all_workers "$remote"
fi
