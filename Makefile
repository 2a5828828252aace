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
# What a second distro must pass when `make test` runs both: everything that talks to rclpy.
ROS_FACING_TESTS := test/test_node.py test/test_node_config.py test/test_replay.py \
	test/test_demo.py test/test_flake8.py test/test_pep257.py

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
requirements_of = $(if $(filter jazzy,$(1)),requirements-jazzy.txt,requirements.txt)
VENV := $(call venv_of,$(ROS_DISTRO))
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench lint clean $(addprefix test-,kilted jazzy)

setup: $(VENV)/.installed

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

test: $(addprefix test-,$(DISTROS))

test-kilted: .venv/.installed
	@echo "== ROS 2 Kilted: the whole suite =="
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-jazzy: .venv-jazzy/.installed
	@echo "== ROS 2 Jazzy: $(if $(filter kilted,$(DISTROS)),the ROS-facing tests,the whole suite) =="
	.venv-jazzy/bin/python -m pytest $(if $(filter kilted,$(DISTROS)),$(ROS_FACING_TESTS)) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/cnn_rnn_perception bench

lint: setup
	$(BIN)/python -m pytest test/test_flake8.py test/test_pep257.py

clean:
	rm -rf .venv .venv-jazzy build install log *.egg-info
