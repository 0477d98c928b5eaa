//! The two services feedback calls (SPEC 2): profiles, to check who the
//! customer is (FBK-1), and outreach, to acknowledge feedback and to ask the
//! customer whether a resolved ticket is resolved (FBK-3 closed loop). Both
//! calls carry the trace context and feedback's service token
//! ([`crm_kit::client::Outgoing`]).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crm_kit::client::Outgoing;
use crm_proto::outreach::v1 as outreach;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use crm_proto::profiles::v1 as profiles;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

/// A boxed future (the partners are trait objects so tests can stand in for them).
pub type Call<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who a customer id stands for, according to profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomerCheck {
    /// A live customer (the survivor, for a merged-away id).
    Live(Uuid),
    /// No such customer.
    Unknown,
    /// The customer was erased (PRF-8).
    Erased,
}

/// Why a call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Worth retrying later (unreachable, overloaded, timed out).
    Retry(String),
    /// Will never succeed (refused as invalid).
    Permanent(String),
}

impl CallError {
    fn of(what: &str, s: &tonic::Status) -> CallError {
        let msg = format!("{what}: {:?} {}", s.code(), s.message());
        match s.code() {
            Code::InvalidArgument | Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition => {
                CallError::Permanent(msg)
            }
            _ => CallError::Retry(msg),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Retry(m) => write!(f, "{m} (will retry)"),
            CallError::Permanent(m) => write!(f, "{m}"),
        }
    }
}

/// profiles, as feedback needs it.
pub trait Profiles: Send + Sync {
    /// Checks a customer id.
    fn check(&self, customer: Uuid) -> Call<'_, Result<CustomerCheck, CallError>>;
}

/// outreach, as feedback needs it.
pub trait Outreach: Send + Sync {
    /// AcknowledgeFeedback; returns the message id and its decision.
    fn acknowledge(&self, request: outreach::AcknowledgeFeedbackRequest) -> Call<'_, Result<String, CallError>>;
}

/// profiles over gRPC.
#[derive(Clone)]
pub struct ProfilesClient {
    client: ProfilesServiceClient<InterceptedService<Channel, Outgoing>>,
    timeout: Duration,
}

impl ProfilesClient {
    /// A client of profiles at `url`.
    pub fn new(url: &str, outgoing: Outgoing, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = crm_kit::client::channel(url)?;
        Ok(Self { client: ProfilesServiceClient::with_interceptor(channel, outgoing), timeout })
    }
}

impl Profiles for ProfilesClient {
    fn check(&self, customer: Uuid) -> Call<'_, Result<CustomerCheck, CallError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            // A masked read: feedback needs the id, not the person's data.
            let mut request = tonic::Request::new(profiles::GetCustomerRequest {
                customer_id: customer.to_string(),
                purpose: String::new(),
            });
            request.set_timeout(self.timeout);
            match tokio::time::timeout(self.timeout, client.get_customer(request)).await {
                Err(_) => Err(CallError::Retry("profiles GetCustomer timed out".into())),
                Ok(Err(s)) if s.code() == Code::NotFound => Ok(CustomerCheck::Unknown),
                Ok(Err(s)) => Err(CallError::of("profiles GetCustomer", &s)),
                Ok(Ok(r)) => {
                    let c = r.into_inner();
                    if c.erased {
                        return Ok(CustomerCheck::Erased);
                    }
                    Uuid::parse_str(&c.customer_id)
                        .map(CustomerCheck::Live)
                        .map_err(|_| CallError::Permanent(format!("profiles returned a bad id {:?}", c.customer_id)))
                }
            }
        })
    }
}

/// outreach over gRPC.
#[derive(Clone)]
pub struct OutreachClient {
    client: OutreachServiceClient<InterceptedService<Channel, Outgoing>>,
    timeout: Duration,
}

impl OutreachClient {
    /// A client of outreach at `url`.
    pub fn new(url: &str, outgoing: Outgoing, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = crm_kit::client::channel(url)?;
        Ok(Self { client: OutreachServiceClient::with_interceptor(channel, outgoing), timeout })
    }
}

impl Outreach for OutreachClient {
    fn acknowledge(&self, request: outreach::AcknowledgeFeedbackRequest) -> Call<'_, Result<String, CallError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let mut request = tonic::Request::new(request);
            request.set_timeout(self.timeout);
            match tokio::time::timeout(self.timeout, client.acknowledge_feedback(request)).await {
                Err(_) => Err(CallError::Retry("outreach AcknowledgeFeedback timed out".into())),
                Ok(Err(s)) => Err(CallError::of("outreach AcknowledgeFeedback", &s)),
                Ok(Ok(r)) => {
                    let m = r.into_inner().message.unwrap_or_default();
                    let rule = m.decision.map(|d| d.rule).unwrap_or_default();
                    Ok(format!("message {} {rule}", m.message_id))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_permanent_and_outages_retried() {
        let s = |c| tonic::Status::new(c, "x");
        assert!(matches!(CallError::of("t", &s(Code::InvalidArgument)), CallError::Permanent(_)));
        assert!(matches!(CallError::of("t", &s(Code::Unavailable)), CallError::Retry(_)));
        assert!(matches!(CallError::of("t", &s(Code::ResourceExhausted)), CallError::Retry(_)));
        assert!(matches!(CallError::of("t", &s(Code::DeadlineExceeded)), CallError::Retry(_)));
    }
}
