# Two commands on a fresh machine:
#   make quickstart   install everything, then run notebooks/quickstart.ipynb (built-in tiny model, then a real one)
#   make test         install everything, then run the whole test suite
# and  make experiment  runs notebooks/experiment.ipynb twice, then replays it without its model (CI does).
# Everything installs into .venv (CPU torch first: an unpinned torch would pull a CUDA build).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nbllm-installed

.PHONY: install quickstart experiment test bench bench-gpu lint browser-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,dev,demo]'
	touch $(STAMP)

install: $(STAMP)

browser-deps:
	@test -x /usr/bin/chromium || { (apt-get update -q && apt-get install -y -q chromium) >/dev/null; }

quickstart: install
	mkdir -p build
	HF_HUB_OFFLINE=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=600 \
		--output-dir build notebooks/quickstart.ipynb
	$(VENV)/bin/jupyter nbconvert --to markdown --stdout build/quickstart.ipynb 2>/dev/null

experiment: install
	HF_HUB_OFFLINE=1 $(PY) notebooks/check_experiment.py build/experiment

test: install browser-deps lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra

# Each benchmark prints its figures and writes them, with the machine's description, to benchmarks/results/.
bench: install
	$(PY) benchmarks/bench_transformers.py
	$(PY) benchmarks/bench_transformers.py --params 100e6
	$(PY) benchmarks/bench_llamacpp.py
	$(PY) benchmarks/bench_llamacpp.py --params 100e6
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_compile.py
	$(PY) benchmarks/bench_bandwidth.py
	$(PY) benchmarks/bench_chat_prefix.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_replay.py
	$(PY) benchmarks/bench_remote.py
	$(PY) benchmarks/bench_first_prompt.py
	$(PY) benchmarks/bench_lora.py
	$(PY) benchmarks/bench_real_model.py

# The same on CUDA (float16/bfloat16, bitsandbytes 4-bit and 8-bit, sdpa/flash-attention 2, eager/compile with
# CUDA graphs, llama.cpp on the GPU), then the gpu tests. Without CUDA: one line, and nothing else runs.
bench-gpu: install
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
		|| { echo "make bench-gpu: skipped, no CUDA GPU here (torch sees none)"; exit 0; } \
		&& $(PY) benchmarks/bench_bandwidth.py --device cuda \
		&& $(PY) benchmarks/bench_compile.py --device cuda --params 1e9 \
		&& HF_HUB_OFFLINE=1 $(PY) -m pytest -m gpu -q

lint: install
	$(VENV)/bin/ruff check nbllm tests benchmarks
	$(VENV)/bin/mypy nbllm
