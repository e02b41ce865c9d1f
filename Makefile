# Two commands a fresh machine needs (README): `make demo` and `make test`.
# Both create .venv/ with pinned versions on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
TF4    := .venv-tf4
STAMP  := $(VENV)/.stamp

.PHONY: install test test-core test-tf4 demo bench clean

$(STAMP): requirements.txt requirements-test.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements-test.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# transformers 4.57 beside the main environment: only its own packages, first on
# PYTHONPATH, reusing the venv's torch.
$(TF4)/.stamp: requirements-tf4.txt $(STAMP)
	rm -rf $(TF4)
	$(PIP) install --no-deps --target $(TF4) -r requirements-tf4.txt
	touch $@

install: $(STAMP)

test: test-core test-tf4

test-core: $(STAMP)
	$(PY) -m pytest tests

# Everything that drives a transformers model, again on transformers 4.57.
TF4_TESTS := tests/integration tests/test_sweep_run.py tests/test_refine_equivalence.py tests/test_refine_sweep.py \
             tests/test_llava_checkpoint.py tests/test_refine_decoding.py tests/test_profiles.py

test-tf4: $(TF4)/.stamp
	PYTHONPATH=$(CURDIR)/$(TF4) $(PY) -m pytest $(TF4_TESTS) -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m vgkernels

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(TF4) build *.egg-info .pytest_cache .benchmarks
