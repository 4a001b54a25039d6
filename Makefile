# Every target installs into a project venv on first use, so a fresh clone needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test experiment bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: a local LeOCLR pretraining on the built-in synthetic data.
run: $(STAMP)
	$(VENV)/bin/leoclr pretrain configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

experiment: $(STAMP)
	$(VENV)/bin/leoclr experiment crop-semantics

bench: $(STAMP)
	$(PY) -m leoclr_core.bench

clean:
	rm -rf $(VENV) runs .pytest_cache
