# Two commands a fresh machine needs (README): `make demo` and `make test`.
# Both create .venv/ with pinned versions on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
TF4    := .venv-tf4
TF524  := .venv-tf524
STAMP  := $(VENV)/.stamp

.PHONY: install test test-core test-tf4 test-tf524 test-peer demo bench clean

$(STAMP): requirements.txt requirements-test.txt requirements-peer.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements-test.txt -r requirements-peer.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# transformers 4.57 beside the main environment: only its own packages, first on
# PYTHONPATH, reusing the venv's torch.
$(TF4)/.stamp: requirements-tf4.txt $(STAMP)
	rm -rf $(TF4)
	$(PIP) install --no-deps --target $(TF4) -r requirements-tf4.txt
	touch $@

# transformers 5.24 (the newest; passes the KV cache as `cache=`), the same way.
$(TF524)/.stamp: requirements-tf5-latest.txt $(STAMP)
	rm -rf $(TF524)
	$(PIP) install --no-deps --target $(TF524) -r requirements-tf5-latest.txt
	touch $@

install: $(STAMP) $(TF4)/.stamp $(TF524)/.stamp

test: test-core test-tf4 test-tf524 test-peer

test-core: $(STAMP)
	$(PY) -m pytest tests

# Everything that drives a transformers model, again on transformers 4.57 and 5.24
# (test-core runs it on the pinned 5.23).
TF4_TESTS := tests/integration tests/test_sweep_run.py tests/test_refine_equivalence.py tests/test_refine_sweep.py \
             tests/test_tiny_grounded.py tests/test_device_map.py tests/test_llava_checkpoint.py \
             tests/test_refine_decoding.py tests/test_profiles.py tests/peer/test_vgpatch_plugin.py

test-tf4: $(TF4)/.stamp
	PYTHONPATH=$(CURDIR)/$(TF4) $(PY) -m pytest $(TF4_TESTS) -p no:cacheprovider

test-tf524: $(TF524)/.stamp
	PYTHONPATH=$(CURDIR)/$(TF524) $(PY) -m pytest $(TF4_TESTS) -p no:cacheprovider

# transformers' own LLaVA and Qwen2-VL model tests (../shared/peer/transformers) on 5.24,
# unpatched and then with patch_model(capture="all") on every model they build
# (tests/peer/vgpatch_plugin.py); fails if a test that passed unpatched does not pass
# patched, or if vgkernels never ran. Results and logs: build/peer/.
test-peer: $(TF524)/.stamp
	$(PY) tests/peer/run.py --tf $(TF524)

demo: $(STAMP)
	$(PY) -m vgkernels

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(TF4) $(TF524) build *.egg-info .pytest_cache .benchmarks

# Everything a lent GPU should run, in at most 9 minutes, into at most 8 files in $(OUT)
# (bench/gpu_check.py). Uses the machine's own python3 (its CUDA torch) when there is no
# .venv; without a GPU every GPU stage is skipped with its reason.
OUT ?= out/gpu-check
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)

.PHONY: gpu-check
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) bench/gpu_check.py $(OUT)
