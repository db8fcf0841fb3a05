# ngx_http_gpu_module: build, run and test. See README.md.
#
#   make run        build nginx + the module and start the example config on 127.0.0.1:8080
#   make test       every test (unit + integration against a real nginx, then the image test)
#   make nginx-build-test  nginx's ./configure --add-dynamic-module=. && make, then the
#                   integration suites against that nginx and module
#   make asan       nginx and the module built with AddressSanitizer, the integration
#                   suites against them; any ASan report fails (not part of make test)
#   make gpu-bundle build the GPU-machine bundle into .gpu/ (run there: bash .gpu/run.sh)
#   make image      build the GPU nginx image with docker, offline from vendored crates
#   make image-test build the image with buildah here and exercise it (root; no Docker needed)
#   make gpu-image  image-test, then export the image's binaries into .gpu-image/ for the
#                   GPU machine (run there: bash t/image/gpu-smoke.sh)

SHELL := /bin/bash
PREFIX ?= $(CURDIR)/build
CARGO ?= cargo
IMAGE ?= ngx-gpu
DOCKER ?= docker

.PHONY: deps build run stop test nginx-build-test asan gpu-bundle image image-test gpu-image clean

# Debian packages the build needs (nginx-sys builds nginx from source with bindgen).
deps:
	@need=""; for p in build-essential libclang-dev libpcre2-dev libssl-dev zlib1g-dev pkg-config curl; do \
	  dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  $$( [ $$(id -u) = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ $$(id -u) = 0 ] || echo sudo ) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup.rs)"; exit 1; }

build: deps
	$(CARGO) build --release
	mkdir -p $(PREFIX)/sbin $(PREFIX)/modules $(PREFIX)/conf $(PREFIX)/logs
	cp "$$(ls -d target/release/build/nginx-sys-*/out/objs/nginx | head -n1)" $(PREFIX)/sbin/nginx
	cp target/release/libngx_http_gpu_module.so $(PREFIX)/modules/ngx_http_gpu_module.so
	cp nginx-conf/*.conf $(PREFIX)/conf/

run: build
	-@[ -f $(PREFIX)/logs/nginx.pid ] && $(PREFIX)/sbin/nginx -p $(PREFIX) -c conf/nginx.conf -s quit 2>/dev/null; sleep 1
	$(PREFIX)/sbin/nginx -p $(PREFIX) -c conf/nginx.conf -e logs/error.log
	@sleep 1; grep -h "gpu: " $(PREFIX)/logs/error.log | tail -n 4
	@echo "nginx is serving on http://127.0.0.1:8080 (try: curl --data-binary @FILE http://127.0.0.1:8080/blake3)"
	@echo "stop it with: make stop"

stop:
	$(PREFIX)/sbin/nginx -p $(PREFIX) -c conf/nginx.conf -s quit

# cargo test does not refresh the module .so the integration tests load: build it first.
# The image test last: its summary line is then the last line.
test: deps
	$(CARGO) build --release
	$(CARGO) test --release
	bash t/image/test.sh

# The distribution's way: nginx's configure and make build the module (config, config.make,
# auto/rust) from nginx-src's source; then the http and config suites run against the result.
nginx-build-test:
	sh t/deps.sh --tests
	bash t/nginx-build/test.sh

# AddressSanitizer in nginx (GCC) and in the module (rustc -Zsanitizer=address through
# RUSTC_BOOTSTRAP), target/asan/; the suites run against them. Minutes: not in make test.
asan:
	sh t/deps.sh --tests
	bash t/asan/run.sh

# Everything the GPU machine needs, built here: test binaries, nginx, the module, the
# benchmark, and the libraries nginx links that the GPU machine may lack.
gpu-bundle: deps
	rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib
	$(CARGO) test --release --no-run --message-format=json 2>/dev/null \
	  | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]]' \
	  | while read -r exe; do cp "$$exe" .gpu/bin/test-$$(basename "$$exe" | sed 's/-[0-9a-f]*$$//'); done
	$(CARGO) build --release --benches --no-default-features --features vendored --message-format=json 2>/dev/null \
	  | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["bench"]]' \
	  | while read -r exe; do cp "$$exe" .gpu/bin/bench-$$(basename "$$exe" | sed 's/-[0-9a-f]*$$//'); done
	$(CARGO) build --release
	cp "$$(ls -d target/release/build/nginx-sys-*/out/objs/nginx | head -n1)" .gpu/bin/nginx
	cp target/release/libngx_http_gpu_module.so .gpu/ngx_http_gpu_module.so
	for l in libpcre2-8.so.0 libcrypt.so.1; do cp -L /lib/x86_64-linux-gnu/$$l .gpu/lib/; done
	command -v wrk >/dev/null || $$( [ $$(id -u) = 0 ] || echo sudo ) apt-get install -y -qq wrk
	cp "$$(command -v wrk)" .gpu/bin/wrk
	cp -L /lib/x86_64-linux-gnu/libluajit-5.1.so.2 .gpu/lib/
	cp t/gpu/run.sh .gpu/run.sh
	strip .gpu/bin/* .gpu/ngx_http_gpu_module.so 2>/dev/null || true
	du -sh .gpu

# With docker/vendor/ in the context the builder uses only those sources (--frozen).
image:
	$(CARGO) vendor --locked docker/vendor >/dev/null
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE) .

image-test:
	bash t/image/test.sh

gpu-image: image-test
	bash t/image/export.sh .gpu-image

# buildah's store for the image test stays (/var/cache/ngx-gpu-image): delete it by hand.
clean:
	$(CARGO) clean
	rm -rf $(PREFIX) .gpu .gpu-image docker/vendor
