# Two front doors: `make run` (set up, then the main job) and `make test` (set up, then the tests).
SHELL := /bin/bash
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint bench
setup:
	./scripts/setup.sh

run: setup
	.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no recipes/atm_vit.py

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check hf_atm recipes tests benchmarks

bench: setup
	.venv/bin/python benchmarks/merge_bench.py
