# Quick start: `make demo` (set up + 2-process demo training), then `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
NPROC   ?= 2
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
# DeepSpeed JIT-builds CPU ops once per machine; keep them with the venv so CI reuses them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test test-fast lint bench validate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py data_pipeline/encode_kernels.c requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch alone and first: the CPU build on machines without a GPU, never an accidental CUDA pull.
	$(PY) -m pip install -q "torch==$$(grep -E '^torch==' requirements.lock | cut -d= -f3)"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/manytask data prepare demo
	$(VENV)/bin/manytask launch --nproc $(NPROC) configs/demo.yaml

test: setup
	MANYTASK_REQUIRE_COMPILED_KERNELS=1 $(PY) -m pytest -q tests

# The quick loop while editing: unit tests only, no real processes or training runs (~1/4 of the time).
test-fast: setup
	MANYTASK_REQUIRE_COMPILED_KERNELS=1 $(PY) -m pytest -q -m "not processes" tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench.run_all

validate: setup
	$(PY) -m bench.validate

clean:
	rm -rf runs data .pytest_cache
