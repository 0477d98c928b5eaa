# syntax=docker/dockerfile:1.7
# One image definition for every service (OPS-1):
#   docker build --build-arg SERVICE=profiles -t ghcr.io/retention-platform/crm-profiles:0.1.0 .
# SERVICE is one of profiles, segmentation, outreach, feedback, analytics.
# The runtime image is distroless (glibc, CA certificates, no shell) and runs
# as the unprivileged user 65532, the chart's runAsUser.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
ARG SERVICE
RUN case "${SERVICE}" in profiles|segmentation|outreach|feedback|analytics) ;; \
      *) echo "--build-arg SERVICE=profiles|segmentation|outreach|feedback|analytics is required (got '${SERVICE}')" >&2; exit 1 ;; esac
WORKDIR /src
COPY . .
# protoc comes vendored (protoc-bin-vendored); migrations and lexicons are embedded in the binary.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p "crm-${SERVICE}" \
 && install -D -m 0755 "target/release/crm-${SERVICE}" /out/crm-service

FROM gcr.io/distroless/cc-debian12:nonroot
ARG SERVICE
LABEL org.opencontainers.image.title="crm-${SERVICE}" \
      org.opencontainers.image.source="https://github.com/retention-platform/crm" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/crm-service /usr/local/bin/crm-service
USER 65532:65532
# gRPC 50051..50055 and metrics 51051..51055, by service (docs/operations.md).
EXPOSE 50051-50055 51051-51055
ENTRYPOINT ["/usr/local/bin/crm-service"]
CMD ["serve"]
