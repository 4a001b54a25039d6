# Every target installs into a project venv on first use, so a fresh clone needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test experiment bench bench-ray clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: LeOCLR pretraining on the built-in synthetic data, on a local
# Ray, tracked and registered in MLflow under ~/.leoclr (LEOCLR_DATA_DIR).
run: $(STAMP)
	$(VENV)/bin/leoclr pretrain configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

experiment: $(STAMP)
	$(VENV)/bin/leoclr experiment crop-semantics

bench: $(STAMP)
	$(PY) -m leoclr_core.bench

# The Ray path against the in-process engine, same config, side by side.
bench-ray: $(STAMP)
	$(PY) -m leoclr_core.distributed.bench --epochs 3 --set data.num_images=4096

clean:
	rm -rf $(VENV) runs .pytest_cache
