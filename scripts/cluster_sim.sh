#!/usr/bin/env bash
# Cluster behaviour on Ray's simulated multi-node clusters (see scripts/cluster_sim.py).
# Needs the project's venv (.venv, or VENV=...); about 9 minutes on 2 cores for all four
# scenes (`--only data-parallel`, `--only autoscaling` or `--only node-loss` runs fewer).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
exec "$VENV/bin/python" scripts/cluster_sim.py "$@"
