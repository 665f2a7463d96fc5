# omnitune: `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pair that runs here on CPU (a CUDA build on x86_64); override for other machines,
# e.g. make TORCH_SPEC="torch==2.7.1 torch_npu==2.7.1" for Ascend.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.omnitune-installed
# make test: test files spread over this many processes (pytest-xdist; one torch thread each)
TEST_WORKERS ?= 2

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omnitune demo --out demo_out

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=30

bench: $(STAMP)
	$(PY) bench/packing.py
	$(PY) bench/gpu_plan.py
	$(PY) bench/data_prep.py
	$(PY) bench/convert.py

clean:
	rm -rf demo_out bench_out
