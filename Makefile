# Two commands set a fresh machine up: `make run` (shim + both reference backends) and
# `make test` (the whole suite). Everything else builds on the same venv.
#   make run CONFIG=path/to/shim.toml   another config (ports, weights, ...); or
#                                       MMSHIM_CONFIG=path/to/shim.toml make run
#   make venv EXTRAS=test,hf            also torch + transformers (real HF models; large)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# No torch by default: the default n-gram models need none. `hf` is opt-in (see README).
EXTRAS ?= test
CONFIG ?= $(or $(MMSHIM_CONFIG),config/shim.toml)
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
MODELS := models/tiny.ngram models/base.ngram

.PHONY: venv models test test-fast lint run demo rollout-demo bench clean soak instr

venv: $(STAMP)

# setup.py and shim/_core.pyx: the compiled data plane is rebuilt by the same install.
$(STAMP): pyproject.toml setup.py shim/_core.pyx
	@test -x $(PY) || { echo "make: creating the virtualenv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing mmshim and its [$(EXTRAS)] extras into $(VENV) (first run, or pyproject.toml changed)"
	$(PY) -m pip install --progress-bar on -e '.[$(EXTRAS)]'
	@touch $@

models: $(MODELS)

$(MODELS) &: $(STAMP) backends/loaders/ngram.py backends/build_models.py
	@echo "make: building the n-gram models in models/"
	$(PY) -m backends.build_models --out models

test: venv models
	$(PY) -m pytest -q

test-fast: venv models
	$(PY) -m pytest -q -x -m "not slow"

# Ownership soak: randomized faults (sweeps, SIGSTOP, SIGKILL, rollbacks) against the
# reference backends for SOAK_S seconds (default 5 minutes); `make test` runs it for 25 s.
SOAK_S ?= 300
soak: venv models
	MMSHIM_SOAK_S=$(SOAK_S) $(PY) -m pytest -q -s tests/reliability/test_ownership_soak.py

lint: venv
	$(PY) -m ruff check shim backends tests bench
	$(PY) -m mypy shim backends

run: venv models
	@echo "make: venv and models ready; starting the stack from $(CONFIG) (make run CONFIG=... for another)"
	$(VENV)/bin/mmshim stack --config $(CONFIG)

demo: venv
	$(VENV)/bin/mmshim demo --config $(CONFIG)

# A whole rollout plan, MMA -> MMS, on `make run`'s stack with demo traffic (a few
# minutes; stop `make run` first: it uses the same ports).
rollout-demo: venv models
	$(PY) -m shim.rollout.demo --config config/shim.toml --plan config/rollouts/demo.toml

# The benchmarks need no torch: on a fresh clone they install only the test extras.
bench:
	$(MAKE) venv models EXTRAS=test
	$(PY) -m bench

# Instructions per request under callgrind (bench/instr.py): zmq.proxy, the shim with the
# compiled core and without; needs valgrind, takes a few minutes; not part of test or bench.
instr:
	$(MAKE) venv EXTRAS=test
	$(PY) -m bench.instr $(INSTR_ARGS)

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
