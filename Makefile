# Each target sets up .venv idempotently (re-installing only when pyproject.toml changes) and runs.
# torch is pinned first: a bare `torch` requirement can pull a multi-GB CUDA build. Override with
#   make test TORCH_SPEC="torch==2.14.1"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
MINUTES ?= 4

.PHONY: quickstart test notebooks lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extra, invalidated by pyproject.toml or a different TORCH_SPEC.
$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$*]"
	@echo "$(TORCH_SPEC)" > $@

$(VENV)/.stamp-base: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	@echo "$(TORCH_SPEC)" > $@

quickstart: $(VENV)/.stamp-base
	$(VENV)/bin/llmscratch quickstart --out runs/quickstart --minutes $(MINUTES) --overwrite

test: $(VENV)/.stamp-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Every chapter notebook, top to bottom on a fresh kernel; fails on the first error (notebooks/execute.py).
notebooks: $(VENV)/.stamp-notebooks
	HF_HUB_OFFLINE=1 $(PY) notebooks/execute.py

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests benchmarks

# The book's package declares tensorflow, jupyterlab and pandas; its GPTModel needs only torch.
bench: $(VENV)/.stamp-bench
	$(PY) -m pip install --quiet --no-deps "llms-from-scratch==1.0.19"
	$(PY) benchmarks/bpe_train.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
