# make demo: create .venv, install the project, rewrite a built-in model and print the result.
# make test: create or reuse .venv and run the test suite (CPU; Triton kernels run interpreted),
# without the cases marked slow; make test-slow runs those (CI runs both).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0: where pip's find-links hold the CPU build (this team's machines) that is what it
# installs; elsewhere pip downloads the release. Triton is for its CPU interpreter in the tests.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rewrite demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

benchmark: $(STAMP)
	$(PY) benchmarks/approx_bp.py
	$(PY) benchmarks/codegen.py
	$(PY) benchmarks/remat.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
