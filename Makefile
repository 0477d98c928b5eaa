# The retention platform. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
# Every service with a binary under services/ (crm-<name>).
SERVICES := $(notdir $(patsubst %/src/main.rs,%,$(wildcard services/*/src/main.rs)))

.PHONY: help test lint fmt run demo stop logs token datagen bench bench-segmentation bench-outreach bench-feedback bench-analytics backing-services clean-local check-deploy k8s

help:
	@echo "make test      run every test, then the deployment checks (starts PostgreSQL and Redis if needed)"
	@echo "make lint      cargo fmt --check and clippy -D warnings"
	@echo "make check-deploy  the Helm chart and k8s/ checks alone (part of make test)"
	@echo "make k8s       regenerate k8s/base from the chart after changing it"
	@echo "make run       start PostgreSQL, Redis and every service locally ($(SERVICES)); the first start runs the demo"
	@echo "make demo      run the retention loop end to end on generated data and print its KPIs (starts the suite if needed)"
	@echo "make stop      stop the services started by make run"
	@echo "make logs      follow the services' logs"
	@echo "make token     print an admin token (with pii:read) for grpcurl"
	@echo "make datagen   write generated CSV data to target/data (CUSTOMERS=, SEED=)"
	@echo "make bench     benchmarks against raw baselines in the same run (not part of make test; BENCHMARKS.md)"
	@echo "make bench-segmentation  segmentation recompute vs the bare aggregate query, freshness at a steady event rate (BENCH_RECOMPUTE_CUSTOMERS=, BENCH_FRESHNESS_RATE=, BENCH_SECONDS=)"
	@echo "make bench-outreach  a campaign through the contact policy on two replicas, with a violation checker (BENCH_OUTREACH_CUSTOMERS=)"
	@echo "make bench-feedback  classification quality and speed, intake at a steady rate (BENCH_FEEDBACK_RATE=, BENCH_SECONDS=)"
	@echo "make bench-analytics event ingestion vs a bare INSERT; KPI queries on 1 M customers vs full scans (BENCH_ANALYTICS_CUSTOMERS=)"

backing-services:
	@bash scripts/ensure-backing-services.sh

test: backing-services
	$(CARGO) test --workspace --locked
	@bash scripts/check-deploy.sh

check-deploy:
	@bash scripts/check-deploy.sh

k8s:
	@bash scripts/render-k8s.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

run: backing-services
	@bash scripts/run-local.sh start $(SERVICES)

demo: backing-services
	@DEMO=skip bash scripts/run-local.sh start $(SERVICES)
	@JWT_SECRET_FILE=.local/jwt-secret ./target/local/crm-demo run

stop:
	@bash scripts/run-local.sh stop $(SERVICES)

logs:
	@tail -n 50 -F .local/logs/*.log

token:
	@$(CARGO) run -q -p crm-kit --bin crm-token -- --role admin --pii --subject "$${USER:-developer}" 2>/dev/null \
	  || JWT_SECRET_FILE=.local/jwt-secret $(CARGO) run -q -p crm-kit --bin crm-token -- --role admin --pii

datagen:
	$(CARGO) run -q --release -p crm-datagen -- --customers $${CUSTOMERS:-100000} --seed $${SEED:-42} --out target/data

clean-local: stop
	rm -rf .local

# Benchmarks are not part of `make test` or CI: release build, about 3 minutes.
bench: backing-services
	$(CARGO) build --release --locked -q -p crm-bench
	RUST_LOG=warn,sqlx=error ./target/release/crm-bench --customers $${BENCH_CUSTOMERS:-1000000} --seconds $${BENCH_SECONDS:-10} | tee target/bench-latest.md

# Issue 4: full segmentation recompute vs the bare aggregate query (the floor), same run.
bench-segmentation: backing-services
	$(CARGO) build --release --locked -q -p crm-bench
	RUST_LOG=warn,sqlx=error ./target/release/crm-bench --recompute $${BENCH_RECOMPUTE_CUSTOMERS:-1000000} --rate $${BENCH_FRESHNESS_RATE:-1000} --seconds $${BENCH_SECONDS:-20} | tee target/bench-segmentation-latest.md

bench-outreach: backing-services
	$(CARGO) build --release --locked -q -p crm-bench
	RUST_LOG=warn,sqlx=error ./target/release/crm-bench --outreach $${BENCH_OUTREACH_CUSTOMERS:-1000000} | tee target/bench-outreach-latest.md

# Issue 6: classification on the evaluation set, the classifier vs bare segmentation, intake open loop vs a bare INSERT.
bench-feedback: backing-services
	$(CARGO) build --release --locked -q -p crm-bench
	RUST_LOG=warn,sqlx=error ./target/release/crm-bench --feedback $${BENCH_FEEDBACK_RATE:-500} --seconds $${BENCH_SECONDS:-20} | tee target/bench-feedback-latest.md

# Issue 7: ingestion through the bus vs a bare INSERT; KPI queries on a large base vs full-scan SQL.
bench-analytics: backing-services
	$(CARGO) build --release --locked -q -p crm-bench
	RUST_LOG=warn,sqlx=error ./target/release/crm-bench --analytics $${BENCH_INGEST_CUSTOMERS:-50000} $${BENCH_ANALYTICS_CUSTOMERS:-1000000} | tee target/bench-analytics-latest.md
