# kd-diffstep recipes (issue #5): a diffusion teacher, SFDDM students and the baselines on the same teacher.
# Outputs under runs/<recipe>/. See docs/kd-diffstep.md.
RECIPES += swissroll-sfddm mnist-sfddm cifar10-sfddm
.PHONY: swissroll-sfddm mnist-sfddm cifar10-sfddm

# 2-D Swiss roll (CPU, minutes): teacher 500 steps, SFDDM and baselines at 50 and 10 steps.
swissroll-sfddm: install
	set -e; d=$(RUNS)/swissroll-sfddm; mkdir -p $$d; \
	$(KD) kd-diffstep train --data swissroll --steps 500 --hidden-dim 128 --iters 4000 --batch-size 512 --lr 2e-3 --force -o $$d/teacher; \
	$(KD) kd-diffstep sample $$d/teacher -n 10000 --batch-size 10000 -o $$d/teacher.h5 --grid $$d/teacher.png; \
	for s in 50 10; do \
	  for m in sfddm ddim progressive scratch; do \
	    $(KD) kd-diffstep distill $$d/teacher --steps $$s --method $$m --iters 1500 --batch-size 512 --lr 1e-3 --force -o $$d/$$m$$s; \
	    $(KD) kd-diffstep sample $$d/$$m$$s -n 10000 --batch-size 10000 -o $$d/$$m$$s.h5 --grid $$d/$$m$$s.png; \
	  done; \
	  $(KD) kd-diffstep compare $$d/sfddm$$s --teacher $$d/teacher -n 1000 --pairs $$d/pairs$$s.png --interp $$d/interp$$s.png; \
	done
	@echo "sliced Wasserstein table: $(PY) benchmarks/diffstep.py swissroll"

# MNIST at 32 px: a small 1000-step UNet teacher, SFDDM at 16 and 100 steps, DDIM and progressive at 16,
# FID over 10 000 samples in the feature space of the MNIST LeNet-5 victim (make mnist-victim). Meant for a
# GPU: on a CPU the teacher's 10 000 samples x 1000 steps alone take days (measured: ~17 min per 250
# samples on one core for the smaller 16,32,32 UNet at 28 px). The CPU-sized version of this comparison
# (1 000 teacher samples, the same students) is `benchmarks/diffstep.py mnist` (docs/kd-diffstep.md).
mnist-sfddm: install mnist-victim
	set -e; d=$(RUNS)/mnist-sfddm; mkdir -p $$d; \
	$(KD) kd-diffstep train --data mnist --image-size 32 --steps 1000 --unet-channels 32,64,64 --iters 20000 --batch-size 64 --lr 2e-4 --force -o $$d/teacher; \
	$(KD) kd-diffstep distill $$d/teacher --steps 16 -o $$d/sfddm16 --iters 5000 --batch-size 64 --force; \
	$(KD) kd-diffstep distill $$d/teacher --steps 100 --subsequence scattered -o $$d/sfddm100 --iters 5000 --batch-size 64 --force; \
	$(KD) kd-diffstep distill $$d/teacher --steps 16 --method ddim -o $$d/ddim16 --force; \
	$(KD) kd-diffstep distill $$d/teacher --steps 16 --method progressive -o $$d/prog16 --iters 2000 --batch-size 64 --force; \
	for m in teacher sfddm16 sfddm100 ddim16 prog16; do \
	  $(KD) kd-diffstep sample $$d/$$m -n 10000 -o $$d/$$m.h5 --grid $$d/$$m.png; \
	  $(KD) kd-eval fid $$d/$$m.h5 --ref mnist --features lenet:$(RUNS)/mnist/victim.safetensors; \
	done; \
	$(KD) kd-diffstep compare $$d/sfddm16 --teacher $$d/teacher --pairs $$d/pairs16.png --interp $$d/interp16.png

# CIFAR-10 at GPU scale. Teacher: google/ddpm-cifar10-32 (hub id when online, or a local copy of that
# directory: TEACHER=path/to/ddpm-cifar10-32). Standard FID needs the TF-ported Inception weights:
# INCEPTION=path/to/pt_inception-2015-12-05.pth. 1000 -> 128 / 100 / 16 steps as in chapter 6.
TEACHER ?= google/ddpm-cifar10-32
INCEPTION ?= pt_inception-2015-12-05.pth
cifar10-sfddm: install
	set -e; d=$(RUNS)/cifar10-sfddm; mkdir -p $$d; \
	for s in 128 100 16; do \
	  $(KD) kd-diffstep distill $(TEACHER) --data cifar10 --steps $$s --iters 10000 --batch-size 50 --lr 2e-4 --device cuda --force -o $$d/sfddm$$s; \
	  $(KD) kd-diffstep sample $$d/sfddm$$s -n 50000 --batch-size 500 --device cuda -o $$d/sfddm$$s.h5 --grid $$d/sfddm$$s.png; \
	  $(KD) kd-eval fid $$d/sfddm$$s.h5 --ref cifar10 --ref-num 50000 --features inception:$(INCEPTION) --device cuda; \
	done; \
	$(KD) kd-diffstep distill $(TEACHER) --data cifar10 --steps 16 --method progressive --iters 10000 --batch-size 50 --device cuda --force -o $$d/prog16; \
	$(KD) kd-diffstep distill $(TEACHER) --steps 16 --method ddim --force -o $$d/ddim16
