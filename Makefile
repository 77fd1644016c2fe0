# Fresh machine: `make run` (set up + digits pipeline) and `make test` (set up + the whole suite).
# `make test-fast`: the tests that start no Ray (under a minute), while changing code.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: install run test test-fast fashion-mnist clean
install: $(VENV)/.installed

run: install
	$(VENV)/bin/resmem run --config jobs/configs/digits.yaml

test: install
	$(VENV)/bin/python -m pytest -q

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not ray"

fashion-mnist: install
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y -q dataset-fashion-mnist
	$(VENV)/bin/resmem run --config jobs/configs/fashion_mnist.yaml

clean:
	rm -rf runs .pytest_cache
