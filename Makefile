# Fresh machine to a running demo or a passing test suite, each in one command.
# Setup is idempotent: it reinstalls only when the requirements or setup.py change.
#
# ROS 2 comes from PyPI wheels, one virtual environment per distro:
#   make test                      Kilted, the whole suite; then Jazzy, the ROS-facing tests
#   make test ROS_DISTRO=jazzy     Jazzy only, the whole suite (.venv-jazzy)
#   make test ROS_DISTRO=kilted    Kilted only, the whole suite (.venv)
# ROS_DISTRO counts only when given on the command line: a sourced ROS install (which sets it
# in the environment) does not choose a pip environment.
SHELL := /bin/bash
PYTHON ?= python3.11
PYTEST_ARGS ?=
# Upstream sources of what has no PyPI wheel (vision_msgs, the launch system, the ros2 command
# line), built into each venv by make setup. Point it at your own checkouts (same layout as
# shared/ros-sources/README.md); where it does not exist the tests that need them skip.
ROS_SOURCES ?= ../shared/ros-sources
# Humble's Python is 3.10: the pure core and the engine slot (no ROS) are tested on it too. The
# first python3.10 that runs (a pyenv shim that does not is passed over); none: skipped.
PYTHON310 ?= $(shell for p in $$(command -v python3.10) $$HOME/.pyenv/versions/3.10*/bin/python3.10; \
	do "$$p" --version >/dev/null 2>&1 && { echo "$$p"; break; }; done)
PY310_TESTS := test/test_engine_slot.py test/test_engine.py test/test_model.py \
	test/test_postprocess.py test/test_navigation.py test/test_worker.py
# What a second distro must pass when `make test` runs both: everything that talks to rclpy.
ROS_FACING_TESTS := test/test_node.py test/test_node_faults.py test/test_node_parts.py test/test_layout.py test/test_replay.py \
	test/test_ros2_tools.py test/test_demo.py test/test_navigation.py test/test_navigation_node.py \
	test/test_flake8.py test/test_pep257.py

ifeq ($(origin ROS_DISTRO),command line)
DISTROS := $(ROS_DISTRO)
else
ROS_DISTRO := kilted
DISTROS := kilted jazzy
endif
ifeq ($(filter $(ROS_DISTRO),kilted jazzy),)
$(error ROS_DISTRO=$(ROS_DISTRO): only kilted and jazzy have PyPI wheels; on a robot with ROS installed from apt use colcon build and colcon test)
endif

venv_of = $(if $(filter jazzy,$(1)),.venv-jazzy,.venv)
distro_of = $(if $(filter .venv-jazzy,$(1)),jazzy,kilted)
# Cached: a no-op (a fraction of a second) once built from the same sources.
ros_tools = $(1)/bin/python -m cnn_rnn_perception.tools.environment.ros_from_source --distro $(call distro_of,$(1)) \
	--sources $(ROS_SOURCES)
requirements_of = $(if $(filter jazzy,$(1)),requirements-jazzy.txt,requirements.txt)
VENV := $(call venv_of,$(ROS_DISTRO))
BIN := $(VENV)/bin

.PHONY: setup demo demo-temporal test test-fast bench lint clean wheelhouse gpu-check \
	$(addprefix test-,kilted jazzy py310)

setup: $(VENV)/.installed
	@$(call ros_tools,$(VENV))

# One rule per distro's environment.
.venv/.installed .venv-jazzy/.installed: %/.installed: requirements.txt requirements-jazzy.txt \
		requirements-common.txt setup.py setup.cfg
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $*/bin/python || $(PYTHON) -m venv $*
	@req=$(if $(filter .venv-jazzy,$*),requirements-jazzy.txt,requirements.txt); \
	  echo "Installing the pinned environment ($$req) into $* (first time: a few minutes; log: $*/pip-install.log)"; \
	  $*/bin/python -m pip install --disable-pip-version-check -r $$req > $*/pip-install.log 2>&1 \
	  || { grep -v 'is ignored: it is neither' $*/pip-install.log | tail -30; echo "pip install failed; full log: $*/pip-install.log"; exit 1; }
	@$*/bin/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e . >> $*/pip-install.log 2>&1 \
	  || { tail -30 $*/pip-install.log; exit 1; }
	@touch $@
	@echo "Environment ready: $*"

