# Two commands on a fresh machine with Python 3.11:  make demo  |  make test
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
# The real CIFAR-10 beside the checkout, when there; otherwise the sample inside the package.
NETQUANT_DATA ?= $(firstword $(wildcard $(CURDIR)/../shared/data/cifar-10-binary.tar.gz))
export NETQUANT_DATA

.PHONY: demo test venv clean
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(BIN)/netquant demo --out out

test: venv
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) out
