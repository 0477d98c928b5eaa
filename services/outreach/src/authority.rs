//! REL-6: the owners of consent (profiles) and of complaints (feedback),
//! asked right before a message is handed to its channel. The decision
//! used outreach's event-fed copies, which lag by the time events take; the
//! hand-off check reads the record itself, so a withdrawal or a complaint
//! whose call returned before it stops the message on every replica.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crm_kit::client::Outgoing;
use crm_proto::feedback::v1 as feedback;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;
use crm_proto::profiles::v1 as profiles;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::domain::policy::Consent;

/// Ids per call (the owners' batch limit).
const BATCH: usize = 1000;

/// A lookup's future: the answer, or why to try again later.
pub type Asking<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Consent as recorded now, by (customer, channel, purpose); pairs absent have none.
pub type ConsentNow = HashMap<(Uuid, i16, i16), Consent>;

/// Where consent is recorded (profiles).
pub trait ConsentSource: Send + Sync {
    /// The consent of `ids` now.
    fn consent<'a>(&'a self, ids: &'a [Uuid]) -> Asking<'a, ConsentNow>;
}

/// Where complaints are recorded (feedback).
pub trait ComplaintSource: Send + Sync {
    /// Which of `ids` have a complaint open now.
    fn open<'a>(&'a self, ids: &'a [Uuid]) -> Asking<'a, HashSet<Uuid>>;
}

fn unique(ids: &[Uuid]) -> Vec<Uuid> {
    let mut v = ids.to_vec();
    v.sort();
    v.dedup();
    v
}

/// The consent a grant stands for at `now` (PRF-7: an expired grant is none).
pub fn consent_of(g: &profiles::ConsentGrant, now: chrono::DateTime<chrono::Utc>) -> Consent {
    let expired = g
        .expire_time
        .as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32))
        .is_some_and(|e| e <= now);
    match (expired, g.granted) {
        (true, _) => Consent::Unknown,
        (false, true) => Consent::Granted,
        (false, false) => Consent::Revoked,
    }
}

/// profiles' BatchGetConsent.
#[derive(Clone)]
pub struct ProfilesConsent {
    client: ProfilesServiceClient<InterceptedService<Channel, Outgoing>>,
    timeout: Duration,
}

impl ProfilesConsent {
    /// A source calling profiles at `url`.
    pub fn new(url: &str, outgoing: Outgoing, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = crm_kit::client::channel(url)?;
        Ok(Self { client: ProfilesServiceClient::with_interceptor(channel, outgoing), timeout })
    }
}

impl ConsentSource for ProfilesConsent {
    fn consent<'a>(&'a self, ids: &'a [Uuid]) -> Asking<'a, ConsentNow> {
        Box::pin(async move {
            let now = chrono::Utc::now();
            let mut out = ConsentNow::new();
            for chunk in unique(ids).chunks(BATCH) {
                let mut request = tonic::Request::new(profiles::BatchGetConsentRequest {
                    customer_ids: chunk.iter().map(Uuid::to_string).collect(),
                });
                request.set_timeout(self.timeout);
                let mut client = self.client.clone();
                let states = tokio::time::timeout(self.timeout, client.batch_get_consent(request))
                    .await
                    .map_err(|_| "profiles BatchGetConsent timed out".to_string())?
                    .map_err(|s| format!("profiles BatchGetConsent: {:?} {}", s.code(), s.message()))?
                    .into_inner()
                    .states;
                for state in states {
                    let Ok(id) = Uuid::parse_str(&state.customer_id) else { continue };
                    for g in &state.grants {
                        out.insert((id, g.channel as i16, g.purpose as i16), consent_of(g, now));
                    }
                }
            }
            Ok(out)
        })
    }
}

/// feedback's CheckOpenComplaints.
#[derive(Clone)]
pub struct FeedbackComplaints {
    client: FeedbackServiceClient<InterceptedService<Channel, Outgoing>>,
    timeout: Duration,
}

impl FeedbackComplaints {
    /// A source calling feedback at `url`.
    pub fn new(url: &str, outgoing: Outgoing, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = crm_kit::client::channel(url)?;
        Ok(Self { client: FeedbackServiceClient::with_interceptor(channel, outgoing), timeout })
    }
}

impl ComplaintSource for FeedbackComplaints {
    fn open<'a>(&'a self, ids: &'a [Uuid]) -> Asking<'a, HashSet<Uuid>> {
        Box::pin(async move {
            let mut out = HashSet::new();
            for chunk in unique(ids).chunks(BATCH) {
                let mut request = tonic::Request::new(feedback::CheckOpenComplaintsRequest {
                    customer_ids: chunk.iter().map(Uuid::to_string).collect(),
                });
                request.set_timeout(self.timeout);
                let mut client = self.client.clone();
                let open = tokio::time::timeout(self.timeout, client.check_open_complaints(request))
                    .await
                    .map_err(|_| "feedback CheckOpenComplaints timed out".to_string())?
                    .map_err(|s| format!("feedback CheckOpenComplaints: {:?} {}", s.code(), s.message()))?
                    .into_inner()
                    .customer_ids;
                out.extend(open.iter().filter_map(|s| Uuid::parse_str(s).ok()));
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prf7_an_expired_grant_is_no_consent_and_a_withdrawal_an_opt_out() {
        let now = chrono::Utc::now();
        let at = |secs: i64| Some(prost_types::Timestamp { seconds: now.timestamp() + secs, nanos: 0 });
        let grant = |granted: bool, expire_time| profiles::ConsentGrant { granted, expire_time, ..Default::default() };
        assert_eq!(consent_of(&grant(true, None), now), Consent::Granted);
        assert_eq!(consent_of(&grant(true, at(3600)), now), Consent::Granted);
        assert_eq!(consent_of(&grant(false, at(-3600)), now), Consent::Unknown);
        assert_eq!(consent_of(&grant(false, None), now), Consent::Revoked);
    }
}
