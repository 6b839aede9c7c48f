# CYPHONIC-over-QUIC. `make help` lists the targets.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
PYTEST_ARGS ?=

.PHONY: help setup proto test test-unit lint demo bench images image-test kind-test clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## install system packages (root), uv and the workspace
	scripts/setup.sh

proto: ## regenerate the committed Python code for proto/
	$(RUN) bash proto/generate.sh

test: ## the whole suite: unit, integration (Postgres, Redis), namespace tests (root)
	@if [ "$$(id -u)" -ne 0 ]; then echo "make test: namespace tests need root (ip netns, nftables, TUN); run as root" >&2; exit 1; fi
	$(RUN) pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: ## unit tests only (no root, no services)
	$(RUN) pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

lint: ## ruff check, ruff format --check, mypy --strict on every member
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy --strict lib/src services/auth/src services/nms/src services/trs/src node-agent/src testbed/src tests/support/src

demo: ## the main job on the embedded default: services and nodes in namespaces
	$(RUN) python -m cyphonic_testbed.demo $(DEMO_ARGS)

bench: ## data-path and service benchmarks (print figures)
	$(RUN) python bench/run.py

clean: ## remove caches and local state
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis

# ---- container images and Kubernetes (deploy/, charts/cyphonic, docs/kubernetes.md)
# The first engine that answers (a docker client without a daemon does not count).
ENGINE ?= $(shell for e in docker podman; do $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)
IMAGE_REGISTRY ?=
IMAGE_TAG ?= 0.1.0

images: ## build the AS, NMS, TRS and agent images (docker or podman; BASE_IMAGE=, IMAGE_REGISTRY=, IMAGE_TAG=)
	@test -n "$(ENGINE)" || { echo "make images: needs docker or podman" >&2; exit 1; }
	@for t in as nms trs agent; do \
	  ref="$(if $(IMAGE_REGISTRY),$(IMAGE_REGISTRY)/)cyphonic-$$t:$(IMAGE_TAG)"; echo "building $$ref"; \
	  $(ENGINE) build -f deploy/images/Dockerfile --target $$t \
	    $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t "$$ref" . || exit 1; \
	done

image-test: ## build every image on a local debootstrap base, start each against the host's Postgres/Redis (root, podman)
	deploy/image-test.sh

kind-test: ## the chart on a kind cluster: install, helm test, upgrade, two agents ping (needs kind + docker/podman)
	$(UV) run --frozen pytest -q -p no:cacheprovider -rs -m kind tests/kind $(PYTEST_ARGS)
