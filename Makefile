# One venv, installed once: torch's CPU build first (a bare torch requirement pulls CUDA),
# then the package with its test extra. Re-running is a no-op while pyproject.toml is unchanged.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PYTHON) -m pip install --disable-pip-version-check -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mi-krr demo

test: $(STAMP)
	$(PYTHON) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo 'pytest collected no tests: that is a failure' >&2; exit 1; fi; exit $$status

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PYTHON) $$script || exit 1; done
