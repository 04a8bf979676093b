#!/bin/bash
# Multi-node training under Slurm: one torchrun agent per node, c10d rendezvous on the first node.
# Adapt the #SBATCH lines to your cluster, then, from the repository root:
#   sbatch scripts/slurm.sh configs/ablation_1b.toml [--key=value ...]
# data.dir and train.out_dir must be on a filesystem every node sees. configs/ablation_1b.toml fixes
# the global batch (train.global_batch_size), so any node count trains on the same batch.
#SBATCH --job-name=nanoplaybook
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --requeue                    # preemption or node failure: the job comes back and resumes
#SBATCH --signal=B:USR1@300          # 5 minutes before the time limit: requeue too (trap below)
#SBATCH --output=slurm-%x-%j.out     # in the submit folder (Slurm does not create folders for it)

set -euo pipefail
config=${1:-configs/ablation_1b.toml}
case "$config" in --*) echo "error: the first argument is the config file, e.g. configs/ablation_1b.toml" >&2; exit 2;; esac
shift || true
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=$((20000 + SLURM_JOB_ID % 20000))   # two jobs sharing a head node do not collide
gpus=${SLURM_GPUS_ON_NODE:-8}

# --train.resume continues from the newest checkpoint of the run, so a requeued job picks up where
# the last one stopped (the playbook's "checkpoint often, resume automatically"). The time limit
# does not requeue by itself: the signal Slurm sends before it does.
trap 'echo "time limit near: requeueing $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$gpus" \
  --rdzv_backend=c10d --rdzv_endpoint="$head_node:$port" --rdzv_id="$SLURM_JOB_ID" \
  train.py --config "$config" --train.resume "$@" &
wait $!   # in the background so that the USR1 trap runs while training does
