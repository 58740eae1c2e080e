# Two commands do all set-up on a fresh machine:
#   make demo   - build the tiny offline models and run the whole pipeline end to end into outputs/demo/
#   make test   - run the test suite
# Both create .venv on first use. torch==2.13.0 (CPU wheel) is installed only when the venv has no
# torch: with `make VENV_FLAGS=--system-site-packages`, a machine's own (GPU) torch is kept.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := outputs/demo
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean-demo clean help bench

help:
	@echo "make demo   - run the pipeline end to end on the embedded tiny models (outputs/demo/)"
	@echo "make test   - run the tests"
	@echo "make bench  - run the benchmarks (prints tables, writes benchmarks/results/*.json)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[all,test]"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# ---- demo: each stage is a real command a user would run; each is skipped when its output exists ----
demo: $(STAMP)
	$(PY) -m encoders.tiny --out $(DEMO)/models
	$(PY) -m inference.demo_report --demo $(DEMO) --stage base

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf $(VENV) *.egg-info
