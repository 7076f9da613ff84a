#!/usr/bin/env bash
# Issue 5's MNIST target at the issue's own scale, meant for a lent GPU: 32 px, a 1000-step teacher,
# SFDDM / DDIM skipping / progressive students at 16 and 100 steps, FID in the victim LeNet-5's feature
# space over 10 000 samples. The CPU runs (docs/kd-diffstep.md) had to stop at 28 px and 1 000 samples: the
# teacher's 10 000 x 1000-step samples alone are about 12 CPU hours.
#
#   KD_DATA=DATA bash benchmarks/diffstep_mnist_gpu.sh [WORK]        # WORK defaults to runs/diffstep-mnist-gpu
#
# Steps (each skipped when its output exists, so a second call on the same machine picks up where the
# first stopped; the benchmark's own tasks resume the same way):
#   1. the victim, exactly `make mnist-victim`'s kd-distill line (LeNet-5, 10 epochs): the FID features
#   2. the teacher, `make mnist-sfddm`'s kd-diffstep train line (32 px, 1000 steps, 32,64,64 UNet)
#   3. benchmarks/diffstep.py mnist on them, every sample count = N
# A tar of the victim and the teacher is written next to the results so a later machine can start at 3.
#
# Budgets come from the environment (defaults = the run meant for the GPU); a CPU rehearsal runs this same
# file with small numbers, e.g. DEVICE=cpu VICTIM_EPOCHS=1 TEACHER_ITERS=20 DISTILL_ITERS=3 PROGRESSIVE_ITERS=2
# N=16 PART=8 BATCH=8 CONSISTENCY_N=4.
#
# On the device machine there is no kdtools install and no internet: PYTHONPATH gets the checkout (and
# wheels carried in .whl/ when the image lacks a package: diffusers), the kd- commands run as
# `python -m kdtools.cli.NAME`, and KD_DATA may hold gzipped MNIST files, unpacked here once.
set -euo pipefail

WORK=${1:-runs/diffstep-mnist-gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
VICTIM_EPOCHS=${VICTIM_EPOCHS:-10}
TEACHER_ITERS=${TEACHER_ITERS:-20000}
DISTILL_ITERS=${DISTILL_ITERS:-5000}
PROGRESSIVE_ITERS=${PROGRESSIVE_ITERS:-2000}
DISTILL_LR=${DISTILL_LR:-1e-3}
N=${N:-10000}
PART=${PART:-2500}
BATCH=${BATCH:-2500}
CONSISTENCY_N=${CONSISTENCY_N:-1000}
THREADS=${THREADS:-4}
: "${KD_DATA:?set KD_DATA to the data directory (vision/MNIST inside it)}"

for gz in "$KD_DATA"/vision/MNIST/raw/*.gz; do  # a carried copy is gzipped to fit the transfer
    [ -e "$gz" ] || continue
    [ -e "${gz%.gz}" ] || gunzip -k "$gz"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK"

if [ ! -f "$WORK/victim.safetensors" ]; then
    $PY -m kdtools.cli.distill --data mnist --arch lenet5 --epochs "$VICTIM_EPOCHS" --optimizer adam --lr 0.001 \
        --batch-size 128 --eval-data mnist --device "$DEVICE" -o "$WORK/victim.safetensors"
fi
if [ ! -d "$WORK/teacher" ]; then
    $PY -m kdtools.cli.diffstep train --data mnist --image-size 32 --steps 1000 --unet-channels 32,64,64 \
        --iters "$TEACHER_ITERS" --batch-size 64 --lr 2e-4 --device "$DEVICE" -o "$WORK/teacher"
fi
tar -C "$WORK" -czf "$WORK/victim-and-teacher.tar.gz" victim.safetensors teacher

$PY benchmarks/diffstep.py mnist --teacher "$WORK/teacher" --lenet "$WORK/victim.safetensors" --work "$WORK/bench" \
    --teacher-n "$N" --n "$N" --part "$PART" --batch "$BATCH" --consistency-n "$CONSISTENCY_N" \
    --distill-iters "$DISTILL_ITERS" --progressive-iters "$PROGRESSIVE_ITERS" --distill-lr "$DISTILL_LR" \
    --device "$DEVICE" --threads "$THREADS" --json "$WORK/result.json" --figure "$WORK/samples.png" \
    | tee "$WORK/table.md"
