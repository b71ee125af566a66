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
# the DeepSpeed lane again on transformers 4.57 (the Trainer's DeepSpeed path differs by version): a virtualenv that
# sees the DeepSpeed lane's (torch, deepspeed, accelerate) and holds transformers 4.57 and what it needs on top
# (huggingface_hub < 1, so datasets 5.0.1: datasets 5.2 needs huggingface_hub 1.x)
VENV_DEEPSPEED_TF4 ?= .venv-deepspeed-tf4
TF4_DATASETS_SPEC ?= datasets==5.0.1
STAMP_DEEPSPEED_TF4 := $(VENV_DEEPSPEED_TF4)/.gradclip-installed
PIP_OPTS ?= --quiet

.PHONY: install test test-main test-tf4 test-package test-axolotl test-deepspeed test-deepspeed-tf4 demo gpu-check clean

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

# the DeepSpeed lane's site-packages added by a .pth file (its own .pth files processed: site.addsitedir), after
# this virtualenv's own, so what is installed here wins; nothing is downloaded but transformers 4.57 and its pins
PURELIB = -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"
$(STAMP_DEEPSPEED_TF4): $(STAMP_DEEPSPEED)
	$(VENV_DEEPSPEED)/bin/python -m venv $(VENV_DEEPSPEED_TF4)
	echo "import site; site.addsitedir('$$($(VENV_DEEPSPEED)/bin/python $(PURELIB))')" \
		> "$$($(VENV_DEEPSPEED_TF4)/bin/python $(PURELIB))/zz_deepspeed_lane.pth"
	$(VENV_DEEPSPEED_TF4)/bin/python -m pip install $(PIP_OPTS) "$(TORCH_SPEC)" "$(TF4_SPEC)" "$(TF4_DATASETS_SPEC)"
	ln -sf "$(abspath $(VENV_DEEPSPEED))/bin/wandb" $(VENV_DEEPSPEED_TF4)/bin/wandb
	touch $(STAMP_DEEPSPEED_TF4)

install: $(STAMP)

# the whole suite on the newest transformers, then the Trainer integration and logging tests on 4.57, then the
# built package (sdist + wheel, twine check, the wheel used from a fresh virtualenv), then the Axolotl lane, then
# the DeepSpeed lane, on transformers 5.x and again on 4.57 (their cost: docs/distributed.md)
test: test-main test-tf4 test-package test-axolotl test-deepspeed test-deepspeed-tf4

test-main: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-tf4: $(STAMP_TF4)
	$(VENV_TF4)/bin/python -m pytest tests/integration tests/logging -p no:cacheprovider $(PYTEST_ARGS)

test-package: $(STAMP)
	$(PY) tools/check_package.py --torch "$(TORCH_SPEC)"

# real `axolotl train` runs with the plugin (tests/axolotl); its cost and whether `make test` runs it: docs/axolotl.md
test-axolotl: $(STAMP_AXOLOTL)
	$(VENV_AXOLOTL)/bin/python -m pytest tests/axolotl -p no:cacheprovider $(PYTEST_ARGS)

# real DeepSpeed ZeRO-1/2/3 engines on CPU through the Trainer (tests/deepspeed); cost: docs/distributed.md
test-deepspeed: $(STAMP_DEEPSPEED)
	DS_ACCELERATOR=cpu $(VENV_DEEPSPEED)/bin/python -m pytest tests/deepspeed -p no:cacheprovider $(PYTEST_ARGS)

# the same tests on transformers 4.57.6 (install ~30 s on top of .venv-deepspeed, run ~3 min: docs/distributed.md)
test-deepspeed-tf4: $(STAMP_DEEPSPEED_TF4)
	DS_ACCELERATOR=cpu $(VENV_DEEPSPEED_TF4)/bin/python -m pytest tests/deepspeed -p no:cacheprovider $(PYTEST_ARGS)

demo: $(STAMP)
	WANDB_MODE=offline $(PY) -m gradclip_hf demo $(DEMO_ARGS)

# The GPU proof (benchmarks/gpu_check.py, benchmarks/README.md section 5), at most 8 minutes on one GPU. Where
# $(GPU_PYTHON) already has a torch that sees a GPU (and transformers, accelerate), it runs on that as it is:
# nothing is installed over a CUDA build. Elsewhere it runs on the .venv (torch pinned above); without a GPU the
# script says so and exits 2 (its CPU quick mode runs in `make test`: tests/test_gpu_check.py).
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	@if $(GPU_PYTHON) -c "import sys, torch, transformers, accelerate; sys.exit(not torch.cuda.is_available())" \
			>/dev/null 2>&1; then \
		echo "gpu-check: $(GPU_PYTHON) as installed (torch $$($(GPU_PYTHON) -c 'import torch; print(torch.__version__)'))"; \
		PYTHONUNBUFFERED=1 PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
			$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS); \
	else \
		$(MAKE) --no-print-directory $(STAMP) && PYTHONUNBUFFERED=1 $(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS); \
	fi

clean:
	rm -rf $(VENV) $(VENV_TF4) $(VENV_AXOLOTL) $(VENV_DEEPSPEED) $(VENV_DEEPSPEED_TF4) build *.egg-info .pytest_cache demo_output
