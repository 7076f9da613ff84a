# Data-free extraction recipes (issue #4): TandemGAN, IDEAL and DFME against the LeNet-5 victims of
# recipes.mk. Included from the Makefile after recipes.mk. Outputs go to $(RUNS)/<dataset>/<method>/;
# rerunning a recipe whose attack was interrupted continues it (--resume: nothing is paid twice).
# The attacks never see a training image; --eval-data only measures the substitute on the test split.
EXTRACTION_RECIPES := mnist-tandemgan fmnist-tandemgan mnist-ideal fmnist-ideal mnist-dfme cifar10-tandemgan
RECIPES += $(EXTRACTION_RECIPES)
.PHONY: $(EXTRACTION_RECIPES)

# Generator output mapping clamp(mean + std x h): the data sets' public normalisation constants, which the
# reference implementations use implicitly by feeding normalised generator output to their victims.
MNIST_PIXELS := --pixel-mean 0.1307 --pixel-std 0.3081
FMNIST_PIXELS := --pixel-mean 0.2860 --pixel-std 0.3530
# continue an interrupted attack in DIR instead of refusing to overwrite it
resume_if = $(if $(wildcard $(1)/state.pt $(1)/queries.h5),--resume)
# post-training: a fresh substitute trained on the attack's own query log, no further query (the settings of
# benchmarks/extraction.py --post-train; no augmentation, it changes the answers of boundary queries)
POST_TRAIN := --epochs 30 --optimizer adam --lr 1e-3 --batch-size 128
# TandemGAN and DFME with the settings of benchmarks/extraction.py (METHOD_ARGS; why: its comments): the
# substitute on Adam 1e-3 (a LeNet-5 has no batch norm), TandemGAN's generator learning rates 10x the paper's
TANDEM_ARGS := --lr-gx 1e-4 --lr-ge 1e-5 --s-optimizer adam --replay-steps 30 --s-loss kl --augment \
  --final-epochs 5 --final-optimizer adam --final-lr 1e-3
DFME_ARGS := --s-optimizer adam --lr-s 1e-3

# MNIST, hard labels, 25 000 queries (IDEAL's setting), the settings of benchmarks/extraction.py;
# CPU: ~45 min. The post-trained substitute is the better one (docs/extraction-benchmarks.md).
mnist-ideal: mnist-victim
	$(KD) kd-gen-queries ideal --oracle $(RUNS)/mnist/victim.safetensors --mode label --budget 25000 \
	  --substitute lenet5 $(MNIST_PIXELS) --g-steps 5 --s-optimizer adam --lr-s 0.001 --pool-epochs 2 --balance-pool \
	  --augment --final-epochs 20 --eval-data mnist -o $(RUNS)/mnist/ideal $(call resume_if,$(RUNS)/mnist/ideal)
	$(KD) kd-distill $(RUNS)/mnist/ideal/queries.h5 --arch lenet5 $(POST_TRAIN) -o $(RUNS)/mnist/ideal/post-trained.safetensors
	$(KD) kd-eval accuracy $(RUNS)/mnist/ideal/substitute.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors
	$(KD) kd-eval accuracy $(RUNS)/mnist/ideal/post-trained.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors

# Fashion-MNIST, hard labels, 100 000 queries (IDEAL's setting), with kdtools' uncertainty sampling: each
# query the least certain of 4 generated candidates (--select-from 4), and 10 generator steps per epoch
# (IDEAL's E_G for CIFAR-10; 5 for MNIST); then a fresh LeNet-5 twice as wide,
# trained on the log with class-balanced epochs. CPU: ~20 min attack + 22-50 min post-training
# (docs/extraction-benchmarks.md, session 22).
fmnist-ideal: fmnist-victim
	$(KD) kd-gen-queries ideal --oracle $(RUNS)/fmnist/victim.safetensors --mode label --budget 100000 \
	  --substitute lenet5 $(FMNIST_PIXELS) --g-steps 10 --s-optimizer adam --lr-s 0.001 --pool-epochs 1 --pool-steps 40 \
	  --balance-pool --select-from 4 --eval-data fashion-mnist -o $(RUNS)/fmnist/ideal $(call resume_if,$(RUNS)/fmnist/ideal)
	$(KD) kd-distill $(RUNS)/fmnist/ideal/queries.h5 --arch lenet5 --arch-args '{"width": 2}' --class-balance 0.5 \
	  --epochs 60 --optimizer adam --lr 1e-3 --batch-size 128 -o $(RUNS)/fmnist/ideal/post-trained.safetensors
	$(KD) kd-eval accuracy $(RUNS)/fmnist/ideal/substitute.safetensors --data fashion-mnist --reference $(RUNS)/fmnist/victim.safetensors
	$(KD) kd-eval accuracy $(RUNS)/fmnist/ideal/post-trained.safetensors --data fashion-mnist --reference $(RUNS)/fmnist/victim.safetensors --per-class

