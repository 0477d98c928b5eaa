//! `crm-demo seed [--customers N] [--profiles URL]`: loads a generated demo
//! data set (customers with their purchases and interactions) into a running
//! profiles service through ImportRecords. Safe to run again: customers match
//! and rows deduplicate by id. Signs its own token with the local JWT secret
//! (`JWT_SECRET` or `JWT_SECRET_FILE`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crm_kit::auth::{Role, TokenRequest, mint};
use crm_kit::config::Env;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::import_records_request::Record;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crm-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token() -> Result<String, String> {
    let env = Env::process();
    let secret = crm_kit::auth::secret_from_env(&env)?;
    mint(
        &secret,
        &TokenRequest {
            subject: "crm-demo".into(),
            roles: vec![Role::Service],
            permissions: vec![],
            ttl: Duration::from_secs(3600),
            issuer: env.raw("JWT_ISSUER").unwrap_or_else(|| "crm".into()),
            audience: env.raw("JWT_AUDIENCE").unwrap_or_else(|| "crm".into()),
        },
    )
    .map_err(|e| e.to_string())
}

async fn run() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    if command != "seed" {
        return Err("usage: crm-demo seed [--customers N] [--profiles URL]".into());
    }
    let mut customers = 2000usize;
    let mut url = "http://127.0.0.1:50051".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--customers" => {
                customers = args.next().and_then(|v| v.parse().ok()).ok_or("--customers needs a number")?
            }
            "--profiles" => url = args.next().ok_or("--profiles needs a URL")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token()?).parse().map_err(|_| "token is not ASCII")?;
    let channel = crm_kit::client::channel(&url).map_err(|e| e.to_string())?;
    let mut client = ProfilesServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    })
    .max_encoding_message_size(16 << 20);
    let generated = crm_datagen::Generator::new(crm_datagen::Config { customers, seed: 2026, ..Default::default() });
    let mut rows = Vec::new();
    let mut consents = Vec::new();
    for g in generated {
        consents.push((g.external_id(), g.consents()));
        let reference = g.external_id();
        rows.push(pb::ImportRecordsRequest { record: Some(Record::Customer(g.customer)), customer_ref: None });
        rows.extend(g.transactions.into_iter().map(|t| pb::ImportRecordsRequest {
            record: Some(Record::Transaction(t)),
            customer_ref: Some(reference.clone()),
        }));
        rows.extend(g.interactions.into_iter().map(|i| pb::ImportRecordsRequest {
            record: Some(Record::Interaction(i)),
            customer_ref: Some(reference.clone()),
        }));
    }
    let started = Instant::now();
    let r = client
        .import_records(tokio_stream::iter(rows))
        .await
        .map_err(|s| format!("ImportRecords: {} {}", s.code(), s.message()))?
        .into_inner();
    let granted = apply_consents(&client, consents).await?;
    Ok(format!(
        "demo data in profiles: {} customers created, {} already there; {} transactions and {} interactions recorded, {} already there; {} rejected; consent set for {granted} customers ({:.1} s)",
        r.customers_created,
        r.customers_matched,
        r.transactions_recorded,
        r.interactions_recorded,
        r.duplicates,
        r.rejected,
        started.elapsed().as_secs_f64()
    ))
}

/// Records each customer's marketing consent (PRF-7) with UpdateConsent, 16
/// calls at a time; request ids make a rerun change nothing.
async fn apply_consents<C>(
    client: &ProfilesServiceClient<C>,
    consents: Vec<(pb::ExternalId, Vec<pb::ConsentGrant>)>,
) -> Result<usize, String>
where
    C: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    C::Future: Send,
{
    let consents: Vec<_> = consents.into_iter().filter(|(_, grants)| !grants.is_empty()).collect();
    let total = consents.len();
    let mut lanes: Vec<Vec<(pb::ExternalId, Vec<pb::ConsentGrant>)>> = (0..16).map(|_| Vec::new()).collect();
    for (i, c) in consents.into_iter().enumerate() {
        lanes[i % 16].push(c);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for lane in lanes {
        let mut client = client.clone();
        tasks.spawn(async move {
            for (external, grants) in lane {
                let key = format!("demo-consent-{}", external.id);
                let customer = client
                    .resolve_customer(pb::ResolveCustomerRequest {
                        identity: Some(pb::resolve_customer_request::Identity::ExternalId(external)),
                        purpose: String::new(),
                    })
                    .await
                    .map_err(|s| format!("ResolveCustomer: {} {}", s.code(), s.message()))?
                    .into_inner();
                client
                    .update_consent(pb::UpdateConsentRequest {
                        customer_id: customer.customer_id,
                        changes: grants,
                        request_id: key,
                    })
                    .await
                    .map_err(|s| format!("UpdateConsent: {} {}", s.code(), s.message()))?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(total)
}
