# Two commands set a fresh machine up: `make run` (shim + both reference backends on
# loopback) and `make test` (the whole suite). Everything else builds on the same venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= test,hf
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
MODELS := models/tiny.ngram models/base.ngram

.PHONY: venv models test test-fast lint run demo bench clean soak

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

models: $(MODELS)

$(MODELS) &: $(STAMP) backends/loaders/ngram.py backends/build_models.py
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
	$(VENV)/bin/mmshim stack --config config/shim.toml --models config/models.toml

demo: venv
	$(VENV)/bin/mmshim demo --config config/shim.toml

# The benchmarks need no torch: on a fresh clone they install only the test extras.
bench:
	$(MAKE) venv models EXTRAS=test
	$(PY) -m bench

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
