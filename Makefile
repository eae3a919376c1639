# Everything is installed here, through the constraints file; nothing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/*/pyproject.toml))
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint dist clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(addsuffix /pyproject.toml,$(PLUGIN_DIRS))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt hatchling editables pip
	$(PIP) install -c constraints.txt --no-build-isolation -e '.[dev]' $(addprefix -e ,$(PLUGIN_DIRS))
	touch $@

demo: install
	$(VENV)/bin/dharma validate examples/foundation.toml
	$(VENV)/bin/dharma assemble examples/foundation.toml -o runs/foundation

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check dharma_kernel plugins tests benchmarks examples

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs dist build
