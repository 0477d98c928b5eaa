//! Hostile input at the edge every service shares (REL-1, REL-5): what the
//! largest, the malformed and the made-up request cost, and what the caller
//! is told.

mod common;

use std::time::{Duration, Instant};

use crm_kit::testing::{frame, raw_call};
use prost::Message;
use tonic::Code;
use tonic_types::StatusExt;

const ECHO: &str = "/crm.kittest.v1.ProbeService/Echo";

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

fn token() -> String {
    crm_kit::testing::token(&[crm_kit::Role::Admin], false)
}

/// An EchoRequest whose encoding is exactly `size` bytes (size >= 16 384 + 4).
fn echo_of_size(size: usize) -> Vec<u8> {
    // Tag (1 byte) + a 3-byte length varint + the text.
    let text = "x".repeat(size - 4);
    let bytes = common::pb::EchoRequest { text, sleep_ms: 0 }.encode_to_vec();
    assert_eq!(bytes.len(), size);
    bytes
}

#[tokio::test]
async fn rel5_made_up_methods_do_not_grow_the_metrics() {
    let run = common::start(common::test_config().await).await;
    // Warm the series a declared RPC and an unknown one create.
    raw_call(&run.url, "/made.up/Warm", frame(b""), "").await;
    raw_call(&run.url, "/made.up/Warm", frame(b""), &token()).await;
    raw_call(&run.url, ECHO, frame(b""), &token()).await;
    let series = |text: &str| text.lines().filter(|l| l.starts_with("crm_grpc_server")).count();
    let before = run.metrics.render();
    for i in 0..300 {
        let path = format!("/made.up.Service{i}/Method{i}-{}", "z".repeat(200));
        let status = raw_call(&run.url, &path, frame(b""), "").await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let status = raw_call(&run.url, &path, frame(b""), &token()).await;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().len() < 300, "the made-up path is not echoed whole: {}", status.message().len());
    }
    let rendered = run.metrics.render();
    assert!(!rendered.contains("made.up"), "no series names a made-up path");
    assert!(rendered.contains("method=\"unknown\""), "they are counted as unknown");
    assert!(rendered.contains(&format!("method=\"{ECHO}\"")), "declared RPCs keep their own series");
    // Counter values grow by a few digits; no new series appear.
    assert_eq!(series(&rendered), series(&before), "no request series were added");
    assert!(rendered.len() < before.len() + 1000, "metrics grew from {} to {} bytes", before.len(), rendered.len());
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel5_a_message_over_the_limit_is_resource_exhausted_and_the_largest_accepted_passes() {
    let mut config = common::test_config().await;
    config.max_message_bytes = 64 * 1024;
    let run = common::start(config).await;

    let largest = raw_call(&run.url, ECHO, frame(&echo_of_size(64 * 1024)), &token()).await;
    assert_eq!(largest.code(), Code::Ok, "a message of exactly the limit is accepted: {largest:?}");

    let started = Instant::now();
    let over = raw_call(&run.url, ECHO, frame(&echo_of_size(64 * 1024 + 1)), &token()).await;
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert_eq!(reason(&over), "MESSAGE_TOO_LARGE");
    assert!(over.message().contains("MAX_MESSAGE_BYTES"), "{}", over.message());
    assert!(over.get_error_details().retry_info().is_none(), "retrying the same message cannot help");

    // A frame that claims a gigabyte is refused from its header, without waiting for the bytes.
    let mut claim = vec![0u8];
    claim.extend_from_slice(&(1u32 << 30).to_be_bytes());
    claim.extend_from_slice(b"only a few bytes follow");
    let huge = raw_call(&run.url, ECHO, claim, &token()).await;
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once: {:?}", started.elapsed());
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel5_the_default_limit_is_four_mebibytes_and_generated_clients_get_resource_exhausted() {
    let run = common::start(common::test_config().await).await;
    let mut client = common::client(&run.url, common::admin()).await;
    let err = client
        .echo(common::pb::EchoRequest { text: "y".repeat(4 * 1024 * 1024 + 1), sleep_ms: 0 })
        .await
        .expect_err("over 4 MiB");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "MESSAGE_TOO_LARGE");
    let ok = client.echo(common::pb::EchoRequest { text: "y".repeat(4 * 1024 * 1024 - 200), sleep_ms: 0 }).await;
    assert!(ok.is_ok(), "just under 4 MiB passes: {ok:?}");
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel1_undecodable_compressed_truncated_and_too_deep_messages_are_invalid_argument() {
    let run = common::start(common::test_config().await).await;
    let check = |status: tonic::Status, what: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(reason(&status), "MALFORMED_MESSAGE", "{what}: {status:?}");
        assert!(status.get_error_details().error_info().is_some_and(|i| i.domain.starts_with("crm")));
    };
    // Field 1 declared as a string of 200 bytes with 3 present.
    check(raw_call(&run.url, ECHO, frame(&[0x0a, 0xc8, 0x01, b'a', b'b', b'c']), &token()).await, "bad bytes");
    // Field 1 (a string) sent with the varint wire type.
    check(raw_call(&run.url, ECHO, frame(&[0x08, 0x01]), &token()).await, "wrong wire type");
    // 5 000 nested groups in an unknown field: past the decoder's recursion limit.
    let mut deep = vec![0x7b_u8; 5000];
    deep.extend(std::iter::repeat_n(0x7c_u8, 5000));
    let started = Instant::now();
    check(raw_call(&run.url, ECHO, frame(&deep), &token()).await, "nested 5 000 deep");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The compressed flag without any compression accepted.
    let mut compressed = frame(b"");
    compressed[0] = 1;
    check(raw_call(&run.url, ECHO, compressed, &token()).await, "compressed");
    // A frame that promises 10 bytes and ends after 3.
    let truncated = vec![0, 0, 0, 0, 10, 0x0a, 0x01, b'a'];
    check(raw_call(&run.url, ECHO, truncated, &token()).await, "truncated");
    // The server is still up and well.
    let fine = raw_call(&run.url, ECHO, frame(&[0x0a, 0x02, b'o', b'k']), &token()).await;
    assert_eq!(fine.code(), Code::Ok, "{fine:?}");
    run.shutdown.trigger();
}
