# The whole set-up is two commands: `make demo` and `make test`. Both install what is missing
# (Debian packages, the Python virtualenv, the Go-built control plane) and are quiet when it is there.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Editable installs use setuptools' strict mode (a link tree), so a new Python file needs a
# reinstall: the stamp is keyed on the list of Python files and on pyproject.toml.
PY_LIST_HASH := $(shell { git ls-files -co --exclude-standard -- '*.py' 2>/dev/null; cat pyproject.toml; } | cksum | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(PY_LIST_HASH)
EXTRAS := operator,sim,inference,dev
# Tools whose pins conflict with the project's (checkov) get a virtualenv of their own.
TOOLS_VENV  := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed-$(shell cksum < hack/tools-requirements.txt | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: test demo demo-real-pods deps system-deps binaries lint unit clean help images test-images cold-run

help:
	@echo "make demo   - bring up the local GPU cluster and show voxscale at work"
	@echo "make test   - install whatever is missing, then lint, type-check and run the whole suite"
	@echo "make images - build the operator and inference images with podman (no Docker engine needed)"
	@echo "make demo-real-pods - the demo's loop with real containers (a real node, the operator pod, CPU servers)"
	@echo "make cold-run TARGETS='demo test' - run make targets in a scratch clone with every cache empty, timed"

# The images the real-pod tests run (tagged :test) are built before pytest starts, never inside a
# test's timeout; quiet and instant when they are up to date (hack/build-images.sh labels each image
# with a hash of its inputs).
test: deps lint test-images
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - that proves nothing, failing"; exit 1; fi; \
	exit $$rc

demo: deps
	@$(BIN)/voxscale demo

# The same loop with real pods: the images, a real worker node, the chart's operator pod.
demo-real-pods: deps images
	@VOXSCALE_IMAGE_TAG=dev $(BIN)/voxscale demo --real-pods

lint: deps
	@$(BIN)/ruff check --quiet .
	@$(BIN)/mypy --no-error-summary -p voxscale -p voxscale.operator -p voxscale.inference
	@$(BIN)/mypy --no-error-summary tests bench

deps: system-deps $(STAMP) $(TOOLS_STAMP) binaries

$(TOOLS_STAMP): hack/tools-requirements.txt
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	@echo "installing the test tools into $(TOOLS_VENV) (checkov)"
	@$(TOOLS_VENV)/bin/pip install --disable-pip-version-check -r hack/tools-requirements.txt > $(TOOLS_VENV)/pip.log 2>&1 \
	  || { tail -40 $(TOOLS_VENV)/pip.log; echo "pip install failed; full log: $(TOOLS_VENV)/pip.log"; exit 1; }
	@rm -f $(TOOLS_VENV)/.installed-*; touch $@

system-deps:
	@hack/install-system-deps.sh

# Resemblyzer is installed --no-deps: we only load the GE2E weights it ships (pretrained.pt) with
# our own code; its librosa/webrtcvad dependencies are never imported.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "voxscale needs Python >= 3.11")'
	@test -x $(BIN)/python || { echo "creating virtualenv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing voxscale[$(EXTRAS)] into $(VENV) (the first time includes torch: several GB)"
	@{ $(BIN)/pip install --disable-pip-version-check --upgrade pip && \
	   $(BIN)/pip install --disable-pip-version-check -e ".[$(EXTRAS)]" --config-settings editable_mode=strict && \
	   $(BIN)/pip install --disable-pip-version-check --no-deps "Resemblyzer==0.1.4"; \
	 } > $(VENV)/pip.log 2>&1 || { tail -40 $(VENV)/pip.log; echo "pip install failed; full log: $(VENV)/pip.log"; exit 1; }
	@rm -f $(VENV)/.installed-*; touch $@

# Both images from their Dockerfiles, daemonless (podman + runc); see hack/build-images.sh.
images: system-deps
	@hack/build-images.sh

test-images: system-deps
	@VOXSCALE_IMAGE_TAG=test hack/build-images.sh operator inference piper triton

# The fresh-machine path without a fresh machine: a clone of HEAD with every cache in a scratch folder.
TARGETS ?= test
cold-run:
	@hack/cold-run.sh $(TARGETS)

binaries: $(STAMP)
	@$(BIN)/voxscale cluster build

clean:
	-@test -x $(BIN)/voxscale && $(BIN)/voxscale cluster down
	rm -rf $(VENV) $(TOOLS_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
