# kt-sft entry points for CPU-only dev boxes and CI (.ci/run = `make test`).
# A clean clone needs only python3 + pip: `make test` sets up .venv, builds the engine, tests.
VENV        ?= .venv
PY          := $(VENV)/bin/python
JOBS        ?= 2
PYTEST_ARGS ?=
BENCH_ARGS  ?=

STAMP        := $(VENV)/.kt-sft-setup-ok
SETUP_INPUTS := scripts/setup_cpu.sh scripts/make_stub_wheels.py \
                $(filter-out requirements/tfnew.txt,$(wildcard requirements/*.txt))
# The venv is made from python3, so its extension suffix is python3's (PY may not exist yet).
EXT_SUFFIX   := $(shell python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
ENGINE_SO    := kt_sft/_engine$(EXT_SUFFIX)
ENGINE_SRCS  := $(wildcard setup.py) $(shell find csrc -type f 2>/dev/null)

WHEEL_PYTHONS ?=
WHEEL_CHECK  := dist/wheel-check

# `make test-tfnew`: the family suite (kt-sft's Python API against stock transformers + PEFT, no LLaMA-Factory) under
# the newest transformers on PyPI, in a second venv that reuses this one's torch (scripts/setup_tfnew.sh).
TFNEW_VENV  ?= .venv-tfnew
TFNEW_STAMP := $(TFNEW_VENV)/.kt-sft-tfnew-ok
TFNEW_TESTS := tests/test_families.py tests/test_vlm.py tests/test_generate_parity.py tests/test_expert_lora_peft.py \
               tests/test_chunked_loss.py tests/test_offload_parity.py tests/test_export.py
TFNEW_LIMIT ?= 900

.PHONY: setup build test test-fast test-tfnew fuzz soak demo bench wheel wheel-check clean distclean

setup: $(STAMP)

# Re-run the (idempotent) set-up only when its inputs changed since the last success.
$(STAMP): $(SETUP_INPUTS)
	VENV=$(VENV) scripts/setup_cpu.sh

# Rebuild only when a source or setup.py is newer than the .so.  --force: make already
# decided it is stale (build_ext's own check ignores e.g. setup.py flag changes); touch:
# keep the .so newer than its sources even if nothing was relinked.
ifneq ($(wildcard setup.py),)
build: setup $(ENGINE_SO)
$(ENGINE_SO): $(ENGINE_SRCS) | $(STAMP)
	KT_SFT_BUILD_JOBS=$(JOBS) $(PY) setup.py build_ext --inplace --force -j $(JOBS)
	touch $@
else
build: setup
	@echo "make build: no setup.py yet, nothing to build"
endif

test: build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# About 3 min on 2 cores (CI runs it after `make test`); killed past TFNEW_LIMIT seconds. Tests that need
# LLaMA-Factory skip there.
test-tfnew: build $(TFNEW_STAMP)
	timeout $(TFNEW_LIMIT) $(TFNEW_VENV)/bin/python -m pytest -q $(TFNEW_TESTS) $(PYTEST_ARGS)

$(TFNEW_STAMP): scripts/setup_tfnew.sh requirements/tfnew.txt $(STAMP)
	VENV=$(TFNEW_VENV) BASE=$(VENV) scripts/setup_tfnew.sh

# A quick subset for development: everything but the tests marked slow (subprocess-heavy); CI runs `make test`.
test-fast: build
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

# Not in CI's time budget (tests/test_fuzz.py runs short versions): 5000 random engine cases against the references
# (~2 min on one core; a failure prints its seed: `python tests/fuzz_engine.py --seed N`), and 500 LoRA training
# steps with the memory growth after warm-up printed. FUZZ_ARGS / SOAK_ARGS pass more (e.g. FUZZ_ARGS="--start 1000").
FUZZ_ARGS ?=
SOAK_ARGS ?=
fuzz: build
	$(PY) tests/fuzz_engine.py --cases 5000 $(FUZZ_ARGS)

soak: build
	$(PY) tests/soak_train.py --steps 500 $(SOAK_ARGS)

DEMO_YAML := examples/train_lora/demo_lora_sft_kt.yaml
DEMO_OUT  := $(shell sed -n 's/^output_dir: *//p' $(DEMO_YAML))

# The embedded demo through the real entry point: stock llamafactory-cli with the kt-sft hook (USE_KT=1).
demo: build
	USE_KT=1 $(VENV)/bin/llamafactory-cli train $(DEMO_YAML)
	@echo "kt-sft demo: LoRA adapter in $(DEMO_OUT)/ (adapter_config.json + adapter_model.safetensors), loss plot $(DEMO_OUT)/training_loss.png"
	@$(PY) -c "import json; h=[e['loss'] for e in json.load(open('$(DEMO_OUT)/trainer_state.json'))['log_history'] if 'loss' in e]; print(f'kt-sft demo: loss {h[0]:.3f} (first log) -> {h[-1]:.3f} (last log)')"

# manylinux wheels (every ISA unit, the hook .pth) into dist/, one per CPython: WHEEL_PYTHONS names the interpreters
# (default: every CPython 3.10-3.13 found on PATH, in pyenv or /opt/python). scripts/build_wheel.sh says how.
wheel: setup
	VENV=$(VENV) KT_SFT_BUILD_JOBS=$(JOBS) scripts/build_wheel.sh $(WHEEL_PYTHONS)

# CI: the venv's CPython wheel, installed without a compiler into a fresh venv with this torch: engine tests, the demo
# through the hook against the source build's losses, clean uninstall (scripts/check_wheel.sh).
wheel-check: build
	rm -rf $(WHEEL_CHECK)
	WHEEL_DIR=$(WHEEL_CHECK) VENV=$(VENV) KT_SFT_BUILD_JOBS=$(JOBS) scripts/build_wheel.sh $(PY)
	VENV=$(VENV) scripts/check_wheel.sh $(WHEEL_CHECK)/kt_sft-*.whl $(WHEEL_CHECK)/work

bench: build
	$(PY) benchmarks/bench_moe.py $(BENCH_ARGS)

clean:
	rm -rf build/ dist/ *.egg-info .pytest_cache kt_sft/_engine*.so
	find . -path ./$(VENV) -prune -o -path ./$(TFNEW_VENV) -prune -o -path ./.git -prune -o -name __pycache__ -type d \
		-prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(TFNEW_VENV)
