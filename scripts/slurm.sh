#!/bin/bash
# Multi-node training under Slurm: one torchrun agent per node, c10d rendezvous on the first node.
# Adapt the #SBATCH lines to your cluster, then: sbatch scripts/slurm.sh configs/ablation_1b.toml [--key=value ...]
#SBATCH --job-name=nanoplaybook
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --requeue                    # a preempted or failed job comes back and resumes (see below)
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
config=${1:-configs/ablation_1b.toml}; shift || true
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# --train.resume continues from the newest checkpoint of the run, so a requeued job picks up where
# the last one stopped (the playbook's "checkpoint often, resume automatically").
srun torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="${GPUS_PER_NODE:-8}" \
  --rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" --rdzv_id="$SLURM_JOB_ID" \
  train.py --config "$config" --train.resume "$@"
