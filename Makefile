# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test venv benchmarks clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml sf_bsread_writer/transport/_partsio.c sf_bsread_writer/bsread/_blockwalk.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[services,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sf_bsread_writer.tools.demo

# The second run: the message paths again on the pure pyzmq fallback (the first run uses the
# compiled one where it is built; tests/test_partsio.py covers both in one run).
FALLBACK_TESTS = tests/test_buffer.py tests/test_replay.py tests/test_writer.py tests/test_original_scenarios.py \
                 tests/test_fuzz_buffer.py tests/test_partsio.py tests/test_web.py

# Both passes always run (a red first pass must not hide the second's result); both are reported,
# and the target fails if either failed.
test: $(STAMP)
	@$(PY) -m pytest -q; first=$$?; \
	echo "--- again on the pure pyzmq message path (SF_BSREAD_NO_EXTENSION=1)"; \
	SF_BSREAD_NO_EXTENSION=1 $(PY) -m pytest -q $(FALLBACK_TESTS); second=$$?; \
	echo "--- make test: first pass (compiled where built) exit $$first, pure pyzmq pass exit $$second"; \
	test $$first -eq 0 && test $$second -eq 0

benchmarks: $(STAMP)
	@echo "Benchmarks are run by hand, one at a time; see docs/performance.md for the commands."

clean:
	rm -rf $(VENV) build dist *.egg-info demo-output .pytest_cache .hypothesis
