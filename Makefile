# Local LLM Lab. Two commands on a fresh machine: `make chat` and `make test`.
# Every target creates .venv and installs the pinned requirements first (once; again
# only when requirements.txt or pyproject.toml change).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP_VERSION := 26.3
# pytest arguments for `make test`, e.g. make test PYTEST_ARGS="-k registry -x"
PYTEST_ARGS ?=
# llama.cpp is built with ggml's own thread pool, not OpenMP (why: llmlab/envcheck.py,
# LLAMA_CPP_CMAKE_ARGS). Add your own flags in CMAKE_ARGS, e.g. CMAKE_ARGS="-DGGML_CUDA=on".
LLAMA_CMAKE_ARGS := -DGGML_OPENMP=OFF $(CMAKE_ARGS)
LLAMA_PIN = $$(grep -i '^llama.cpp.python==' requirements.txt)

.PHONY: help setup chat lab serve test lint format bench notebooks clean

help:
	@echo "make chat       create .venv, install, chat with the default model"
	@echo "make test       create/update .venv, install, run every test and notebook"
	@echo "make setup      create .venv and install the pinned requirements"
	@echo "make lab        start JupyterLab on the notebooks"
	@echo "make serve      start the web app and OpenAI-compatible API"
	@echo "make lint       ruff check and format check"
	@echo "make bench      measure speed; writes bench-results/"
	@echo "make notebooks  re-execute the notebooks in place (refresh their outputs)"

$(STAMP): requirements.txt pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + "). Install it, then run: make setup PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==$(PIP_VERSION)
	@echo "Installing the pinned requirements (the first time builds llama-cpp-python: about 10 minutes on 2 cores)..."
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -r requirements.txt
	@# pip reuses a wheel it built before, whatever CMAKE_ARGS say: replace an OpenMP build.
	@if $(PY) -c 'import sys, llama_cpp; sys.exit("OPENMP = 1" not in llama_cpp.llama_print_system_info().decode())'; then \
		echo "llama-cpp-python was an OpenMP build (from pip's cache); rebuilding it without OpenMP (about 10 minutes)..."; \
		$(PY) -m pip cache remove llama_cpp_python >/dev/null 2>&1 || true; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet --force-reinstall --no-deps $(LLAMA_PIN); \
	fi
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llmlab)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

chat: setup
	$(PY) part3/simple_chat.py

lab: setup
	$(VENV)/bin/jupyter lab notebooks

serve: setup
	$(PY) part5/combined_app/scripts/server.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) scripts/bench.py

notebooks: setup
	$(PY) scripts/run_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-results
