# livelens: the two README commands are `make run` and `make test`; everything else is a
# real run (training, sweeps, evaluation, benchmarks) kept out of the test suite.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.livelens-installed
export PYTHONUNBUFFERED := 1
# Keep torch's hub cache inside the project so the seeded offline weights travel with it.
export TORCH_HOME ?= $(CURDIR)/.cache/torch

.PHONY: setup run test lint fmt chaos data train-safety eval-safety sweep train-ocr eval-ocr train-persons eval-persons cutouts window-check eval-detection train-attributes eval-attributes retrain loop-e2e train-quality eval-quality eval-focus eval-exposure eval-video \
        default-models train-regions train-quality-flags active-loop eval-dedupe clusters bench bench-gpu cluster-up cluster-down clean coverage eval-real

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m serve_apps

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

fmt: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

data: setup
	$(PY) -m livelens.data.build --out runs/data

train-safety: setup
	$(PY) -m train_jobs.safety

train-regions: setup
	$(PY) -m train_jobs.regions

eval-safety: setup
	$(PY) -m train_jobs.eval_safety

eval-real: setup
	$(PY) -m train_jobs.eval_safety --real-photos

coverage: setup
	$(PY) -m livelens.coverage --out runs/coverage.md

sweep: setup
	$(PY) -m train_jobs.sweep

train-ocr: setup
	$(PY) -m train_jobs.ocr

eval-ocr: setup
	$(PY) -m livelens.ocr.evaluate --out runs/eval-ocr

train-persons: setup
	$(PY) -m train_jobs.persons_det

eval-persons: setup
	$(PY) -m livelens.persons.evaluate --detectors mtcnn,haar$$($(PY) -c "from livelens.store import find_in_stores as f; print(',persons_det' if f('persons_det') else '')")

# Whole-person cut-outs (mediapipe selfie segmentation around each training face, in .venv-mp) as
# RGBA PNGs with a summary, for review (runs/persons/cutouts).
cutouts: setup
	$(PY) -m livelens.persons.cutouts --out runs/persons/cutouts

# The picture-in-picture window check on the train-persons detector's own proposals (make data's
# frames at seeds 20-25, threshold chosen on seed 12); publishes it with a detector copy naming it.
window-check: setup
	$(PY) -m livelens.detection_eval window-check

# The graph's detection stage (the detector of train-persons) on fresh frames, game insets and QR
# codes, through the service's analyser, with and without the stage (runs/eval-detection).
eval-detection: setup
	$(PY) -m livelens.detection_eval evaluate

train-attributes: setup
	$(PY) -m train_jobs.persons_attr

eval-attributes: setup
	$(PY) -m livelens.persons.evaluate --attributes teacher$$($(PY) -c "from livelens.store import find_in_stores as f; print(',persons_attr' if f('persons_attr') else '')")

# One turn of the labelling loop: labels (LABELS) + the frames manifest -> candidate -> gate -> publish
# (and swap into APP when it is set).
LABELS ?= runs/loop/labels
retrain: setup
	$(PY) -m livelens.loop retrain --labels $(LABELS) $(if $(APP),--app $(APP),)

# The measured turn of the loop: a never-seen kind (a racing HUD) from traffic to a gated model.
loop-e2e: setup
	@test -d runs/data/frames || $(PY) -m livelens.data.build --out runs/data --only frames
	$(PY) -m benchmarks.loop_e2e --serve $(LOOP_ARGS)

train-quality: setup
	$(PY) -m train_jobs.quality

train-quality-flags: setup
	$(PY) -m train_jobs.quality_flags

eval-quality: setup
	$(PY) -m livelens.quality.evaluate --out runs/eval-quality

eval-focus: setup
	$(PY) -m livelens.quality.focus_eval --out runs/eval-focus

eval-exposure: setup
	$(PY) -m livelens.quality.exposure_eval --out runs/eval-exposure

eval-video: setup
	$(PY) -m livelens.quality.video_eval --out runs/eval-video

default-models: setup
	$(PY) -m train_jobs.defaults

active-loop: setup
	$(PY) -m train_jobs.active_loop

eval-dedupe: setup
	$(PY) -m train_jobs.eval_dedupe --out runs/eval-dedupe

# Embed the generated frames (Ray Data job, resumable) and cluster them, with contact sheets.
clusters: setup
	$(PY) -m livelens.loop embed --manifest runs/data/frames --out runs/loop/emb-frames
	$(PY) -m livelens.loop cluster --embeddings runs/loop/emb-frames --manifest runs/data/frames --out runs/loop/clusters --k 16

bench: setup
	$(PY) -m benchmarks

# The GPU figures (ResNet-50 bf16 training, serving from JPEG, the mmocr GPU preset's first
# epoch) in about 5 minutes on one H100/H200; exits 2 without CUDA.
bench-gpu: setup
	$(PY) -m benchmarks.bench_gpu --out runs/bench-gpu.json

chaos: setup
	$(PY) -m benchmarks.chaos --requests 10000
	$(PY) -m benchmarks.chaos --cluster
	$(PY) -m benchmarks.bench_overload

cluster-up: setup
	$(PY) -m cluster.local up --workers 2

cluster-down: setup
	$(PY) -m cluster.local down

clean:
	rm -rf runs .pytest_cache .ruff_cache
