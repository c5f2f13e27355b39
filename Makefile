# wsd — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
REPORTS := reports

.PHONY: help bootstrap demo demo-host lint test test-unit test-integration test-kernel vm-shell clean

help: ## Show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z_-]+:.*## /{printf "  make %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

bootstrap: ## Install Debian packages and .venv (idempotent, fast when done)
	@tools/bootstrap.sh

demo: bootstrap ## wsd and a synthetic guest, 30 s live (rwp: in the 7.3 VM if this kernel lacks it)
	@tools/demo.sh

demo-host: bootstrap ## The same demo on this kernel, in the best mode it supports
	@$(PY) -m wsd demo

lint: bootstrap ## ruff and mypy --strict on wsd/
	$(PY) -m ruff check wsd tests vmtest bench tools
	$(PY) -m ruff format --check wsd tests vmtest bench tools
	$(PY) -m mypy

test-unit: bootstrap ## Fast tests with fakes
	@mkdir -p $(REPORTS)
	$(PY) -m pytest -q tests/unit --junitxml=$(REPORTS)/unit.xml

test-integration: bootstrap ## Real userfaultfd on the host kernel, real redis-server
	@mkdir -p $(REPORTS)
	$(PY) -m pytest -q tests/integration --junitxml=$(REPORTS)/integration.xml

# Two attach tests run here too, so that adopting a VMM is tested in rwp mode as well.
ATTACH = tests/integration/vmms/test_attach_standin.py
test-kernel: bootstrap ## tests/kernel (and wsd attach) inside the Linux 7.3 VM (fetches the kernel once)
	@mkdir -p $(REPORTS)
	$(PY) -m vmtest pytest --timeout 2400 --junitxml=$(REPORTS)/kernel.xml \
		$(ATTACH)::test_wsd_attach_evicts_and_fetches_back_the_standin_memory \
		$(ATTACH)::test_attach_gives_the_session_to_a_restarted_wsd

test: bootstrap ## Everything: lint, unit, integration, kernel (VM); prints counts per tier
	@tools/test-all.sh

vm-shell: bootstrap ## Interactive shell in the Linux 7.3 VM
	$(PY) -m vmtest shell

clean: ## Remove reports and caches (keeps .venv and the kernel cache)
	rm -rf $(REPORTS) .pytest_cache .mypy_cache .ruff_cache
