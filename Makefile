# Everything is installed here, through the constraints file; nothing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/*/pyproject.toml))
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint dist device-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(addsuffix /pyproject.toml,$(PLUGIN_DIRS))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt hatchling editables pip
	$(PIP) install -c constraints.txt --no-build-isolation -e '.[dev,serve]' $(addprefix -e ,$(PLUGIN_DIRS))
	touch $@

DEMO_RUN := runs/dharma-foundation
DHARMA := $(VENV)/bin/dharma

# The main job. A finished run is kept, never overwritten: it is evaluated again instead.
demo: install
	$(DHARMA) validate examples/foundation.toml
	@if [ -e $(DEMO_RUN)/latest ]; then \
		echo "$(DEMO_RUN) holds a finished run; evaluating it (remove it to train again)"; \
	else \
		$(DHARMA) train examples/foundation.toml; \
	fi
	$(DHARMA) eval $(DEMO_RUN) --data examples/heldout --max-length 128 --ablate families
	$(DHARMA) report $(DEMO_RUN)
	$(DHARMA) generate $(DEMO_RUN) "Q: What is dharma? A:" --max-new-tokens 60 --seed 0

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check dharma_kernel plugins tests benchmarks examples

bench: install
	$(PY) benchmarks/run.py

# Wheels and sdists of the kernel and every plugin under plugins/, built offline by the
# venv's hatchling. `pip install --find-links dist dharma-plugin-<name>` then installs from here.
# hatchling names every file it writes on stderr: that goes to a log, shown only when a build fails.
DIST ?= dist
DIST_LOG := $(abspath $(DIST))/.build.log
dist: install
	@mkdir -p $(DIST)
	@rm -f $(DIST)/*.whl $(DIST)/*.tar.gz $(DIST_LOG)
	@for dir in . $(PLUGIN_DIRS); do \
		(cd $$dir && $(abspath $(PY)) -m hatchling build -d $(abspath $(DIST)) >>$(DIST_LOG) 2>&1) \
			|| { cat $(DIST_LOG); echo "make dist: building $$dir failed (output above)" >&2; exit 1; }; \
	done
	@rm -f $(DIST_LOG)
	@echo "$(DIST): $$(ls $(DIST)/*.whl | wc -l) wheels, $$(ls $(DIST)/*.tar.gz | wc -l) sdists"

# For benchmarks/device_check.sh on a lent GPU machine (Python 3.12, x86-64, no network): the
# project's wheels, and those of the packages its image lacks or holds too old (as last seen:
# transformers 5.17, no pydantic), at the versions constraints.txt pins.
DEVICE_PACKAGES := transformers tokenizers safetensors pydantic pydantic-core annotated-types typing-inspection \
	typing-extensions regex typer rich shellingham annotated-doc pluggy tiktoken
device-wheels: dist
	rm -rf .device && mkdir -p .device && cp $(DIST)/*.whl .device/
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-c constraints.txt -d .device $(DEVICE_PACKAGES)
	@echo ".device: $$(ls .device/*.whl | wc -l) wheels, $$(du -sh .device | cut -f1)"

clean:
	rm -rf $(VENV) runs dist build .device
