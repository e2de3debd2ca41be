# dfq: the two entry points of the README, plus helpers. Everything installs itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OUT ?= runs/resnet20_fmnist-gdfq-W4A4-cpu
PORT ?= 8000
DATA ?= .dfq-data

.PHONY: setup data serve quantize test lint format bench-quality bench-service vendor-uplot

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

# Debian's Chromium for the dashboard's browser tests (Playwright drives it; no browser downloads).
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium

setup: $(BIN)/.installed data

# The service on the embedded defaults (SQLite + filesystem broker + workers, files under $(DATA)):
# open http://127.0.0.1:$(PORT)/ and log in with the token printed on first start.
serve: setup
	$(BIN)/dfq serve --port $(PORT) --data-dir $(DATA)

# The main job from the command line: GDFQ W4A4 on the bundled ResNet-20 teacher (about 10 minutes on 2 cores).
quantize: setup
	$(BIN)/dfq quantize --teacher resnet20_fmnist --method gdfq --bits W4A4 --budget cpu --eval fashion-mnist --out $(OUT)

test: setup $(CHROMIUM) lint
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-service: setup
	$(BIN)/python bench/service.py

bench-quality: setup
	$(BIN)/python bench/quality.py --budget cpu --methods gdfq --bits W8A8 W4A4 W3A3 --seeds 0

# The dashboard's chart library, vendored from the npm registry (committed; nothing fetched at run time).
UPLOT_VERSION ?= 1.6.32
vendor-uplot:
	tmp=$$(mktemp -d) && cd $$tmp && npm pack -q uplot@$(UPLOT_VERSION) >/dev/null && tar xzf uplot-$(UPLOT_VERSION).tgz && \
	cp package/dist/uPlot.iife.min.js package/dist/uPlot.min.css package/LICENSE $(CURDIR)/app/static/vendor/uplot/ && \
	rm -rf $$tmp
