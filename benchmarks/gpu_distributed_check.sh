#!/usr/bin/env bash
# FSDP2 on 2 GPUs of one host, in one go (meant for the 2x H200 machine; writes under $OUT or ./out):
#  1. per-GPU throughput of the 1B ablation shape: 1 GPU vs 2 GPUs (bench_train.py --fsdp)
#  2. loss curves: 50 steps on 1 GPU (2 micro-batches) vs 2 GPUs (1 each), same global batch
#  3. a simulated two-node launch (torchrun --nnodes=2, one GPU per "node", c10d rendezvous)
#     that trains, checkpoints, and resumes
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
runs=${RUNS:-$out/runs}   # RUNS=/tmp/runs keeps the checkpoints out of $OUT (only logs and metrics come back)
rm -rf "$runs"   # a rerun must not report (or refuse to overwrite) an earlier run
rc=0                 # any failed part makes the script exit 1 at the end
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
layers=${LAYERS:-16}

echo "== 1. FSDP throughput, 1B shape ($layers layers), 1 vs 2 GPUs"
CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node=1 benchmarks/bench_train.py --fsdp --layers "$layers" \
  --steps 6 --warmup 3 --out "$out/fsdp_1gpu.json" > "$out/fsdp_1gpu.log" 2>&1 || rc=1
torchrun --standalone --nproc_per_node=2 benchmarks/bench_train.py --fsdp --layers "$layers" \
  --steps 6 --warmup 3 --out "$out/fsdp_2gpu.json" > "$out/fsdp_2gpu.log" 2>&1 || rc=1
grep -hE "ours|Error" "$out/fsdp_1gpu.log" "$out/fsdp_2gpu.log"

echo "== 2. loss curves, 1 GPU x 2 micro-batches vs 2 GPUs x 1"
common=(--model.vocab_size=8192 --model.d_model=512 --model.n_layers=8 --model.n_heads=8 --model.n_kv_heads=4
        --model.d_ff=1536 --model.max_seq_len=1024 --model.attn_backend=flex --train.seq_len=1024
        --train.micro_batch_size=8 --train.max_steps=50 --train.eval_interval=25 --train.ckpt_interval=50
        --train.log_interval=1 --train.sample_tokens=0 --train.parallelism=fsdp --optim.warmup_steps=10
        --optim.lr=1e-3 --optim.min_lr=1e-4 --train.out_dir="$runs")
CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node=1 train.py "${common[@]}" --train.name=fsdp1 \
  --train.grad_accum_steps=2 > "$out/fsdp1.log" 2>&1 || { rc=1; tail -20 "$out/fsdp1.log"; }
torchrun --standalone --nproc_per_node=2 train.py "${common[@]}" --train.name=fsdp2 > "$out/fsdp2.log" 2>&1 \
  || { rc=1; tail -20 "$out/fsdp2.log"; }
python3 - "$out" "$runs" <<'PY' || rc=1
import json, sys
out, runs = sys.argv[1:]
def curve(name, key="loss"):
    rows = [json.loads(l) for l in open(f"{runs}/{name}/metrics.jsonl")]
    return {r["step"]: r[key] for r in rows if key in r}
a, b = curve("fsdp1"), curve("fsdp2")
diffs = {s: abs(a[s] - b[s]) for s in a if s in b}
summary = {"steps_compared": len(diffs), "max_abs_diff": max(diffs.values()), "mean_abs_diff": sum(diffs.values()) / len(diffs),
           "first_loss": a[1], "last_loss_1gpu": a[50], "last_loss_2gpu": b[50],
           "val_1gpu": curve("fsdp1", "val_loss"), "val_2gpu": curve("fsdp2", "val_loss")}
print(json.dumps(summary))
print("step  1-GPU loss  2-GPU loss")
for s in (1, 2, 5, 10, 20, 30, 40, 50):
    print(f"{s:>4}  {a[s]:.4f}      {b[s]:.4f}")
json.dump({"summary": summary, "one": a, "two": b}, open(f"{out}/loss_curves.json", "w"), indent=1)
PY

echo "== 3. simulated two-node launch: train to 20 (checkpoint at 10, 20), resume to 30"
node() {  # $1: GPU, rest: train.py arguments
  local gpu=$1; shift
  CUDA_VISIBLE_DEVICES=$gpu torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d \
    --rdzv_endpoint=127.0.0.1:29533 --rdzv_id=twonode train.py "${common[@]}" --train.name=twonode \
    --train.ckpt_interval=10 "$@"
}
both_nodes() {  # the two agents of one launch; fails if either does
  node 0 "$@" > "$out/twonode_${stage}0.log" 2>&1 & local first=$!
  node 1 "$@" > "$out/twonode_${stage}1.log" 2>&1 || rc=1
  wait $first || rc=1
}
stage=a both_nodes --train.max_steps=20
if [ $rc -eq 0 ]; then stage=b both_nodes --train.max_steps=30 --train.resume; fi
# c10d may make either agent rank 0: its log holds the step lines
grep -hE "^step +(10|20|30) |saved|error|Error" "$out"/twonode_*.log | head -20
ls "$runs/twonode"
for name in fsdp1 fsdp2 twonode; do cp "$runs/$name/metrics.jsonl" "$out/${name}_metrics.jsonl" 2>/dev/null; done
echo "== exit $rc"
exit $rc
