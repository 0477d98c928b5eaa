//! Where a message goes and whom it greets: the customer's name, phone and
//! e-mail, read from profiles at send time (SPEC 2: no copy of personal data
//! is kept in outreach). The read is unmasked, with the stated purpose
//! "outreach delivery", so profiles writes it to its access audit (SEC-1).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use crm_kit::client::Outgoing;
use crm_proto::profiles::v1 as profiles;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

/// A customer's contact points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactPoints {
    /// Name as recorded.
    pub name: String,
    /// E.164 phone, if any.
    pub phone: String,
    /// E-mail, if any.
    pub email: String,
}

/// What a lookup yields: the customers found, or why to try again later.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = Result<HashMap<Uuid, ContactPoints>, String>> + Send + 'a>>;

/// Looks up contact points by customer id.
pub trait Directory: Send + Sync {
    /// The customers found (missing or erased ones are absent). An error
    /// means "try again later" (profiles unreachable).
    fn lookup<'a>(&'a self, ids: &'a [Uuid]) -> Lookup<'a>;
}

/// The directory backed by profiles' BatchGetCustomers.
#[derive(Clone)]
pub struct ProfilesDirectory {
    client: ProfilesServiceClient<InterceptedService<Channel, Outgoing>>,
}

impl ProfilesDirectory {
    /// A directory calling profiles at `url` with the service's token.
    pub fn new(url: &str, outgoing: Outgoing) -> Result<Self, tonic::transport::Error> {
        let channel = crm_kit::client::channel(url)?;
        Ok(Self { client: ProfilesServiceClient::with_interceptor(channel, outgoing) })
    }
}

impl Directory for ProfilesDirectory {
    fn lookup<'a>(&'a self, ids: &'a [Uuid]) -> Lookup<'a> {
        Box::pin(async move {
            let mut out = HashMap::new();
            let mut unique: Vec<Uuid> = ids.to_vec();
            unique.sort();
            unique.dedup();
            for chunk in unique.chunks(1000) {
                let mut client = self.client.clone();
                let found = client
                    .batch_get_customers(profiles::BatchGetCustomersRequest {
                        customer_ids: chunk.iter().map(Uuid::to_string).collect(),
                        purpose: "outreach delivery".into(),
                    })
                    .await
                    .map_err(|s| format!("profiles BatchGetCustomers: {} {}", s.code(), s.message()))?
                    .into_inner();
                for c in found.customers {
                    if c.erased {
                        continue;
                    }
                    // Aliases of merged customers come back as the survivor; key by what was asked.
                    let asked = Uuid::parse_str(&c.customer_id).ok().filter(|id| chunk.contains(id));
                    let keys: Vec<Uuid> = match asked {
                        Some(id) => vec![id],
                        None => c
                            .alias_ids
                            .iter()
                            .filter_map(|a| Uuid::parse_str(a).ok())
                            .filter(|a| chunk.contains(a))
                            .collect(),
                    };
                    for key in keys {
                        out.insert(
                            key,
                            ContactPoints { name: c.name.clone(), phone: c.phone.clone(), email: c.email.clone() },
                        );
                    }
                }
            }
            Ok(out)
        })
    }
}
