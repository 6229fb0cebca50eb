# openclb: the two commands are `make demo` and `make test`; the rest are fast loops.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
PYTEST := $(BIN)/pytest
# Debian packages the controller and the lab need on this machine.
HOST_PACKAGES := user-mode-linux uml-utilities debootstrap e2fsprogs iproute2 socat openssh-client \
	curl wrk iperf3 openssl gcc libc6-dev \
	nginx softhsm2 p11-kit p11-kit-modules stunnel4 libengine-pkcs11-openssl opensc iptables
RESULTS := results

.PHONY: help deps venv lab-up lab-down lab-status deploy demo check-traffic lint sanity unit hosttest molecule labtest test clean clean-cache

help:
	@echo "make demo      install what is missing, boot the lab, deploy, send traffic, print the table"
	@echo "make test      the whole suite: lint, sanity, unit, Molecule, lab tests"
	@echo "make lab-up | lab-down | lab-status | deploy | lint | sanity | unit | hosttest | molecule | labtest"

deps:  ## Debian packages (only the missing ones; apt-get update once)
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo ">> installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  # the host tests start their own nginx/stunnel in namespaces: not Debian's on *:80 \
	  systemctl disable --now nginx stunnel4 >/dev/null 2>&1 || true; \
	fi

$(BIN)/openclb-lab: requirements.txt pyproject.toml
	@echo ">> creating the virtualenv $(VENV) (pinned requirements.txt)"
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check -e .
	@touch $@

# The repository root is the collection openclb.lb: link it where Ansible looks.
.collections/ansible_collections/openclb/lb:
	mkdir -p .collections/ansible_collections/openclb
	ln -sfn ../../.. $@

venv: $(BIN)/openclb-lab .collections/ansible_collections/openclb/lb

lab-up: deps venv
	openclb-lab up

lab-down: venv
	openclb-lab down

lab-status: venv
	openclb-lab status

# Lab only: self-signed certificates for the lab's HTTPS listeners (into the
# git-ignored .cache/tls/), then the whole site.
deploy: venv
	ansible-playbook -i inventories/lab playbooks/certificates.yml --tags generate -e openclb_tls_generate=true
	ansible-playbook -i inventories/lab site.yml

check-traffic: venv
	openclb-lab traffic --json $(RESULTS)/demo.json

demo: deps venv lab-up deploy check-traffic

lint: venv
	ruff check lab plugins tests benchmarks roles molecule
	yamllint -s .
	ansible-lint --offline

sanity: venv
	tests/ansible-test.sh sanity

unit: venv
	$(PYTEST) -q tests/unit

# Real daemons (nginx, stunnel, softhsm, ...) on this host, inside network
# namespaces the tests create and remove; root only.
hosttest: deps venv
	$(PYTEST) -q tests/host

molecule: deps venv
	molecule test --all

labtest: deps venv
	tests/lab/run.sh

test: deps venv lint sanity unit hosttest molecule labtest

clean: lab-down
	rm -rf .collections $(RESULTS)

clean-cache:  ## the cached guest images, debootstrap trees and wheels
	rm -rf $${OPENCLB_CACHE:-$$HOME/.cache/openclb}/images $${OPENCLB_CACHE:-$$HOME/.cache/openclb}/build $${OPENCLB_CACHE:-$$HOME/.cache/openclb}/wheels
