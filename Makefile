# Fresh machine: `make run` (set up + digits pipeline) and `make test` (set up + tests).
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: install run test fashion-mnist clean
install: $(VENV)/.installed

run: install
	$(VENV)/bin/resmem run --config jobs/configs/digits.yaml

test: install
	$(VENV)/bin/python -m pytest -q

fashion-mnist: install
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y -q dataset-fashion-mnist
	$(VENV)/bin/resmem run --config jobs/configs/fashion_mnist.yaml

clean:
	rm -rf runs .pytest_cache
