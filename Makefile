# `make test` and `make demo` build .venv with Python 3.12 when it is missing.
# Override the interpreter with `make test PYTHON=/path/to/python3.12`.

SHELL := /bin/bash
VENV := .venv
VENV_PY := $(VENV)/bin/python

# First Python 3.12 that actually runs: PATH, then pyenv, then common prefixes.
# (A pyenv shim can be on PATH and still refuse to run, so every candidate is executed.)
ifneq ($(origin PYTHON),command line)
PYTHON := $(shell for c in python3.12 \
	"$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
	/usr/local/bin/python3.12 /usr/bin/python3.12 /opt/homebrew/bin/python3.12; do \
	  if "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then \
	    command -v "$$c" || echo "$$c"; break; fi; done)
endif

.PHONY: venv test lint format demo train-parity bench clean

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python 3.12 found; pass PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@if [ ! -x $(VENV_PY) ]; then echo "creating $(VENV) with $(PYTHON)"; "$(PYTHON)" -m venv $(VENV); fi
	$(VENV_PY) -m pip install -q --upgrade pip
	$(VENV_PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(VENV_PY) -m pip install -q --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two pytest workers, whole files per worker (module fixtures train once): most tests are
# single-threaded compiles, so on a 2-core machine the suite takes about 10 instead of 15 min.
test: lint
	$(VENV_PY) -m pytest tests -n 2 --dist loadfile --durations=20

demo: venv
	$(VENV_PY) -m launch.demo --config=configs/ctm_maze.py:cpu --workdir=runs/maze_demo

bench: venv
	$(VENV_PY) -m bench.ctm_step

clean:
	rm -rf $(VENV) $(TORCH_VENV) $(TPU_VENV) build runs

# ---- Reference outputs from stock PyTorch/transformers (second environment) ----
# `make torch-reference` builds .venv-torch with Python 3.11 (the Python the pinned torch wheel
# is used with here) and regenerates build/torch_reference/, which the main suite prefers over the
# committed copies in tests/fixtures/hf_qwen2/. Override with `make torch-reference TORCH_PYTHON=...`.
# torch comes from the official CPU wheel index (the CUDA build PyPI serves on Linux is several
# GB). Where that index is out of reach but pip is configured with a local CPU wheel (find-links
# in pip.conf or PIP_FIND_LINKS), pass an empty value: `make torch-reference TORCH_INDEX_URL=`.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_VENV := .venv-torch
TORCH_VENV_PY := $(TORCH_VENV)/bin/python
TORCH_REFERENCE_DIR := build/torch_reference
# Same probing as for PYTHON above, for 3.11, unless TORCH_PYTHON comes from the command line or
# the environment; `=` (not `:=`) so other targets don't pay for it.
ifeq ($(filter command line environment,$(origin TORCH_PYTHON)),)
TORCH_PYTHON = $(shell for c in python3.11 \
	"$$(pyenv root 2>/dev/null)"/versions/3.11*/bin/python3.11 \
	/usr/local/bin/python3.11 /usr/bin/python3.11 /opt/homebrew/bin/python3.11; do \
	  if "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then \
	    command -v "$$c" || echo "$$c"; break; fi; done)
endif

.PHONY: torch-reference

$(TORCH_VENV)/.installed: tools/torch_reference/requirements.txt
	@py="$(TORCH_PYTHON)"; if [ -z "$$py" ]; then echo "error: no Python 3.11 found; pass TORCH_PYTHON=/path/to/python3.11" >&2; exit 1; fi; \
	if [ ! -x $(TORCH_VENV_PY) ]; then echo "creating $(TORCH_VENV) with $$py"; "$$py" -m venv $(TORCH_VENV); fi
	$(TORCH_VENV_PY) -m pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) \
		-r tools/torch_reference/requirements.txt
	@touch $@

torch-reference: $(TORCH_VENV)/.installed
	$(TORCH_VENV_PY) tools/torch_reference/make_qwen2_reference.py --out $(TORCH_REFERENCE_DIR)
	$(TORCH_VENV_PY) tools/torch_reference/make_ctm_checkpoint.py --out $(TORCH_REFERENCE_DIR)/ctm_pt

# ---- TPU compiler for ahead-of-time checks on a CPU host (second environment) ----
# `make tpu-venv` builds .venv-tpu: requirements.txt plus jax[tpu] at the pinned jax version, which
# brings libtpu (about 0.5 GB). Then `.venv-tpu/bin/python -m launch.compile --topology=v5e:2x2
# --config=...` compiles the train step with the real TPU compiler, no TPU needed. Not part of
# `make test` (tests/test_aot_compile.py uses it when it exists); kept out of .venv, where libtpu
# would make JAX look for TPU chips at start-up.
TPU_VENV := .venv-tpu
TPU_VENV_PY := $(TPU_VENV)/bin/python
JAX_VERSION = $(shell sed -n 's/^jax==//p' requirements.txt)

.PHONY: tpu-venv

$(TPU_VENV)/.installed: requirements.txt requirements-tpu.txt
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python 3.12 found; pass PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@if [ -z "$(JAX_VERSION)" ]; then echo "error: requirements.txt has no jax==VERSION pin" >&2; exit 1; fi
	@if [ ! -x $(TPU_VENV_PY) ]; then echo "creating $(TPU_VENV) with $(PYTHON)"; "$(PYTHON)" -m venv $(TPU_VENV); fi
	$(TPU_VENV_PY) -m pip install -q --upgrade pip
	$(TPU_VENV_PY) -m pip install -q -r requirements.txt -r requirements-tpu.txt "jax[tpu]==$(JAX_VERSION)"
	@touch $@

tpu-venv: $(TPU_VENV)/.installed
