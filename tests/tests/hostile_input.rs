//! REL-1, REL-5 against the five real processes: every RPC of every
//! contract gets, for each list, map and text field of its request (and of
//! the messages the request holds), the largest such field a message under
//! the size limit can carry, built from the contracts' own descriptors. Each
//! answer must come within a few seconds with a client-mistake code (never
//! INTERNAL, UNKNOWN or a timeout), and the services stay up. Beyond it, a
//! message over the size limit is RESOURCE_EXHAUSTED and an undecodable one
//! INVALID_ARGUMENT, on every service. And for each bounded list, map and
//! text of the mutating RPCs, the largest accepted passes its check and one
//! more is refused naming the field.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crm_e2e::ServiceProcess;
use crm_kit::Role;
use crm_kit::testing::{frame, raw_call};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use tonic::Code;

const SERVICES: [&str; 5] = ["profiles", "segmentation", "outreach", "feedback", "analytics"];
/// A call may take this long, whatever its size (REL-5).
const BOUND: Duration = Duration::from_secs(3);

/// The message types of the contracts, by full name (".crm.profiles.v1.Customer").
struct Contracts {
    messages: HashMap<String, DescriptorProto>,
    set: FileDescriptorSet,
}

impl Contracts {
    fn load() -> Contracts {
        let set = FileDescriptorSet::decode(crm_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let mut messages = HashMap::new();
        fn add(prefix: &str, m: &DescriptorProto, into: &mut HashMap<String, DescriptorProto>) {
            let name = format!("{prefix}.{}", m.name());
            for nested in &m.nested_type {
                add(&name, nested, into);
            }
            into.insert(name, m.clone());
        }
        for file in &set.file {
            for m in &file.message_type {
                add(&format!(".{}", file.package()), m, &mut messages);
            }
        }
        Contracts { messages, set }
    }

    fn is_map(&self, f: &FieldDescriptorProto) -> bool {
        f.r#type() == Type::Message
            && self.messages.get(f.type_name()).is_some_and(|m| m.options.as_ref().is_some_and(|o| o.map_entry()))
    }

    /// Every RPC: (service short name, path, request type).
    fn rpcs(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for file in &self.set.file {
            let Some(service) = file.package().strip_prefix("crm.").and_then(|p| p.strip_suffix(".v1")) else {
                continue;
            };
            for svc in &file.service {
                for m in &svc.method {
                    out.push((
                        service.to_string(),
                        format!("/{}.{}/{}", file.package(), svc.name(), m.name()),
                        m.input_type().to_string(),
                    ));
                }
            }
        }
        out
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: i32, wire: u64, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire, out);
}

fn delimited(field: i32, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// The value of one element of a list or map of `f`'s type: a distinct
/// short text, an empty message, or 1.
fn element(f: &FieldDescriptorProto, number: i32, i: usize, out: &mut Vec<u8>) {
    match f.r#type() {
        Type::String | Type::Bytes => delimited(number, format!("e{i}").as_bytes(), out),
        Type::Message | Type::Group => delimited(number, &[], out),
        Type::Double | Type::Fixed64 | Type::Sfixed64 => {
            key(number, 1, out);
            out.extend_from_slice(&1u64.to_le_bytes());
        }
        Type::Float | Type::Fixed32 | Type::Sfixed32 => {
            key(number, 5, out);
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        _ => {
            key(number, 0, out);
            varint(1, out);
        }
    }
}

/// The largest form of field `f` a request can carry under the size limit.
fn huge(contracts: &Contracts, f: &FieldDescriptorProto) -> Vec<u8> {
    let mut out = Vec::new();
    if contracts.is_map(f) {
        let entry = &contracts.messages[f.type_name()];
        for i in 0..100_000 {
            let mut e = Vec::new();
            for (k, field) in entry.field.iter().enumerate() {
                element(field, k as i32 + 1, i, &mut e);
            }
            delimited(f.number(), &e, &mut out);
        }
    } else if f.label() == Label::Repeated {
        let n = match f.r#type() {
            Type::String | Type::Bytes => 300_000,
            Type::Message => 200_000,
            _ => 500_000,
        };
        for i in 0..n {
            element(f, f.number(), i, &mut out);
        }
    } else {
        delimited(f.number(), "x".repeat(3_000_000).as_bytes(), &mut out);
    }
    out
}

/// Each hostile request of a type: (field path, encoded request), for its
/// list, map and text fields and those of the messages it holds.
fn hostile(contracts: &Contracts, type_name: &str) -> Vec<(String, Vec<u8>)> {
    let Some(m) = contracts.messages.get(type_name) else { return Vec::new() };
    let mut out = Vec::new();
    for f in &m.field {
        let listy = f.label() == Label::Repeated || matches!(f.r#type(), Type::String | Type::Bytes);
        if listy {
            out.push((f.name().to_string(), huge(contracts, f)));
        } else if f.r#type() == Type::Message && !f.type_name().starts_with(".google.protobuf.Timestamp") {
            // One level down: the request's own messages (a customer, a campaign, a field mask).
            if let Some(inner) = contracts.messages.get(f.type_name()) {
                for g in &inner.field {
                    if g.label() == Label::Repeated || matches!(g.r#type(), Type::String | Type::Bytes) {
                        let mut wrapped = Vec::new();
                        delimited(f.number(), &huge(contracts, g), &mut wrapped);
                        out.push((format!("{}.{}", f.name(), g.name()), wrapped));
                    }
                }
            }
        }
    }
    out
}

/// How a limited field is filled: `n` list elements, map entries or characters.
#[derive(Clone, Copy)]
enum Fill {
    List,
    Map,
    Chars,
}

/// A request of type `type_name` with only `path` (one or two levels) set to `n` of `fill`.
fn with_field(contracts: &Contracts, type_name: &str, path: &str, fill: Fill, n: usize) -> Vec<u8> {
    let m = &contracts.messages[type_name];
    let (first, rest) = path.split_once('.').map_or((path, None), |(a, b)| (a, Some(b)));
    let f = m.field.iter().find(|f| f.name() == first).unwrap_or_else(|| panic!("{type_name} has no field {first}"));
    let mut out = Vec::new();
    if let Some(rest) = rest {
        delimited(f.number(), &with_field(contracts, f.type_name(), rest, fill, n), &mut out);
        return out;
    }
    match fill {
        Fill::Chars => delimited(f.number(), "x".repeat(n).as_bytes(), &mut out),
        Fill::List => (0..n).for_each(|i| element(f, f.number(), i, &mut out)),
        Fill::Map => {
            let entry = &contracts.messages[f.type_name()];
            for i in 0..n {
                let mut e = Vec::new();
                for (k, field) in entry.field.iter().enumerate() {
                    element(field, k as i32 + 1, i, &mut e);
                }
                delimited(f.number(), &e, &mut out);
            }
        }
    }
    out
}

fn violations(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// The bounded lists, maps and texts of the RPCs that take them: (RPC,
/// field, how it is filled, the most it accepts, the field an over-limit
/// request is refused on).
const LIMITS: &[(&str, &str, Fill, usize, &str)] = &[
    ("/crm.profiles.v1.ProfilesService/CreateCustomer", "customer.tags", Fill::List, 50, "customer.tags"),
    (
        "/crm.profiles.v1.ProfilesService/CreateCustomer",
        "customer.external_ids",
        Fill::List,
        20,
        "customer.external_ids",
    ),
    ("/crm.profiles.v1.ProfilesService/CreateCustomer", "customer.attributes", Fill::Map, 100, "customer.attributes"),
    ("/crm.profiles.v1.ProfilesService/CreateCustomer", "customer.name", Fill::Chars, 200, "customer.name"),
    ("/crm.profiles.v1.ProfilesService/ListCustomers", "tags", Fill::List, 50, "tags"),
    ("/crm.profiles.v1.ProfilesService/ListCustomers", "text_prefix", Fill::Chars, 100, "text_prefix"),
    ("/crm.profiles.v1.ProfilesService/BatchGetCustomers", "customer_ids", Fill::List, 1000, "customer_ids"),
    ("/crm.profiles.v1.ProfilesService/MergeCustomers", "reason", Fill::Chars, 500, "reason"),
    ("/crm.profiles.v1.ProfilesService/UnmergeCustomer", "reason", Fill::Chars, 500, "reason"),
    ("/crm.profiles.v1.ProfilesService/BatchRecordTransactions", "transactions", Fill::List, 1000, "transactions"),
    ("/crm.profiles.v1.ProfilesService/BatchRecordInteractions", "interactions", Fill::List, 1000, "interactions"),
    ("/crm.profiles.v1.ProfilesService/UpdateConsent", "changes", Fill::List, 50, "changes"),
    ("/crm.profiles.v1.ProfilesService/EraseCustomer", "reason", Fill::Chars, 500, "reason"),
    ("/crm.profiles.v1.ProfilesService/BatchGetConsent", "customer_ids", Fill::List, 1000, "customer_ids"),
    ("/crm.profiles.v1.ProfilesService/MaskFreeText", "texts", Fill::List, 1000, "texts"),
    (
        "/crm.segmentation.v1.SegmentationService/CreateSegment",
        "segment.display_name",
        Fill::Chars,
        100,
        "segment.display_name",
    ),
    (
        "/crm.segmentation.v1.SegmentationService/CreateSegment",
        "segment.description",
        Fill::Chars,
        2000,
        "segment.description",
    ),
    ("/crm.outreach.v1.OutreachService/SendMessage", "variables", Fill::Map, 20, "variables"),
    ("/crm.outreach.v1.OutreachService/AcknowledgeFeedback", "feedback_id", Fill::Chars, 128, "feedback_id"),
    ("/crm.outreach.v1.OutreachService/CreateCampaign", "campaign.segment_ids", Fill::List, 20, "campaign.segment_ids"),
    ("/crm.outreach.v1.OutreachService/CreateCampaign", "campaign.tag_filter", Fill::List, 20, "campaign.tag_filter"),
    ("/crm.outreach.v1.OutreachService/CreateTask", "task.reason", Fill::Chars, 2000, "task.reason"),
    ("/crm.feedback.v1.FeedbackService/SubmitFeedback", "feedback.text", Fill::Chars, 10_000, "feedback.text"),
    (
        "/crm.feedback.v1.FeedbackService/SubmitSurveyResponse",
        "response.comment",
        Fill::Chars,
        10_000,
        "response.comment",
    ),
    (
        "/crm.feedback.v1.FeedbackService/CreateImprovementAction",
        "action.ticket_ids",
        Fill::List,
        1000,
        "action.ticket_ids",
    ),
    ("/crm.feedback.v1.FeedbackService/CheckOpenComplaints", "customer_ids", Fill::List, 1000, "customer_ids"),
];

fn client_mistake(code: Code) -> bool {
    matches!(
        code,
        Code::Ok
            | Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::Aborted
            | Code::PermissionDenied
    )
}

#[tokio::test]
async fn rel5_the_largest_field_of_every_rpc_is_answered_at_once_and_never_as_internal() {
    let prefix = crm_kit::testing::unique_name("e2e");
    let bus = [("EVENT_STREAM_PREFIX", prefix.as_str()), ("CONSUMER_BLOCK_MS", "200")];
    let mut processes = Vec::new();
    for s in SERVICES {
        processes.push(ServiceProcess::start(s, &bus).await);
    }
    let url = |service: &str| processes[SERVICES.iter().position(|s| *s == service).expect("service")].url.clone();
    let token = crm_kit::testing::token(&[Role::Admin, Role::Agent, Role::Analyst, Role::Service], true);
    let contracts = Contracts::load();

    let mut checked = 0usize;
    let mut wrong = Vec::new();
    let mut slowest: Vec<(Duration, String)> = Vec::new();
    for (service, path, input) in contracts.rpcs() {
        for (field, body) in hostile(&contracts, &input) {
            assert!(body.len() < 4 * 1024 * 1024, "{path} {field}: {} bytes", body.len());
            let started = Instant::now();
            let status = raw_call(&url(&service), &path, frame(&body), &token).await;
            let took = started.elapsed();
            checked += 1;
            slowest.push((took, format!("{path} {field}")));
            if !client_mistake(status.code()) || took > BOUND {
                wrong.push(format!(
                    "{path} {field} ({} KB): {:?} {:?} after {took:?}",
                    body.len() / 1024,
                    status.code(),
                    status.message()
                ));
            }
        }
    }
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    eprintln!("slowest hostile requests: {:?}", &slowest[..slowest.len().min(8)]);
    assert!(checked > 250, "every RPC's fields were tried: {checked}");
    assert!(wrong.is_empty(), "{} of {checked} hostile requests went wrong:\n{}", wrong.len(), wrong.join("\n"));

    for service in SERVICES {
        let any = contracts.rpcs().into_iter().find(|(s, _, _)| s == service).expect("an RPC").1;
        let over = raw_call(&url(service), &any, frame(&vec![0u8; 4 * 1024 * 1024 + 1]), &token).await;
        assert_eq!(over.code(), Code::ResourceExhausted, "{service}: {over:?}");
        let garbage = raw_call(&url(service), &any, frame(&[0xff, 0xff, 0xff, 0xff]), &token).await;
        assert_eq!(garbage.code(), Code::InvalidArgument, "{service}: {garbage:?}");
        let mut deep = vec![0x7b_u8; 5000];
        deep.extend(std::iter::repeat_n(0x7c_u8, 5000));
        let deep = raw_call(&url(service), &any, frame(&deep), &token).await;
        assert_eq!(deep.code(), Code::InvalidArgument, "{service}: {deep:?}");
    }
    // Issue 22: a segment rule nested 5 000 deep was INTERNAL ("recursion limit reached").
    let create = &contracts.messages[".crm.segmentation.v1.CreateSegmentRequest"];
    let number = |m: &DescriptorProto, name: &str| m.field.iter().find(|f| f.name() == name).expect(name).number();
    for depth in [11usize, 5000] {
        let mut rule = Vec::new();
        for _ in 0..depth {
            let mut outer = Vec::new();
            delimited(number(&contracts.messages[".crm.segmentation.v1.RuleNode"], "not"), &rule, &mut outer);
            rule = outer;
        }
        let mut segment = Vec::new();
        let seg = &contracts.messages[".crm.segmentation.v1.Segment"];
        delimited(number(seg, "display_name"), b"deep", &mut segment);
        delimited(number(seg, "rule"), &rule, &mut segment);
        let mut body = Vec::new();
        delimited(number(create, "segment"), &segment, &mut body);
        delimited(number(create, "request_id"), crm_kit::testing::unique_name("deep").as_bytes(), &mut body);
        let started = Instant::now();
        let status = raw_call(
            &url("segmentation"),
            "/crm.segmentation.v1.SegmentationService/CreateSegment",
            frame(&body),
            &token,
        )
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "a rule {depth} deep: {status:?}");
        assert!(started.elapsed() < BOUND);
    }

    // The largest accepted and the just-too-large request of each bounded field.
    let inputs: HashMap<String, (String, String)> =
        contracts.rpcs().into_iter().map(|(service, path, input)| (path, (service, input))).collect();
    let mut wrong = Vec::new();
    for (rpc, field, fill, limit, named) in LIMITS {
        let (service, input) = &inputs[*rpc];
        for (n, refused) in [(*limit, false), (limit + 1, true)] {
            let started = Instant::now();
            let mut body = with_field(&contracts, input, field, *fill, n);
            // A valid request_id, so that checks made after it are reached.
            if let Some(f) = contracts.messages[input.as_str()].field.iter().find(|f| f.name() == "request_id") {
                delimited(f.number(), crm_kit::testing::unique_name("limits").as_bytes(), &mut body);
            }
            let status = raw_call(&url(service), rpc, frame(&body), &token).await;
            let named_it = violations(&status).iter().any(|v| v == named);
            let took = started.elapsed();
            if named_it != refused || took > BOUND || !client_mistake(status.code()) {
                wrong.push(format!(
                    "{rpc} {field} x{n}: {:?} {:?} {} after {took:?}",
                    status.code(),
                    violations(&status),
                    status.message()
                ));
            }
        }
    }
    // Every mutation's request_id: 128 characters are accepted, 129 refused (SPEC 3).
    for (service, rpc, input) in contracts.rpcs() {
        let Some(f) = contracts.messages[input.as_str()].field.iter().find(|f| f.name() == "request_id") else {
            continue;
        };
        for (n, refused) in [(128, false), (129, true)] {
            let mut body = Vec::new();
            delimited(f.number(), "r".repeat(n).as_bytes(), &mut body);
            let status = raw_call(&url(&service), &rpc, frame(&body), &token).await;
            if violations(&status).iter().any(|v| v == "request_id") != refused {
                wrong.push(format!("{rpc} request_id x{n}: {:?} {:?}", status.code(), violations(&status)));
            }
        }
    }
    assert!(wrong.is_empty(), "limits not as declared:\n{}", wrong.join("\n"));

    for p in &mut processes {
        assert!(p.child.try_wait().expect("status").is_none(), "a service died under hostile input");
        p.terminate().await;
    }
}
