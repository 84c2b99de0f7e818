# The two commands a newcomer types: `make demo` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export WANDB_MODE ?= offline

.PHONY: setup deepspeed-ops demo test test-fast lint bench clean-runs

setup: $(VENV)/.installed

# Exact versions from requirements.lock (torch 2.14.1 + torchvision 0.29.1: the +cpu torch
# wheel breaks torchvision's import), then the project itself in editable mode.
$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.lock
	$(PYTHON) -m pip install --quiet --no-deps -e .
	touch $@

data/digits/manifest.json: | setup
	$(PYTHON) -m app_dist.data.shards digits --out data/digits --samples-per-shard 25

# APP on scikit-learn's real 8x8 digits, 2 ranks (DDP over gloo on CPU), 4 megabatches;
# --standalone: a free port of its own, so two demos at once do not collide on 29500.
demo: setup data/digits/manifest.json
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 app_dist/train.py \
		--config configs/digits.yaml

# DeepSpeed compiles its CPU communication op (shm) the first time a DeepSpeed process starts
# (about 30 s on 2 cores, cached in ~/.cache/torch_extensions): compiled here, as part of the
# setup, rather than inside whichever test starts DeepSpeed first.
deepspeed-ops: setup
	$(PYTHON) -c "import deepspeed.ops; from deepspeed.accelerator import get_accelerator; \
	b = get_accelerator().create_op_builder('ShareMemCommBuilder'); \
	b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False) and b.load()"

# The whole suite on three pytest-xdist workers (tests/conftest.py says why), slowest 25 tests
# listed at the end (CI runs this through .ci/run).
test: lint deepspeed-ops
	$(VENV)/bin/pytest -n 3 --dist loadgroup --durations=25

# While editing: the linters and every test not marked slow (no trainer processes), about
# 2 minutes.
test-fast: lint
	$(VENV)/bin/pytest -m "not slow"

# The CPU benchmarks; end_to_end, data_pipeline and scaling need CIFAR-10 JPEGs (bench/common.py:
# APP_DIST_CIFAR_JPG, default /tmp/cifar10-jpg).
bench: setup
	$(PYTHON) bench/masking_overhead.py
	$(PYTHON) bench/end_to_end.py
	$(PYTHON) bench/data_pipeline.py
	$(PYTHON) bench/evaluation.py
	$(PYTHON) bench/sync_and_checkpoint.py
	$(PYTHON) bench/scaling.py
	$(PYTHON) bench/deepspeed_vs_ddp.py

lint: setup
	$(VENV)/bin/ruff check app_dist tests bench launch
	$(VENV)/bin/hadolint Dockerfile

clean-runs:
	rm -rf runs
