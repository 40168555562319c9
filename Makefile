# Developer shortcuts; the README's two commands are scripts/demo.sh and scripts/test.sh.
.PHONY: setup fmt lint test-fast test bench-throughput bench-table1

setup:
	bash scripts/setup.sh

fmt: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

lint: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

test-fast:
	bash scripts/test.sh -q -m "not slow"

test:
	bash scripts/test.sh -q

bench-throughput: setup
	.venv/bin/python bench/throughput.py --device cpu

bench-table1: setup
	.venv/bin/python bench/table1.py --preset cpu --variants inco,simclr,inco-nodwv,inco-paper-literal \
		--ratios 1:32,1:2 --evals finetune,linear --seeds 0
