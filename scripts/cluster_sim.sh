#!/usr/bin/env bash
# Cluster behaviour on Ray's simulated multi-node clusters (see scripts/cluster_sim.py).
# Needs the project's venv (.venv, or VENV=...); about 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
exec "$VENV/bin/python" scripts/cluster_sim.py "$@"
