# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test venv benchmarks clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sf_bsread_writer.tools.demo

test: $(STAMP)
	$(PY) -m pytest -q

benchmarks: $(STAMP)
	@echo "Benchmarks are run by hand, one at a time; see docs/performance.md for the commands."

clean:
	rm -rf $(VENV) build dist *.egg-info demo-output .pytest_cache .hypothesis
