# AEDM recipes (issue #6): extraction with queries steered through a diffusion prior trained on *other*
# public data. Included from the Makefile after recipes.mk. Outputs under $(RUNS)/<victim>/aedm*/.
AEDM_RECIPES := fmnist-prior mnist-prior mnist-aedm fmnist-aedm mnist-aedm-loop cifar10-aedm
RECIPES += $(AEDM_RECIPES)
.PHONY: $(AEDM_RECIPES)

# CPU-scale priors: a small diffusers UNet (16,32,32 channels) trained for 3000 steps at 28 px (~20 min on
# 2 cores). The attack samples them with a few deterministic DDIM steps.
PRIOR_ARGS := --image-size 28 --steps 1000 --unet-channels 16,32,32 --iters 3000 --batch-size 64 --lr 1e-3 --ema 0.995
# CPU settings of the steering, as measured in benchmarks/aedm.py (the command's defaults are the paper's: 8 sampler
# steps, 5 steering steps)
AEDM_CPU := --sampler-steps 4 --steer-steps 1 --substitute lenet5 --s-optimizer adam --lr-s 1e-3 --s-loss kl --replay-steps 2
# Post-training on the log: square-root class balancing (the victim answers most AEDM queries with a few
# classes, "8" for about two thirds on MNIST), a LeNet-5 twice as wide, 60 epochs. Session 10 benchmark
# (docs/benchmarks.md, AEDM): 98.16 % on MNIST (96.44 plain, 96.98 balanced at width 1), 86.31 % on
# Fashion-MNIST (72.58 plain, 78.89 balanced at width 1).
AEDM_POST_TRAIN = $(POST_TRAIN) --class-balance 0.5 --epochs 60 --arch-args '{"width": 2}'

fmnist-prior: install
	test -f $(RUNS)/priors/fmnist/unet/config.json || $(KD) kd-diffstep train --data fashion-mnist $(PRIOR_ARGS) -o $(RUNS)/priors/fmnist

mnist-prior: install
	test -f $(RUNS)/priors/mnist/unet/config.json || $(KD) kd-diffstep train --data mnist $(PRIOR_ARGS) -o $(RUNS)/priors/mnist

# MNIST victim, prior trained on Fashion-MNIST only, probabilities, 20 000 queries; then the substitute is
# trained again on the saved queries (the paper's second stage, without its augmentation: on these
# off-distribution queries a rotation or shift changes the victim's answer; measured 91.05 % plain against
# 71.26 % augmented in session 6, docs/benchmarks.md; with AEDM_POST_TRAIN 98.16 % in session 10); then the reverse
# (fmnist-aedm).
mnist-aedm: mnist-victim fmnist-prior
	$(KD) kd-gen-queries aedm --diffusion $(RUNS)/priors/fmnist --oracle $(RUNS)/mnist/victim.safetensors --mode probs \
	  --budget 20000 $(AEDM_CPU) --eval-data mnist -o $(RUNS)/mnist/aedm $(call resume_if,$(RUNS)/mnist/aedm)
	$(KD) kd-distill $(RUNS)/mnist/aedm/queries.h5 --arch lenet5 $(AEDM_POST_TRAIN) \
	  --eval-data mnist -o $(RUNS)/mnist/aedm/final.safetensors
	$(KD) kd-eval accuracy $(RUNS)/mnist/aedm/final.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors
	$(MAKE) fmnist-aedm

# Fashion-MNIST victim, prior trained on MNIST only, 50 000 queries.
fmnist-aedm: fmnist-victim mnist-prior
	$(KD) kd-gen-queries aedm --diffusion $(RUNS)/priors/mnist --oracle $(RUNS)/fmnist/victim.safetensors --mode probs \
	  --budget 50000 $(AEDM_CPU) --eval-data fashion-mnist -o $(RUNS)/fmnist/aedm $(call resume_if,$(RUNS)/fmnist/aedm)
	$(KD) kd-distill $(RUNS)/fmnist/aedm/queries.h5 --arch lenet5 $(AEDM_POST_TRAIN) \
	  --eval-data fashion-mnist -o $(RUNS)/fmnist/aedm/final.safetensors
	$(KD) kd-eval accuracy $(RUNS)/fmnist/aedm/final.safetensors --data fashion-mnist --reference $(RUNS)/fmnist/victim.safetensors

