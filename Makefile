# Two commands on a fresh machine: `make run` and `make test`. Both create the virtual
# environment and install flashtrain into it when it is missing or out of date.
# Two jobs at once: on a fresh machine `make test` installs the virtual environment and
# Chromium side by side (both mostly wait on downloads), then runs the tests.
MAKEFLAGS += -j2
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flashtrain-installed
ARGS ?=

.PHONY: install run test test-unit test-integration test-gpu gpu-check lint clean

# tools/install_venv.py installs with uv from the package sources pip is configured with
# (pip where uv cannot be had): 63 to 94 s here, where pip took 2.5 to 3 minutes.
$(STAMP): pyproject.toml tools/install_venv.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) tools/install_venv.py
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m flashtrain.jobs.imagenet $(ARGS)

# The report test opens report.html in Debian's headless Chromium: installed here when
# it is missing (CI's machine is fresh; apt-get needs root, as CI has). Where it cannot be
# installed, the tests go on and that one test says it was skipped and why.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium) \
		|| echo "make: could not install chromium; the browser test of report.html will be skipped"

# One pytest run over the three tiers (unit, integration, gpu): one closing line that
# counts everything; without CUDA the gpu tier is reported as skipped. The 25 slowest
# tests are listed before it, so a CI log shows where the suite's time goes. Two
# pytest-xdist workers, a file's tests on one of them (tests/conftest.py gives each
# worker a Ray temp folder of its own): about a quarter less time on two cores. Files
# go out in the order tests/conftest.py sorts them, the longest first, so that the two
# workers end together (--no-loadscope-reorder keeps xdist from sorting by test count).
test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -rs --durations=25 -n 2 --dist loadfile --no-loadscope-reorder tests/unit tests/integration tests/gpu

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q tests/integration

test-gpu: $(STAMP)
	$(PY) -m pytest -q -rs tests/gpu

# For a person holding a GPU machine for ten minutes: environment, GPU tier, AMP, the two
# GPU benchmarks shortened, one closing table (flashtrain/gpu_check.py). Without a GPU every
# GPU part reports "no GPU".
gpu-check: $(STAMP)
	$(PY) -m flashtrain.gpu_check $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check flashtrain tests tools

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
