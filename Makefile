# The README's two commands are `make demo` and `make test`. Both bootstrap
# everything they need on a fresh machine: a virtualenv with the package and
# its extras, and the few Debian tools the tests drive (kcat, promtool, amtool).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
APT_TOOLS := kcat:kcat promtool:prometheus prometheus:prometheus amtool:prometheus-alertmanager

.PHONY: demo test bench lint typecheck install system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests use as real peers: kcat (a foreign Kafka client),
# promtool/amtool (rule and config checks), prometheus (the dashboard test
# scrapes real processes with it). Installed only when missing.
system-deps:
	@missing=""; for pair in $(APT_TOOLS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Static checks first (seconds), then the suite.
test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/touchpoint demo

bench: $(STAMP)
	$(BIN)/touchpoint bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
