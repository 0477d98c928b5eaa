//! Authentication and per-RPC authorisation (SPEC 3, SEC-1).
//!
//! Callers present a JWT in the `authorization: Bearer <token>` metadata.
//! Its `roles` claim holds any of `admin`, `agent`, `analyst`, `service`;
//! its `permissions` claim may hold `pii:read`. Each service declares, for
//! every RPC, which roles may call it ([`AccessPolicy`]); the kit refuses to
//! start a service whose policy misses one of its RPCs, so nothing is open
//! by omission. Health and reflection are public.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtConfig, JwtKey};
use crate::error::ApiError;

/// The permission that unmasks personal data (SPEC 3).
pub const PII_READ: &str = "pii:read";

/// How many verified tokens are remembered.
const VERIFIED_TOKENS: usize = 10_000;

/// Paths any caller may use without a token.
pub const PUBLIC_PREFIXES: &[&str] =
    &["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Full administration.
    Admin,
    /// Front-line staff (call centre, account managers, store staff).
    Agent,
    /// Reporting and segment design.
    Analyst,
    /// Another service of the platform.
    Service,
}

impl Role {
    /// The claim value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::Analyst => "analyst",
            Role::Service => "service",
        }
    }

    /// Parses a claim value.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "agent" => Some(Role::Agent),
            "analyst" => Some(Role::Analyst),
            "service" => Some(Role::Service),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shorthand role sets for policies.
pub mod roles {
    use super::Role::{self, *};
    /// Admins only.
    pub const ADMIN: &[Role] = &[Admin];
    /// Anyone with a role.
    pub const ANY: &[Role] = &[Admin, Agent, Analyst, Service];
    /// Staff and services, not analysts.
    pub const OPERATORS: &[Role] = &[Admin, Agent, Service];
    /// Admins and services (machine writes).
    pub const MACHINE: &[Role] = &[Admin, Service];
    /// Admins and analysts (design and reporting).
    pub const DESIGNERS: &[Role] = &[Admin, Analyst];
    /// Admins and agents (humans at work).
    pub const STAFF: &[Role] = &[Admin, Agent];
}

/// Claims of our tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the user or service id.
    pub sub: String,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Extra permissions such as `pii:read`.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
}

/// The authenticated caller of a request, available to handlers through
/// `request.extensions().get::<Caller>()` (or [`Caller::of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token subject.
    pub subject: String,
    /// Roles held.
    pub roles: Vec<Role>,
    /// Permissions held.
    pub permissions: Vec<String>,
}

impl Caller {
    /// The caller of a request that passed the edge.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<&Caller, ApiError> {
        request
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| ApiError::Unauthenticated("request has no authenticated caller".into()))
    }

    /// The caller of a request, or one with no role and no permission (who
    /// may read nothing unmasked) when none was authenticated.
    pub fn or_nobody<T>(request: &tonic::Request<T>) -> Caller {
        request.extensions().get::<Caller>().cloned().unwrap_or_else(|| Caller {
            subject: "unknown".into(),
            roles: Vec::new(),
            permissions: Vec::new(),
        })
    }

    /// Whether the caller holds `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the caller may see personal data unmasked.
    pub fn can_read_pii(&self) -> bool {
        self.permissions.iter().any(|p| p == PII_READ)
    }

    /// The caller used when authentication is disabled: every role, every permission.
    pub fn development() -> Caller {
        Caller {
            subject: "dev-mode".into(),
            roles: vec![Role::Admin, Role::Agent, Role::Analyst, Role::Service],
            permissions: vec![PII_READ.into()],
        }
    }
}

/// Which roles may call which RPC.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    rules: HashMap<String, Vec<Role>>,
}

