#!/usr/bin/env bash
# make demo: steal a digits classifier through a real three-process pipe, on the bundled data, no download.
#   1. train a victim LeNet-5 on the digits train split (kd-distill)
#   2. the attacker owns 400 other digit images (the "public" split) and no labels: it turns them into
#      20 000 augmented queries (kd-gen-queries), asks the victim for hard labels under a budget, logging
#      every answer (kd-query), and trains a LeNet-5-half student from the answers (kd-distill)
#   3. both are evaluated on the held-out test split (kd-eval)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$here/.venv/bin:$PATH"
out=${DEMO_OUT:-$here/demo-out}
queries=${DEMO_QUERIES:-20000}
mkdir -p "$out"
rm -f "$out/queries.h5"
start=$(date +%s)

echo "== 1/3 training the victim (LeNet-5 on digits/train)" >&2
kd-distill --data digits --split train --arch lenet5 --epochs 30 --optimizer adam --lr 0.002 --augment \
  --eval-data digits -o "$out/victim.safetensors"

echo "== 2/3 stealing it: kd-gen-queries | kd-query | kd-distill ($queries label-only queries)" >&2
kd-gen-queries dataset --data digits --split public -n "$queries" --augment \
  | kd-query "$out/victim.safetensors" --mode label --budget "$queries" --log "$out/queries.h5" \
  | kd-distill --arch lenet5-half --epochs 10 --optimizer adam --lr 0.002 -o "$out/student.safetensors"

echo "== 3/3 evaluating on digits/test" >&2
kd-eval accuracy "$out/student.safetensors" --data digits --reference "$out/victim.safetensors" --json > "$out/eval.json"
kd-eval log "$out/queries.h5" --json > "$out/log.json"
python3 - "$out/eval.json" "$out/log.json" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
ev, log, secs = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
rows = [("victim  (LeNet-5, trained on 1 000 labelled digits)", f"{100 * ev['reference_accuracy']:.2f} %"),
        ("student (LeNet-5-half, stolen through the pipe)", f"{100 * ev['accuracy']:.2f} %"),
        ("student agrees with victim (fidelity)", f"{100 * ev['fidelity']:.2f} %"),
        ("queries spent / budget", f"{log['spent']} / {log['budget']}"),
        ("wall time", f"{secs} s")]
w = max(len(r[0]) for r in rows)
print(f"kdtools demo: digits test split ({ev['samples']} images)")
for name, value in rows:
    print(f"  {name:<{w}}  {value:>12}")
PY
