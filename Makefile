# make demo   the end-to-end job on the embedded default (CPU, 2 processes)
# make test   the test suite
# Both create .venv (python 3.11, CPU torch 2.13.0, megatron-core 0.16.1, this package
# editable with its test extras) when it is missing or older than the install files.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.espace-installed
OUT    ?= demo-output

.PHONY: env test demo bench bench-calibration bench-inference bench-train clean

env: $(STAMP)

$(STAMP): setup.py requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m megatron_espace.demo --output-dir $(OUT)

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py

bench-calibration: $(STAMP)
	$(PY) benchmarks/bench_calibration.py

bench-inference: $(STAMP)
	$(PY) benchmarks/bench_inference.py

bench-train: $(STAMP)
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
