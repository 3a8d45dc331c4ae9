#!/usr/bin/env bash
# Launch `entrorl train` under the DeepSpeed launcher: one rank per GPU, every rank runs the same
# loop (its own inference engine and env pool, a shard of each step's task groups) and joins one
# ZeRO learner.
#
#   scripts/launch_deepspeed.sh CONFIG [key=value ...]          # every GPU of this machine
#   NUM_GPUS=8 scripts/launch_deepspeed.sh configs/gpu/alfworld_grpo_epo_8x.yaml
#   HOSTFILE=hosts.txt scripts/launch_deepspeed.sh configs/gpu/math_dapo_2x8.yaml   # multi-node
#
# HOSTFILE lines read `node-1 slots=8` (DeepSpeed's format); this script must be run on the
# first node, with the repository at the same path and passwordless ssh to the others.
# On a CPU-only machine it runs NUM_GPUS CPU ranks over gloo (DS_ACCELERATOR=cpu): the CI path.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
scripts/setup
export PATH="$PWD/.venv/bin:$PATH"
if command -v nvidia-smi >/dev/null 2>&1; then
  NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}
else
  export DS_ACCELERATOR=cpu
  NUM_GPUS=${NUM_GPUS:-2}
fi
args=(--num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")  # slots per node come from the file
fi
exec deepspeed "${args[@]}" --module trainer.cli train "$@"
