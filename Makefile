# snowflock-go. `make demo` runs the demo on an embedded local cluster;
# `make test` runs every test. Both work on a fresh Debian machine as root.
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
BIN := bin
FUZZTIME ?= 30s

.PHONY: all build test test-xen vet fmt-check demo bench bench-coord bench-boot bench-clone bench-mcast bench-xen fuzz clean

all: build

# Static binaries (no cgo): sfguest runs as /init in the guest.
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/...

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './.cache/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# Unit, fuzz-seed, in-process cluster and real-process tests, under the race
# detector (needs cgo: gcc).
test: fmt-check vet
	$(GO) test -race -count=1 -timeout 30m ./...

# Real Xen: two Xen 4.17 hosts nested in QEMU TCG (internal/xenbed), the
# xl driver, and SnowFlock cloning a PVH guest between them. make test runs
# these too.
test-xen:
	$(GO) test -count=1 -timeout 30m ./internal/xenbed/... ./xenctl/...
	$(GO) test -count=1 -timeout 30m -run 'TestXen' -v ./e2e

# Real processes on 127.0.0.1: 3 sfcoord, 2 sfhostd, a VM under QEMU.
demo: build
	$(BIN)/sfdemo

bench: bench-coord bench-boot bench-clone bench-mcast

# Real Xen nested in QEMU TCG: clone vs xl save + copy + xl restore, 3 runs
# each, medians (about 25 min).
bench-xen:
	$(GO) run ./bench/xen -mtu 9000 -runs 3 -out bench/results/xen.json

bench-coord:
	$(GO) run ./bench/coord -out bench/results/coord.json

bench-boot: build
	$(GO) run ./bench/boot -bin $(BIN) -out bench/results/boot.json

# Clone vs cold boot on an in-process cluster of 4 hosts with QEMU guests
# (needs root and /dev/fuse); about 10 minutes under TCG.
bench-clone: build
	$(GO) run ./bench/clone -bin $(BIN) -out bench/results/clone.json

# Acknowledged multicast vs N parallel TCP transfers: 256 MiB to N = 1, 2,
# 4, 8 members in a test bed of network namespaces (needs root).
bench-mcast:
	$(GO) run ./bench/mcast -out bench/results/mcast.json

# Runs every fuzz target for FUZZTIME each.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$f"; $(GO) test $$pkg -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime=200x; \
	  done; \
	done

clean:
	rm -rf $(BIN)