# The same attack as three processes in a closed loop through the file system: the generator steers
# against the substitute file and reloads it whenever kd-distill rewrites it (every batch).
mnist-aedm-loop: mnist-victim fmnist-prior
	mkdir -p $(RUNS)/mnist/aedm-loop && rm -f $(RUNS)/mnist/aedm-loop/q.h5
	# an untrained LeNet-5 to start from (--epochs 0: no image is learned from; fixed normalisation)
	$(KD) kd-distill --data digits --arch lenet5 --epochs 0 --normalize 0.5,0.5 -q -o $(RUNS)/mnist/aedm-loop/substitute.safetensors
	kd() { $(KD) "$$@"; }; set -o pipefail; \
	kd kd-gen-queries aedm --diffusion $(RUNS)/priors/fmnist --substitute $(RUNS)/mnist/aedm-loop/substitute.safetensors \
	    --follow -n 20000 --sampler-steps 4 --steer-steps 1 \
	  | kd kd-query $(RUNS)/mnist/victim.safetensors --mode probs --budget 20000 --log $(RUNS)/mnist/aedm-loop/q.h5 \
	  | kd kd-distill --init $(RUNS)/mnist/aedm-loop/substitute.safetensors --save-every 1 --replay-steps 2 --loss kl \
	      --optimizer adam --lr 1e-3 -o $(RUNS)/mnist/aedm-loop/substitute.safetensors
	$(KD) kd-distill $(RUNS)/mnist/aedm-loop/q.h5 --arch lenet5 $(AEDM_POST_TRAIN) \
	  --eval-data mnist -o $(RUNS)/mnist/aedm-loop/final.safetensors

# CIFAR-10 at the paper's scale (GPU, not run in CI): ResNet-34 victim (shared with cifar10-tandemgan), a
# prior trained on CIFAR-100 (public data with other classes; set AEDM_PRIOR to a diffusers directory or hub
# id, e.g. an ImageNet-32 UNet, to use another), VGG-16 substitute, 100 000 queries, 8 sampler and 5
# steering steps (the paper's), then 100 epochs on the saved queries with augmentation.
AEDM_PRIOR ?= $(RUNS)/priors/cifar100
cifar10-aedm: install
	mkdir -p $(RUNS)/cifar10
	test -f $(RUNS)/cifar10/victim.safetensors || $(KD) kd-distill --data cifar10 --arch resnet34 --epochs 100 \
	  --optimizer sgd --lr 0.1 --batch-size 128 --augment --hflip --eval-data cifar10 --device cuda \
	  -o $(RUNS)/cifar10/victim.safetensors
	test -e $(AEDM_PRIOR) || $(KD) kd-diffstep train --data cifar100 --image-size 32 --steps 1000 \
	  --unet-channels 64,128,256,256 --layers-per-block 2 --attention --iters 200000 --batch-size 128 --lr 2e-4 \
	  --device cuda -o $(AEDM_PRIOR)
	$(KD) kd-gen-queries aedm --diffusion $(AEDM_PRIOR) --oracle $(RUNS)/cifar10/victim.safetensors --mode probs \
	  --budget 100000 --substitute vgg16 --device cuda --eval-data cifar10 -o $(RUNS)/cifar10/aedm \
	  $(call resume_if,$(RUNS)/cifar10/aedm)
	$(KD) kd-distill $(RUNS)/cifar10/aedm/queries.h5 --arch vgg16 --epochs 100 --augment --hflip --optimizer sgd \
	  --lr 0.05 --device cuda --eval-data cifar10 -o $(RUNS)/cifar10/aedm/final.safetensors
	$(KD) kd-eval accuracy $(RUNS)/cifar10/aedm/final.safetensors --data cifar10 --reference $(RUNS)/cifar10/victim.safetensors
