# <dataset>-<method> recipes. Each chains kd- commands; outputs go under runs/<dataset>/ (digits-steal: demo-out/).
# A victim is trained once: its recipe skips when the file exists (delete it to train again), so an interrupted
# attack recipe can be rerun and resume against the very same victim (its query log refuses any other).
RECIPES += digits-steal mnist-victim fmnist-victim mnist-steal
RUNS ?= runs
KD := PATH="$(abspath $(VENV))/bin:$$PATH"

.PHONY: $(RECIPES)

digits-steal: install
	bash recipes/demo.sh

# Victims for the black-box issues: LeNet-5 on MNIST / Fashion-MNIST from $$KD_DATA/vision.
mnist-victim: install
	mkdir -p $(RUNS)/mnist
	test -f $(RUNS)/mnist/victim.safetensors || $(KD) kd-distill --data mnist --arch lenet5 --epochs 10 --optimizer adam --lr 0.001 --batch-size 128 \
	  --eval-data mnist -o $(RUNS)/mnist/victim.safetensors

fmnist-victim: install
	mkdir -p $(RUNS)/fmnist
	test -f $(RUNS)/fmnist/victim.safetensors || $(KD) kd-distill --data fashion-mnist --arch lenet5 --epochs 20 --optimizer adam --lr 0.001 --batch-size 128 \
	  --eval-data fashion-mnist -o $(RUNS)/fmnist/victim.safetensors

# The design's first pipeline: an MNIST victim stolen with Fashion-MNIST images as queries.
mnist-steal: mnist-victim
	kd() { $(KD) "$$@"; }; \
	rm -f $(RUNS)/mnist/queries.h5; \
	kd kd-gen-queries dataset --data fashion-mnist -n 20000 \
	  | kd kd-query $(RUNS)/mnist/victim.safetensors --mode label --budget 20000 --log $(RUNS)/mnist/queries.h5 \
	  | kd kd-distill --arch lenet5-half --epochs 20 --optimizer adam --lr 0.002 -o $(RUNS)/mnist/student.safetensors; \
	kd kd-eval accuracy $(RUNS)/mnist/student.safetensors --data mnist --reference $(RUNS)/mnist/victim.safetensors
