# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Each creates its virtualenv(s), installs torch (pinned here, not in install_requires) and the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradclip-installed
# the last transformers 4.x release: the integration tests also run against it
VENV_TF4 ?= .venv-tf4
TF4_SPEC ?= transformers==4.57.6
STAMP_TF4 := $(VENV_TF4)/.gradclip-installed
# Axolotl 0.19.0 (the last release for Python 3.11 with a CPU torch): its own lane and virtualenv (~4.4 GB)
VENV_AXOLOTL ?= .venv-axolotl
AXOLOTL_SPEC ?= axolotl==0.19.0
STAMP_AXOLOTL := $(VENV_AXOLOTL)/.gradclip-installed
# DeepSpeed 0.19.8 on the CPU torch: its own lane and virtualenv (tests/deepspeed, docs/distributed.md)
VENV_DEEPSPEED ?= .venv-deepspeed
DEEPSPEED_SPEC ?= deepspeed==0.19.8
STAMP_DEEPSPEED := $(VENV_DEEPSPEED)/.gradclip-installed
PIP_OPTS ?= --quiet

.PHONY: install test test-main test-tf4 test-package test-axolotl test-deepspeed demo clean

$(STAMP): setup.py setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_OPTS) --upgrade pip
	$(PY) -m pip install $(PIP_OPTS) "$(TORCH_SPEC)"
	$(PY) -m pip install $(PIP_OPTS) -e ".[test]"
	touch $(STAMP)

$(STAMP_TF4): setup.py setup.cfg
	$(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/python -m pip install $(PIP_OPTS) --upgrade pip
	$(VENV_TF4)/bin/python -m pip install $(PIP_OPTS) "$(TORCH_SPEC)"
	$(VENV_TF4)/bin/python -m pip install $(PIP_OPTS) -e ".[test]" "$(TF4_SPEC)"
	touch $(STAMP_TF4)

# a lane's own virtualenv: $(1) its folder, $(2) the package it tests against (torch pinned on every line, so
# pip never swaps the CPU wheel for a CUDA one)
define lane_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_OPTS) --upgrade pip
	$(1)/bin/python -m pip install $(PIP_OPTS) "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install $(PIP_OPTS) "$(TORCH_SPEC)" "$(2)"
	$(1)/bin/python -m pip install $(PIP_OPTS) "$(TORCH_SPEC)" -e ".[test]"
	touch $(1)/.gradclip-installed
endef

$(STAMP_AXOLOTL): setup.py setup.cfg
	$(call lane_venv,$(VENV_AXOLOTL),$(AXOLOTL_SPEC))

$(STAMP_DEEPSPEED): setup.py setup.cfg
	$(call lane_venv,$(VENV_DEEPSPEED),$(DEEPSPEED_SPEC))

install: $(STAMP)

# the whole suite on the newest transformers, then the Trainer integration and logging tests on 4.57, then the
# built package (sdist + wheel, twine check, the wheel used from a fresh virtualenv), then the Axolotl lane, then
# the DeepSpeed lane (about 2 minutes with its virtualenv built: docs/distributed.md)
test: test-main test-tf4 test-package test-axolotl test-deepspeed

test-main: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-tf4: $(STAMP_TF4)
	$(VENV_TF4)/bin/python -m pytest tests/integration tests/logging -p no:cacheprovider $(PYTEST_ARGS)

test-package: $(STAMP)
	$(PY) tools/check_package.py --torch "$(TORCH_SPEC)"

# real `axolotl train` runs with the plugin (tests/axolotl); its cost and whether `make test` runs it: docs/axolotl.md
test-axolotl: $(STAMP_AXOLOTL)
	$(VENV_AXOLOTL)/bin/python -m pytest tests/axolotl -p no:cacheprovider $(PYTEST_ARGS)

# real DeepSpeed ZeRO-2/ZeRO-3 engines on CPU through the Trainer (tests/deepspeed); cost: docs/distributed.md
test-deepspeed: $(STAMP_DEEPSPEED)
	DS_ACCELERATOR=cpu $(VENV_DEEPSPEED)/bin/python -m pytest tests/deepspeed -p no:cacheprovider $(PYTEST_ARGS)

demo: $(STAMP)
	WANDB_MODE=offline $(PY) -m gradclip_hf demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(VENV_TF4) $(VENV_AXOLOTL) $(VENV_DEEPSPEED) build *.egg-info .pytest_cache demo_output
