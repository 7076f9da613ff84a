# CAKE (white-box, data-free mimicry): a LeNet-5-half learns the MNIST / Fashion-MNIST victim of recipes.mk from
# samples synthesised against its gradients, no training image (the settings of benchmarks/cake.py: the authors'
# sampling defaults, 256 sets of 100; the student on the benchmarks' post-training settings). CPU: ~30 min each.
# A rerun answers the same queries (fixed --seed) from the log instead of asking the victim again; --budget caps
# what the victim is ever asked at the 25 600 queries synthesised.
CAKE_RECIPES := mnist-cake fmnist-cake
RECIPES += $(CAKE_RECIPES)
.PHONY: $(CAKE_RECIPES)

mnist-cake: mnist-victim
	kd() { $(KD) "$$@"; }; set -eo pipefail; mkdir -p $(RUNS)/mnist/cake; \
	kd kd-gen-queries cake --teacher $(RUNS)/mnist/victim.safetensors -n 25600 --pixel-mean 0.1307 --pixel-std 0.3081 \
	  | kd kd-query $(RUNS)/mnist/victim.safetensors --mode probs --budget 25600 --log $(RUNS)/mnist/cake/queries.h5 \
	  | kd kd-distill --arch lenet5-half $(POST_TRAIN) -o $(RUNS)/mnist/cake/student.safetensors; \
	kd kd-eval accuracy $(RUNS)/mnist/cake/student.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors

fmnist-cake: fmnist-victim
	kd() { $(KD) "$$@"; }; set -eo pipefail; mkdir -p $(RUNS)/fmnist/cake; \
	kd kd-gen-queries cake --teacher $(RUNS)/fmnist/victim.safetensors -n 25600 --pixel-mean 0.2860 --pixel-std 0.3530 \
	  | kd kd-query $(RUNS)/fmnist/victim.safetensors --mode probs --budget 25600 --log $(RUNS)/fmnist/cake/queries.h5 \
	  | kd kd-distill --arch lenet5-half $(POST_TRAIN) -o $(RUNS)/fmnist/cake/student.safetensors; \
	kd kd-eval accuracy $(RUNS)/fmnist/cake/student.safetensors --data fashion-mnist --reference $(RUNS)/fmnist/victim.safetensors
