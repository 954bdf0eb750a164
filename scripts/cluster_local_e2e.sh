#!/usr/bin/env bash
# Prove cluster.local.yaml end to end on this machine: `ray up` over SSH to 127.0.0.1,
# `ray job submit` the doctor, a train and a tune job, fetch their results with `ray rsync-down`,
# `ray down`, and stop whatever Ray processes the cluster left behind.
#
#   scripts/cluster_local_e2e.sh            # needs root, a venv in .venv, and apt (for sshd)
#
# Exits non-zero if any step fails. Results land in ./cluster-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
RAY="$VENV/bin/ray"
RESULTS=/tmp/lstm-ae-cluster
export RAY_AUTH_MODE=token   # token authentication is on for local clusters (Ray 2.60)
export RAY_ADDRESS=http://127.0.0.1:8265
# Jobs' shells put this machine's pyenv shims first on PATH, so the venv's interpreter is
# named; on a cloud node (cluster.yaml) the image's `python` is the right one.
PY="$HOME/.lstm-ae/venv/bin/python"

step() { printf '\n== %s\n' "$*"; }

step "SSH to 127.0.0.1 as root with a dedicated key"
if ! command -v sshd >/dev/null || ! command -v rsync >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q openssh-server rsync >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q openssh-server rsync >/dev/null; }
fi
mkdir -p ~/.ssh /run/sshd && chmod 700 ~/.ssh
[ -f ~/.ssh/lstm_ae_local ] || ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/lstm_ae_local
grep -qF "$(cat ~/.ssh/lstm_ae_local.pub)" ~/.ssh/authorized_keys 2>/dev/null || cat ~/.ssh/lstm_ae_local.pub >> ~/.ssh/authorized_keys
chmod 600 ~/.ssh/authorized_keys
ssh-keygen -A >/dev/null
if ! ssh -i ~/.ssh/lstm_ae_local -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=5 root@127.0.0.1 true 2>/dev/null; then
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password
  sleep 1
fi
ssh -i ~/.ssh/lstm_ae_local -o BatchMode=yes -o StrictHostKeyChecking=no root@127.0.0.1 true
mkdir -p ~/.lstm-ae && ln -sfn "$VENV" ~/.lstm-ae/venv

cleanup() {
  step "ray down, and stop what it left running"
  "$RAY" down -y cluster.local.yaml >/dev/null 2>&1 || true
  # Ray's local provider may leave the head's processes running after `ray down`.
  if "$RAY" status --address 127.0.0.1:6379 >/dev/null 2>&1; then
    "$RAY" stop --force >/dev/null 2>&1 || true
  fi
  if "$RAY" status --address 127.0.0.1:6379 >/dev/null 2>&1; then
    echo "error: the cluster is still running after ray down and ray stop" >&2
    exit 1
  fi
  echo "cluster stopped"
}
trap cleanup EXIT

step "ray up cluster.local.yaml"
rm -rf "$RESULTS"
start=$(date +%s)
"$RAY" up -y cluster.local.yaml --no-config-cache
echo "cluster up in $(( $(date +%s) - start )) s"

step "submit: python -m train.doctor (the preflight check, first job on a new cluster)"
"$RAY" job submit --working-dir . -- "$PY" -m train.doctor --output-dir "$RESULTS/runs" | tee /tmp/lstm-ae-doctor.txt
grep -q "| ok |" /tmp/lstm-ae-doctor.txt
grep -q "^ok: a run can work here" /tmp/lstm-ae-doctor.txt

step "submit: python -m train --preset smoke"
"$RAY" job submit --working-dir . -- \
  "$PY" -m train --preset smoke --num-workers 2 --cpus-per-worker 1 --output-dir "$RESULTS/runs" --name e2e-train

step "submit: python -m tune --preset smoke"
"$RAY" job submit --working-dir . -- \
  "$PY" -m tune --preset smoke --num-samples 2 --output-dir "$RESULTS/runs" --name e2e-search

step "fetch the results from the head (ray rsync-down)"
rm -rf cluster-results && mkdir -p cluster-results
"$RAY" rsync-down cluster.local.yaml "$RESULTS/runs/" cluster-results/
test -f cluster-results/e2e-train/result.json
test -f cluster-results/e2e-search/results.csv
"$VENV/bin/python" -m tune.compare cluster-results/e2e-search cluster-results/e2e-train
echo "results in cluster-results/"