demo: setup
	$(BIN)/cnn_rnn_perception demo

demo-temporal: setup
	$(BIN)/cnn_rnn_perception demo --temporal

test: $(addprefix test-,$(DISTROS)) test-py310

test-kilted: .venv/.installed
	@$(call ros_tools,.venv)
	@echo "== ROS 2 Kilted: the whole suite =="
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-jazzy: .venv-jazzy/.installed
	@$(call ros_tools,.venv-jazzy)
	@echo "== ROS 2 Jazzy: $(if $(filter kilted,$(DISTROS)),the ROS-facing tests,the whole suite) =="
	.venv-jazzy/bin/python -m pytest $(if $(filter kilted,$(DISTROS)),$(ROS_FACING_TESTS)) $(PYTEST_ARGS)

.venv-py310/.installed: requirements-py310.txt
	@test -x .venv-py310/bin/python || $(PYTHON310) -m venv .venv-py310
	@echo "Installing the Python 3.10 environment (requirements-py310.txt) into .venv-py310"
	@.venv-py310/bin/python -m pip install --disable-pip-version-check -r requirements-py310.txt \
	  > .venv-py310/pip-install.log 2>&1 || { tail -30 .venv-py310/pip-install.log; exit 1; }
	@touch $@

test-py310: $(if $(PYTHON310),.venv-py310/.installed)
	@if [ -z "$(PYTHON310)" ]; then echo "== Python 3.10: no python3.10 found (make PYTHON310=...); skipped =="; \
	else echo "== Python 3.10 (Humble's): the core, the engine slot and the worker, without ROS =="; \
	  .venv-py310/bin/python -m pytest $(PY310_TESTS) $(PYTEST_ARGS); fi

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/cnn_rnn_perception bench

lint: setup
	$(BIN)/python -m pytest test/test_flake8.py test/test_pep257.py

# GPU verification. The GPU machine has Python 3.12 with torch but no package registry:
#   here (with PyPI):      make wheelhouse    -> .whl/, the ROS cp312 wheels and rosbags (~50 MB)
#   there (carry .whl/):   make gpu-check     -> gpu-report/ (or $$OUT): GPU tests, selftest,
#                                               bench fp32/bf16 at batch 1,8,256, bench-node 1 and 4 cameras
WHEELHOUSE ?= .whl
GPU_PYTHON ?= python3
wheelhouse: .venv/.installed
	.venv/bin/python -m cnn_rnn_perception.tools.environment.gpu_check wheelhouse $(WHEELHOUSE)

# A venv of the GPU image's own python that also sees that python's packages (torch, numpy,
# OpenCV) through a .pth file: a --system-site-packages venv would not, since that python is
# itself a venv. --no-deps: the wheelhouse is complete, and empy (build-only) is left out.
gpu-check:
	@test -d $(WHEELHOUSE) || { echo "$(WHEELHOUSE)/ is missing: run make wheelhouse on a machine with PyPI and bring it along"; exit 1; }
	@test -x .venv-gpu/bin/python || $(GPU_PYTHON) -m venv .venv-gpu
	@$(GPU_PYTHON) -c 'import site; print("\n".join(site.getsitepackages()))' \
	  > $$(.venv-gpu/bin/python -c 'import site; print(site.getsitepackages()[0])')/gpu-image.pth
	.venv-gpu/bin/python -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile $(WHEELHOUSE)/*.whl
	.venv-gpu/bin/python -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e .
	AMENT_PREFIX_PATH=$(CURDIR)/.venv-gpu .venv-gpu/bin/python -m cnn_rnn_perception.tools.environment.gpu_check run --out $${OUT:-gpu-report}

clean:
	rm -rf .venv .venv-jazzy .venv-py310 .venv-gpu build install log *.egg-info