impl AccessPolicy {
    /// An empty policy (every non-public RPC is refused).
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares the roles of each method of `service` (fully qualified, e.g.
    /// "crm.profiles.v1.ProfilesService").
    pub fn service(mut self, service: &str, methods: &[(&str, &[Role])]) -> Self {
        for (method, roles) in methods {
            self.rules.insert(format!("/{service}/{method}"), roles.to_vec());
        }
        self
    }

    /// Roles allowed on a path, `None` if the path is not declared.
    pub fn roles_for(&self, path: &str) -> Option<&[Role]> {
        self.rules.get(path).map(Vec::as_slice)
    }

    /// Whether the path is public (health, reflection).
    pub fn is_public(path: &str) -> bool {
        PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p))
    }

    /// Checks that every RPC of the given services in the descriptor set has
    /// a rule. Returns the undeclared paths.
    pub fn undeclared(&self, descriptor_set: &[u8], services: &[&str]) -> Result<Vec<String>, prost::DecodeError> {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(descriptor_set)?;
        let mut missing = Vec::new();
        for file in &set.file {
            for svc in &file.service {
                let full = format!("{}.{}", file.package(), svc.name());
                if !services.contains(&full.as_str()) {
                    continue;
                }
                for m in &svc.method {
                    let path = format!("/{full}/{}", m.name());
                    if !self.rules.contains_key(&path) {
                        missing.push(path);
                    }
                }
            }
        }
        Ok(missing)
    }

    /// Decides whether `caller` may call `path`.
    pub fn authorize(&self, path: &str, caller: &Caller) -> Result<(), ApiError> {
        match self.roles_for(path) {
            // The path is the client's: echo only a bounded part of it.
            None => Err(ApiError::PermissionDenied(format!(
                "no access rule is declared for {:?}",
                path.chars().take(120).collect::<String>()
            ))),
            Some(allowed) if allowed.iter().any(|r| caller.has_role(*r)) => Ok(()),
            Some(allowed) => Err(ApiError::PermissionDenied(format!(
                "{path} requires one of the roles [{}]; the token of {:?} has [{}]",
                allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "),
                caller.subject,
                caller.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "),
            ))),
        }
    }
}

/// Verifies bearer tokens, or lets everyone in when disabled.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Mode>,
}

// One instance per process behind an Arc: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Mode {
    Disabled,
    Jwt {
        decoding: DecodingKey,
        validation: Validation,
        config: JwtConfig,
        cached_service_token: Mutex<Option<(String, u64)>>,
        /// Tokens already verified, with their expiry: a client presents the
        /// same token on every call, so its signature is checked once.
        verified: Mutex<HashMap<String, (Caller, u64)>>,
    },
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            Mode::Disabled => f.write_str("Authenticator(disabled)"),
            Mode::Jwt { .. } => f.write_str("Authenticator(jwt)"),
        }
    }
}

/// A bad key in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("JWT key: {0}")]
pub struct KeyError(String);

