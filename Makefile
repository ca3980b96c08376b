# The two entry points: `make demo` runs a federation on this machine, `make test` runs every test.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# GiB free that a new virtualenv needs (torch with its CUDA libraries, torchvision, onnxruntime)
NEED_GIB ?= 7

.PHONY: demo test host clean

demo: $(VENV)/.installed host
	$(BIN)/python -m testbed.demo --out runs/demo

test: $(VENV)/.installed host
	$(BIN)/pytest

host:
	@scripts/setup-host.sh

$(VENV)/.installed: pyproject.toml | host
	@[ -x $(BIN)/python ] || scripts/check-space.sh $(NEED_GIB)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
