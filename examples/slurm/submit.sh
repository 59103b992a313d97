#!/bin/bash
# The SAE gate on Slurm: a job array (one share of the SAEs per task), then a merge job that
# waits for every task. Exits with the gate's status: 0 passed, 1 a check failed, 2 bad input
# or a missing or failed shard. Run it from the folder that holds the thresholds file:
#
#   examples/slurm/submit.sh [THRESHOLDS] [SHARDS]      (defaults: thresholds.toml, 4)
#
# SAE_GATE_OUT: where each array job's folder goes (default sae-gate-runs; on a filesystem
# every node sees). SAE_GATE_UPDATE_BASELINE=PATH: refresh that baseline from the shards.
# Site options (partition, account, time limit) go in SBATCH_PARTITION, SBATCH_ACCOUNT,
# SBATCH_TIMELIMIT, which sbatch reads; GPU options: see shard.sbatch.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${1:-thresholds.toml}
SHARDS=${2:-4}
ROOT=${SAE_GATE_OUT:-sae-gate-runs}
mkdir -p "$ROOT/logs"

ARRAY=$(sbatch --parsable --array="1-$SHARDS" --output="$ROOT/logs/%x-%A_%a.out" \
    "$HERE/shard.sbatch" "$CONFIG" "$ROOT")
ARRAY=${ARRAY%%;*}  # "id;cluster" where several clusters are configured
echo "shards: array job $ARRAY ($SHARDS tasks) writing to $ROOT/$ARRAY/"

# --wait: sbatch returns when the merge job ends, with the merge's exit status.
echo "merge: waiting for the array and the merge job..."
status=0
MERGE=$(sbatch --parsable --wait --dependency="afterany:$ARRAY" --output="$ROOT/logs/%x-%j.out" \
    "$HERE/merge.sbatch" "$ARRAY" "$ROOT") || status=$?
MERGE=${MERGE%%;*}
if [ -z "$MERGE" ]; then
    echo "submit.sh: the merge job was not submitted" >&2
    exit 2
fi
cat "$ROOT/logs/sae-gate-merge-$MERGE.out" 2>/dev/null || true
# sbatch --wait also returns 0 for a job cancelled before it started: a pass needs the report.
if [ "$status" -eq 0 ] && [ ! -f "$ROOT/$ARRAY/report.json" ]; then
    echo "submit.sh: merge job $MERGE ended without writing $ROOT/$ARRAY/report.json (cancelled?)" >&2
    status=2
fi
if [ -f "$ROOT/$ARRAY/report.json" ]; then
    echo "report: $ROOT/$ARRAY/report.json"
fi
echo "gate exit status: $status"
exit "$status"