impl Authenticator {
    /// Builds the authenticator. Logs a loud warning when auth is disabled.
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        let mode = match config {
            AuthConfig::Disabled => {
                tracing::warn!(
                    "AUTHENTICATION IS DISABLED (AUTH_MODE=disabled): every caller is treated as an admin with pii:read. \
                     Never run like this outside a developer machine."
                );
                Mode::Disabled
            }
            AuthConfig::Jwt(jwt) => {
                let (decoding, alg) = match &jwt.key {
                    JwtKey::Secret(s) => (DecodingKey::from_secret(s), Algorithm::HS256),
                    JwtKey::PublicPem(pem) => match DecodingKey::from_rsa_pem(pem) {
                        Ok(k) => (k, Algorithm::RS256),
                        Err(_) => (
                            DecodingKey::from_ec_pem(pem)
                                .map_err(|e| KeyError(format!("not an RSA or EC public key: {e}")))?,
                            Algorithm::ES256,
                        ),
                    },
                };
                let mut validation = Validation::new(alg);
                validation.set_issuer(&[jwt.issuer.as_str()]);
                validation.set_audience(&[jwt.audience.as_str()]);
                validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                validation.leeway = jwt.leeway_seconds;
                validation.validate_nbf = true;
                Mode::Jwt {
                    decoding,
                    validation,
                    config: jwt.clone(),
                    cached_service_token: Mutex::new(None),
                    verified: Mutex::new(HashMap::new()),
                }
            }
        };
        Ok(Self { inner: Arc::new(mode) })
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        matches!(*self.inner, Mode::Jwt { .. })
    }

    /// Authenticates the `authorization` header of a request.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Caller, ApiError> {
        let (decoding, validation, verified) = match &*self.inner {
            Mode::Disabled => return Ok(Caller::development()),
            Mode::Jwt { decoding, validation, verified, .. } => (decoding, validation, verified),
        };
        let header = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthenticated("missing `authorization: Bearer <token>` metadata".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated("`authorization` metadata must be `Bearer <token>`".into()))?;
        let now = unix_now();
        if let Some((caller, exp)) = verified.lock().unwrap_or_else(|p| p.into_inner()).get(token)
            && now < exp.saturating_add(validation.leeway)
        {
            return Ok(caller.clone());
        }
        let data = jsonwebtoken::decode::<Claims>(token, decoding, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            let why = match e.kind() {
                K::ExpiredSignature => "token expired".to_string(),
                K::ImmatureSignature => "token not valid yet".to_string(),
                K::InvalidSignature => "token signature is invalid".to_string(),
                K::InvalidIssuer => "token issuer is not accepted".to_string(),
                K::InvalidAudience => "token audience is not accepted".to_string(),
                K::InvalidAlgorithm => "token algorithm is not accepted".to_string(),
                K::MissingRequiredClaim(c) => format!("token lacks the `{c}` claim"),
                _ => format!("malformed token: {e}"),
            };
            ApiError::Unauthenticated(why)
        })?;
        let claims = data.claims;
        let caller = Caller {
            subject: claims.sub,
            roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
            permissions: claims.permissions,
        };
        let mut cache = verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_TOKENS {
            // Bounded memory: start over rather than track recency.
            cache.clear();
        }
        cache.insert(token.to_string(), (caller.clone(), claims.exp));
        Ok(caller)
    }

    /// The bearer token this service presents to other services: the content
    /// of `SERVICE_TOKEN_FILE`, or a self-minted `service` token when an HS256
    /// secret is configured (refreshed at half its life). `None` when auth is off.
    pub fn service_token(&self, service: &str) -> Result<Option<String>, ApiError> {
        let Mode::Jwt { config, cached_service_token, .. } = &*self.inner else {
            return Ok(None);
        };
        if let Some(path) = &config.service_token_file {
            return std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| ApiError::Internal(format!("cannot read SERVICE_TOKEN_FILE {}: {e}", path.display())));
        }
        let JwtKey::Secret(secret) = &config.key else {
            return Err(ApiError::Internal(
                "outgoing calls need SERVICE_TOKEN_FILE when tokens are verified with a public key".into(),
            ));
        };
        let now = unix_now();
        let mut cached = cached_service_token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, refresh_at)) = cached.as_ref()
            && now < *refresh_at
        {
            return Ok(Some(token.clone()));
        }
        let ttl = Duration::from_secs(3600);
        let token = mint(
            secret,
            &TokenRequest {
                subject: format!("service:{service}"),
                roles: vec![Role::Service],
                permissions: vec![PII_READ.into()],
                ttl,
                issuer: config.issuer.clone(),
                audience: config.audience.clone(),
            },
        )
        .map_err(|e| ApiError::Internal(format!("cannot mint service token: {e}")))?;
        *cached = Some((token.clone(), now + ttl.as_secs() / 2));
        Ok(Some(token))
    }
}

/// What to put in a minted token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Subject.
    pub subject: String,
    /// Roles.
    pub roles: Vec<Role>,
    /// Permissions, e.g. `pii:read`.
    pub permissions: Vec<String>,
    /// Lifetime.
    pub ttl: Duration,
    /// Issuer.
    pub issuer: String,
    /// Audience.
    pub audience: String,
}

/// The HS256 secret from `JWT_SECRET` or the file named by `JWT_SECRET_FILE`
/// (for the local tools that mint tokens).
pub fn secret_from_env(env: &crate::config::Env) -> Result<Vec<u8>, String> {
    match (env.raw("JWT_SECRET"), env.raw("JWT_SECRET_FILE")) {
        (Some(s), _) => Ok(s.into_bytes()),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map(|s| s.trim().as_bytes().to_vec())
            .map_err(|e| format!("JWT_SECRET_FILE={path}: {e}")),
        (None, None) => Err("set JWT_SECRET or JWT_SECRET_FILE (make run uses .local/jwt-secret)".into()),
    }
}

