# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-long demo clean

venv: $(STAMP)

$(STAMP): requirements/cpu.txt setup.py tools/env/torchvision_cpu_fix.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	# Not used by the engine, and PyPI's builds do not load beside the CPU torch wheel.
	$(PY) -m pip uninstall -q -y torchaudio torchcodec || true
	$(PY) tools/env/torchvision_cpu_fix.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(PY) -m pytest -q

# The tests marked `long` (pytest.ini: the GRPO learning curves, ~10 min on 2 cores), left out of `make test`.
test-long: venv
	$(PY) -m pytest -q -m long

demo: venv
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
