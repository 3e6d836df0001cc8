# The two commands: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(HOME)/.cache/cellray-data
FETCH := ../shared/data/fetch_real.sh
DEMO_STORE ?= data/demo.store
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: env test lint demo bench peers clean gpu-check

# A venv whose editable install points at another checkout (this one moved or copied) is pointed back here.
env: $(VENV)/.installed
	@(cd / && $(abspath $(BIN))/python -c "import importlib.util as u, os, sys; s = u.find_spec('jobs'); \
	  sys.exit(s is None or not os.path.realpath(s.origin).startswith(os.path.realpath('$(CURDIR)') + os.sep))" \
	  2>/dev/null) || \
	  { echo "$(VENV): cellray was installed from another checkout; installing this one"; \
	    $(BIN)/pip install -q --no-deps -e .; }

# torch first, so the project's `torch>=...` is already met and pip pulls no other build:
# a CPU-only machine gets the CPU wheel (from the local wheel cache, else PyTorch's CPU index);
# a machine with an NVIDIA driver gets the default (CUDA) wheel from PyPI.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q "torch==2.13.0+cpu" 2>/dev/null || \
	     $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

# ruff first: a style or import error fails fast, before the suite
test: env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check engine

# annbatch needs Python >= 3.12 (cellray runs on 3.10+): the peers get their own venv, used by bench/ only.
peers: $(VENV)-peers/.installed
$(VENV)-peers/.installed:
	@py=""; for c in python3.13 python3.12 $$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python 2>/dev/null); do \
	   if $$c -c "import sys; assert sys.version_info >= (3, 12)" 2>/dev/null; then py=$$c; break; fi; done; \
	 test -n "$$py" || { echo "make peers: no Python >= 3.12 found (annbatch needs it)"; exit 1; }; \
	 $$py -m venv $(VENV)-peers
	$(VENV)-peers/bin/pip install -q annbatch zarrs psutil s3fs obstore  # s3fs/obstore: the peers on a bucket
	touch $@

demo: env
	@mkdir -p data
	@if [ -x $(FETCH) ] || [ -f $(FETCH) ]; then bash $(FETCH) $(DATA); \
	 else $(BIN)/cellray synth --out $(DATA)/synthetic.h5ad; fi
	@inputs=$$(ls $(DATA)/kang_ctrl.h5ad $(DATA)/kang_stim.h5ad 2>/dev/null || ls $(DATA)/synthetic.h5ad); \
	 $(BIN)/cellray ingest $$inputs --out $(DEMO_STORE) --shard-size 4000 --overwrite
	$(BIN)/cellray verify $(DEMO_STORE)
	$(BIN)/cellray info $(DEMO_STORE)
	$(BIN)/cellray stats $(DEMO_STORE) --hvg 1000
	@rm -rf runs/vae-demo  # a fresh run: the store was just re-ingested (a rerun of a spec otherwise resumes)
	$(BIN)/cellray run jobs/pretrain_vae.yaml
	$(BIN)/cellray embed --checkpoint runs/vae-demo --store $(DEMO_STORE) --out runs/vae-demo/embeddings.h5ad \
	  --workers 2 --label-key dataset --overwrite  # 2 inference actors; one committed part per shard
	@echo "demo done: embeddings runs/vae-demo/embeddings.h5ad (obsm['X_cellray']), loss curve runs/vae-demo/loss.png," \
	  "metrics runs/vae-demo/metrics.jsonl"

# On a machine with an NVIDIA GPU: the CUDA tests (skipped elsewhere) and the GPU training figures (data-wait goal)
gpu-check: env
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA GPU')"
	$(BIN)/python -m pytest -q -rs tests/engine/train/test_gpu.py
	$(BIN)/python bench/train.py --models vae,transformer

clean:
	rm -rf data runs bench/out
