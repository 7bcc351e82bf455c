# Two commands: `make demo` and `make test`. Both build .venv from pyproject.toml first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The dashboard's browser test drives Debian's Chromium (never a downloaded browser build).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# /metrics is checked with promtool, from Debian's prometheus package (the server is not run).
PROMTOOL := /usr/bin/promtool
$(PROMTOOL):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends prometheus

# The systemd unit is checked with systemd-analyze verify (Debian's systemd package; no init runs).
SYSTEMD_ANALYZE := /usr/bin/systemd-analyze
$(SYSTEMD_ANALYZE):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends systemd

demo: $(STAMP)
	$(BIN)/postlane demo

test: $(STAMP) $(CHROMIUM) $(PROMTOOL) $(SYSTEMD_ANALYZE)
	@# the cluster tests need PostgreSQL on 127.0.0.1:5432: start the local one if installed
	-@pg_isready -q -h 127.0.0.1 2>/dev/null || ( command -v pg_ctlcluster >/dev/null && \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | tail -1) main start ) \
		|| echo "PostgreSQL is not available: the cluster tests will be skipped"
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/postlane bench --marketing 20000 --transactional-rate 10

clean:
	rm -rf $(VENV) build *.egg-info
