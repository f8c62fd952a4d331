# The README's two commands. Each sets itself up in a local virtual environment (.venv).
#   make quickstart [SHAKESPEARE=path/to/input.txt]   train the CPU config and print a sample
#   make test                                         install the test extra, ruff, pytest
#   make test-slow                                    the tests marked slow (CI runs both)
#   make kernels                                      build the quantized CPU kernels ahead of first use

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHAKESPEARE ?=
# Empty: prepare_data.py's own Tiny Shakespeare URL.
SHAKESPEARE_URL ?=
DATA ?= data/shakespeare_char
WORKDIR ?= out/shakespeare_char_cpu
PYTEST_ARGS ?= -n 2

.PHONY: quickstart test test-slow install install-test data clean kernels

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[mkl,onednn]'
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

data: install
	@if [ -f $(DATA)/meta.json ]; then echo "$(DATA) already prepared"; \
	elif [ -n "$(SHAKESPEARE)" ]; then \
	  $(PY) scripts/prepare_data.py --input=$(SHAKESPEARE) --tokenizer=char --out_dir=$(DATA); \
	else \
	  $(PY) scripts/prepare_data.py $(if $(SHAKESPEARE_URL),--url=$(SHAKESPEARE_URL)) --tokenizer=char \
	    --out_dir=$(DATA) || { \
	    echo "Could not download Tiny Shakespeare. Offline? Pass a local copy:"; \
	    echo "  make quickstart SHAKESPEARE=path/to/input.txt"; exit 1; }; \
	fi

quickstart: data
	$(PY) scripts/train.py --config=configs/shakespeare_char_cpu.py --workdir=$(WORKDIR) \
	  --config.data_dir=$(DATA)
	$(PY) scripts/sample.py --workdir=$(WORKDIR) --prompt="ROMEO:" --max_new_tokens=300

# The CPU kernels are built (or found in the cache) once before pytest, so its two workers do not
# both compile them; without g++ this warns and the tests take XLA's paths.
test: install-test
	$(VENV)/bin/ruff check .
	$(PY) -c "from nanojax.quant import ffi; ffi.kernels_available()"
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The tests marked slow (every mesh in both sharding modes, multi-process, the notebooks run
# whole): deselected by `make test`, run by CI after it.
test-slow: install-test
	$(PY) -c "from nanojax.quant import ffi; ffi.kernels_available()"
	$(PY) -m pytest $(PYTEST_ARGS) -m slow tests

kernels: install
	$(PY) -c "from nanojax.quant import ffi; print(ffi.build(verbose=True)); print(ffi.kernels_info())"

clean:
	rm -rf $(VENV) out data/shakespeare_char
