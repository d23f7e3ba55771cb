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
# llama-cpp-python is built for this CPU by llmlab/llama_build.py (explicit instruction sets,
# no AMX, no OpenMP; one cached wheel per CPU type), then proven by a real generation.
# Extra CMake flags go in CMAKE_ARGS, e.g. make setup CMAKE_ARGS="-DGGML_CUDA=on";
# LLMLAB_LLAMA_AMX=1 make setup tries ggml's AMX kernels (dropped again if they crash).

.PHONY: help setup chat lab serve gradio test lint format bench notebooks clean

help:
	@echo "make chat       create .venv, install, chat with the default model"
	@echo "make test       create/update .venv, install, run every test and notebook"
	@echo "make setup      create .venv and install the pinned requirements"
	@echo "make lab        start JupyterLab on the notebooks"
	@echo "make serve      start the web app and OpenAI-compatible API"
	@echo "make gradio     start the Gradio app (chat and documents, model in process)"
	@echo "make lint       ruff check and format check"
	@echo "make bench      measure speed; writes bench-results/"
	@echo "make notebooks  re-execute the notebooks in place (refresh their outputs)"

$(STAMP): requirements.txt pyproject.toml Makefile llmlab/llama_build.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + "). Install it, then run: make setup PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==$(PIP_VERSION)
	$(PY) -m llmlab.llama_build install
	@echo "Installing the pinned requirements..."
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llmlab)" >/dev/null
	@echo "Proving llama.cpp on this CPU (a 32+ token prompt in a child process)..."
	$(PY) -m llmlab.llama_build repair
	@touch $(STAMP)

setup: $(STAMP)

chat: setup
	$(PY) part3/simple_chat.py

lab: setup
	$(VENV)/bin/jupyter lab notebooks

serve: setup
	$(PY) part5/combined_app/scripts/server.py

gradio: setup
	$(PY) part5/gradio_app.py

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
