# make demo   the end-to-end job on the embedded default (CPU, 2 processes)
# make test   the test suite on megatron-core 0.16.1, then the version-sensitive tests on
#             megatron-core 0.19.2 (the two ends of the supported range)
# Both create .venv (python 3.11, CPU torch 2.13.0, megatron-core 0.16.1, this package
# editable with its test extras) when it is missing or older than the install files.
#
# .venv-mcore19 is a venv layered on .venv: its own site-packages hold only megatron-core
# 0.19.2 and triton (requirements-mcore19.txt), and a .pth file puts .venv's site-packages
# after them. Same python, torch and test packages by construction, so any difference is
# megatron-core's; built in seconds instead of a second 1.8 GB torch install. Python 3.11
# with --ignore-requires-python: megatron-core >= 0.17 declares python >= 3.12 but runs on
# 3.11, and a 3.12 venv would download PyPI's multi-GB CUDA torch (the CPU wheel on disk
# is for 3.11).

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.espace-installed
VENV19 ?= .venv-mcore19
PY19   := $(VENV19)/bin/python
STAMP19 := $(VENV19)/.espace-installed
# the tests that touch version-specific code: layers, surgery and specs, checkpoints and
# baselines, calibration, the trainer's retraining from a baseline, the Megatron-LM wrapper's
# decisions, the CPU shims, gradient accumulation on DDP's no_sync and hooks
TESTS19 ?= tests/test_versions.py tests/test_cpu_shims.py tests/test_layers.py \
	tests/test_accumulation.py \
	tests/test_surgery.py tests/test_checkpointing.py tests/test_baselines.py \
	tests/test_calibrate.py tests/test_launch.py \
	tests/test_train.py::test_baseline_to_espace_retraining \
	tests/test_train.py::test_retraining_loads_the_baselines_weights_and_adam_moments
# megatron-core >= 0.18 would run `git rev-parse` on every import to stamp its version
export NO_VCS_VERSION := 1
OUT    ?= demo-output

.PHONY: env env-mcore19 test test-mcore19 demo bench bench-calibration bench-inference bench-train clean

env: $(STAMP)

$(STAMP): setup.py requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

$(STAMP19): $(STAMP) requirements-mcore19.txt
	rm -rf $(VENV19)
	$(PY) -m venv --without-pip $(VENV19)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> $$($(PY19) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/espace-base-venv.pth
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --ignore-requires-python \
		--target $$($(PY19) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
		-r requirements-mcore19.txt
	$(PY19) -W ignore -c 'import megatron.core as m; assert m.__version__ == "0.19.2", m.__version__'
	touch $(STAMP19)

env-mcore19: $(STAMP19)

test: $(STAMP) $(STAMP19)
	$(PY) -m pytest
	$(PY19) -m pytest $(TESTS19)

test-mcore19: $(STAMP19)
	$(PY19) -m pytest $(TESTS19)

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
	rm -rf $(VENV) $(VENV19) $(OUT) build *.egg-info