/// Mints an HS256 token (local use, tests, self-issued service tokens).
pub fn mint(secret: &[u8], request: &TokenRequest) -> Result<String, jsonwebtoken::errors::Error> {
    let now = unix_now();
    let claims = Claims {
        sub: request.subject.clone(),
        roles: request.roles.iter().map(|r| r.as_str().to_string()).collect(),
        permissions: request.permissions.clone(),
        iss: request.issuer.clone(),
        aud: request.audience.clone(),
        iat: now,
        exp: now + request.ttl.as_secs(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn jwt() -> Authenticator {
        Authenticator::new(&AuthConfig::Jwt(JwtConfig {
            key: JwtKey::Secret(SECRET.to_vec()),
            issuer: "crm".into(),
            audience: "crm".into(),
            leeway_seconds: 0,
            service_token_file: None,
        }))
        .unwrap()
    }

    fn request(roles: Vec<Role>) -> TokenRequest {
        TokenRequest {
            subject: "alice".into(),
            roles,
            permissions: vec![],
            ttl: Duration::from_secs(60),
            issuer: "crm".into(),
            audience: "crm".into(),
        }
    }

    fn headers(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn a_valid_token_yields_its_caller() {
        let token = mint(SECRET, &request(vec![Role::Agent])).unwrap();
        let caller = jwt().authenticate(&headers(&token)).unwrap();
        assert_eq!(caller.subject, "alice");
        assert_eq!(caller.roles, [Role::Agent]);
        assert!(!caller.can_read_pii());
    }

    #[test]
    fn missing_forged_expired_and_foreign_tokens_are_unauthenticated() {
        let auth = jwt();
        assert!(matches!(auth.authenticate(&http::HeaderMap::new()), Err(ApiError::Unauthenticated(_))));
        let forged = mint(b"another-secret-another-secret-xx", &request(vec![Role::Admin])).unwrap();
        assert!(
            matches!(auth.authenticate(&headers(&forged)), Err(ApiError::Unauthenticated(m)) if m.contains("signature"))
        );
        let mut expired = request(vec![Role::Admin]);
        expired.ttl = Duration::ZERO;
        let now = unix_now();
        let claims = Claims {
            sub: "a".into(),
            roles: vec![],
            permissions: vec![],
            iss: "crm".into(),
            aud: "crm".into(),
            iat: now - 100,
            exp: now - 50,
        };
        let old = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(
            matches!(auth.authenticate(&headers(&old)), Err(ApiError::Unauthenticated(m)) if m.contains("expired"))
        );
        let mut foreign = request(vec![Role::Admin]);
        foreign.audience = "other".into();
        let foreign = mint(SECRET, &foreign).unwrap();
        assert!(matches!(auth.authenticate(&headers(&foreign)), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(auth.authenticate(&headers("not.a.jwt")), Err(ApiError::Unauthenticated(_))));
    }

    #[test]
    fn policy_grants_declared_roles_and_denies_others() {
        let policy = AccessPolicy::new().service("crm.x.v1.X", &[("Get", roles::ANY), ("Delete", roles::ADMIN)]);
        let agent = Caller { subject: "a".into(), roles: vec![Role::Agent], permissions: vec![] };
        assert!(policy.authorize("/crm.x.v1.X/Get", &agent).is_ok());
        assert!(matches!(policy.authorize("/crm.x.v1.X/Delete", &agent), Err(ApiError::PermissionDenied(_))));
        assert!(matches!(policy.authorize("/crm.x.v1.X/Unknown", &agent), Err(ApiError::PermissionDenied(_))));
        assert!(AccessPolicy::is_public("/grpc.health.v1.Health/Check"));
    }

    #[test]
    fn every_rpc_of_a_contract_must_be_declared() {
        let policy = AccessPolicy::new().service("crm.analytics.v1.AnalyticsService", &[("GetRetention", roles::ANY)]);
        let missing =
            policy.undeclared(crm_proto::FILE_DESCRIPTOR_SET, &["crm.analytics.v1.AnalyticsService"]).unwrap();
        assert!(missing.contains(&"/crm.analytics.v1.AnalyticsService/GetLift".to_string()));
        assert!(!missing.contains(&"/crm.analytics.v1.AnalyticsService/GetRetention".to_string()));
    }

    #[test]
    fn self_minted_service_tokens_verify_and_are_cached() {
        let auth = jwt();
        let t1 = auth.service_token("profiles").unwrap().unwrap();
        let t2 = auth.service_token("profiles").unwrap().unwrap();
        assert_eq!(t1, t2);
        let caller = auth.authenticate(&headers(&t1)).unwrap();
        assert!(caller.has_role(Role::Service));
    }
}