# MNIST, DFME baseline in probability mode, 200 000 queries, CPU: ~1 h (+ post-training ~40 min)
mnist-dfme: mnist-victim
	$(KD) kd-gen-queries dfme --oracle $(RUNS)/mnist/victim.safetensors --mode probs --budget 200000 \
	  --substitute lenet5 $(MNIST_PIXELS) $(DFME_ARGS) \
	  --eval-data mnist -o $(RUNS)/mnist/dfme $(call resume_if,$(RUNS)/mnist/dfme)
	$(KD) kd-distill $(RUNS)/mnist/dfme/queries.h5 --arch lenet5 $(POST_TRAIN) -o $(RUNS)/mnist/dfme/post-trained.safetensors
	$(KD) kd-eval accuracy $(RUNS)/mnist/dfme/substitute.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors
	$(KD) kd-eval accuracy $(RUNS)/mnist/dfme/post-trained.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors

# MNIST, TandemGAN in probability mode, 200 000 queries, CPU: ~1 h (+ post-training ~40 min)
mnist-tandemgan: mnist-victim
	$(KD) kd-gen-queries tandemgan --oracle $(RUNS)/mnist/victim.safetensors --mode probs --budget 200000 \
	  --substitute lenet5 $(MNIST_PIXELS) $(TANDEM_ARGS) \
	  --eval-data mnist -o $(RUNS)/mnist/tandemgan $(call resume_if,$(RUNS)/mnist/tandemgan)
	$(KD) kd-distill $(RUNS)/mnist/tandemgan/queries.h5 --arch lenet5 $(POST_TRAIN) -o $(RUNS)/mnist/tandemgan/post-trained.safetensors
	$(KD) kd-eval accuracy $(RUNS)/mnist/tandemgan/substitute.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors
	$(KD) kd-eval accuracy $(RUNS)/mnist/tandemgan/post-trained.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors

# Fashion-MNIST, TandemGAN in probability mode, 1 000 000 queries, CPU: several hours
fmnist-tandemgan: fmnist-victim
	$(KD) kd-gen-queries tandemgan --oracle $(RUNS)/fmnist/victim.safetensors --mode probs --budget 1000000 \
	  --substitute lenet5 $(FMNIST_PIXELS) $(TANDEM_ARGS) \
	  --eval-data fashion-mnist -o $(RUNS)/fmnist/tandemgan $(call resume_if,$(RUNS)/fmnist/tandemgan)
	$(KD) kd-eval accuracy $(RUNS)/fmnist/tandemgan/substitute.safetensors --data fashion-mnist --reference $(RUNS)/fmnist/victim.safetensors

# CIFAR-10 at the paper's scale: ResNet-34 victim, VGG-11 substitute, probability mode, 20 M queries.
# GPU only (hours on one GPU; not run in CI). Generator: DFME body as Gx, Conv(64->3)+BN+tanh as Ge.
cifar10-tandemgan: install
	mkdir -p $(RUNS)/cifar10
	test -f $(RUNS)/cifar10/victim.safetensors || $(KD) kd-distill --data cifar10 --arch resnet34 --epochs 100 \
	  --optimizer sgd --lr 0.1 --batch-size 128 --augment --hflip --eval-data cifar10 --device cuda \
	  -o $(RUNS)/cifar10/victim.safetensors
	$(KD) kd-gen-queries tandemgan --oracle $(RUNS)/cifar10/victim.safetensors --mode probs --budget 20000000 \
	  --substitute vgg11 --s-loss kl --replay-steps 5 --device cuda \
	  --eval-data cifar10 -o $(RUNS)/cifar10/tandemgan $(call resume_if,$(RUNS)/cifar10/tandemgan)
	$(KD) kd-eval accuracy $(RUNS)/cifar10/tandemgan/substitute.safetensors --data cifar10 --reference $(RUNS)/cifar10/victim.safetensors
