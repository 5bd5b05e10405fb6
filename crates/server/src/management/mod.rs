//! The management HTTP API: RabbitMQ's paths, JSON field names, status codes
//! and error bodies, so that scripts written against RabbitMQ's management
//! plugin keep working. axum serves it on its own listener (default port
//! 15672); every request authenticates with HTTP basic auth against Warren's
//! users and is authorised by their tags:
//!
//! | tag | may |
//! |---|---|
//! | `administrator` | everything, but in a vhost only what its AMQP permissions there allow (as RabbitMQ 3.10) |
//! | `monitoring` | read everything, and what `management` may |
//! | `policymaker` | change policies in the vhosts it has permissions in, and what `management` may |
//! | `management` | read the vhosts it has permissions in; declare, delete, bind, unbind, purge, publish and get there as its AMQP permissions allow |
//!
//! Users, vhosts, permissions, limits and definitions are for administrators.
//! Declaring, deleting, binding, purging, publishing and getting in a vhost
//! need the caller's AMQP permissions there, an administrator's too (as in
//! RabbitMQ; creating a vhost through the API grants its creator them).
//!
//! The handlers live in [`api`]; JSON shapes of the objects in [`json`];
//! the web UI served at `/` in [`ui`] (its files in `crates/server/ui/`).

mod api;

mod listing;

mod ui;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;
use tokio::net::TcpListener;

use crate::broker::Broker;

/// This node's own queues (in every vhost), connections, channels or
/// consumers, all of them, as the API lists them (what a peer asks for to
/// list the cluster's).
pub fn local_listing(broker: &Broker, what: crate::peers::Listing) -> Vec<serde_json::Value> {
    use crate::peers::Listing;
    match what {
        Listing::Queues => api::local_queues(broker),
        Listing::Connections => api::local_connections(broker),
        Listing::Channels => api::local_channels(broker),
        Listing::Consumers => api::local_consumers(broker),
    }
}

/// Closes this node's connection `name` with 320 CONNECTION_FORCED and
/// `reason`; whether there was one (what a peer asks for when the API of
/// another node closes it).
pub fn close_local_connection(broker: &Broker, name: &str, reason: &str) -> bool {
    api::close_local(broker, name, reason)
}

/// Starts serving the API on `listener` until the broker shuts down.
pub fn spawn(broker: &Arc<Broker>, listener: TcpListener) {
    serve_http(
        broker,
        listener,
        api::router(broker.clone()),
        "management API",
    );
}

/// Serves `app` on `listener` (peer addresses available to handlers) until
/// the broker shuts down; shared by the management API and the metrics
/// endpoint.
pub(crate) fn serve_http(
    broker: &Arc<Broker>,
    listener: TcpListener,
    app: axum::Router,
    what: &'static str,
) {
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let shutdown = broker.shutdown.clone();
    broker.tracker.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "{what} stopped");
        }
    });
}

/// An API error: a status and RabbitMQ's `{"error": ..., "reason": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            reason: reason.into(),
        }
    }

    /// 404 as RabbitMQ words it.
    pub fn not_found() -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "Object Not Found", "Not Found")
    }

    /// 404 for a write into a vhost that does not exist, as RabbitMQ's
    /// policy and operator-policy endpoints answer it.
    pub fn vhost_not_found() -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", "vhost_not_found")
    }

    /// 400 with a reason.
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    fn unauthorized(reason: &str) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "not_authorised", reason)
    }

    /// 500 for a store failure.
    pub fn internal(reason: impl std::fmt::Display) -> ApiError {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            reason.to_string(),
        )
    }
}

impl From<crate::error::AmqpError> for ApiError {
    /// A refusal of the AMQP layer: its text, with the status RabbitMQ's API
    /// gives for it (precondition failures and bad arguments are 400).
    fn from(e: crate::error::AmqpError) -> ApiError {
        let status = match e.code {
            404 => StatusCode::NOT_FOUND,
            403 => StatusCode::FORBIDDEN,
            405 => StatusCode::METHOD_NOT_ALLOWED,
            406 | 530 | 503 | 502 | 501 | 540 => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, "bad_request", format!("{} - {}", e.name, e.text))
    }
}

impl From<queue_store::StoreError> for ApiError {
    fn from(e: queue_store::StoreError) -> ApiError {
        ApiError::internal(e)
    }
}

impl From<crate::meta::MetaError> for ApiError {
    fn from(e: crate::meta::MetaError) -> ApiError {
        use crate::meta::MetaError;
        match e {
            MetaError::NotFound(reason) => {
                ApiError::new(StatusCode::NOT_FOUND, "Object Not Found", reason)
            }
            MetaError::Conflict(reason) | MetaError::Invalid(reason) => {
                ApiError::bad_request(reason)
            }
            MetaError::Store(e) => ApiError::internal(e),
            MetaError::Unavailable(reason) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                reason,
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": self.error, "reason": self.reason})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        response
    }
}

/// The authenticated user of a request and what its tags allow.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User name.
    pub name: String,
    administrator: bool,
    monitoring: bool,
    policymaker: bool,
}

impl Caller {
    /// Refuses unless the caller is an administrator.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.administrator {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not administrator user"))
        }
    }

    /// Refuses unless the caller may read everything (`monitoring`,
    /// `administrator`).
    pub fn require_monitoring(&self) -> Result<(), ApiError> {
        if self.monitoring {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not monitor user"))
        }
    }

    /// Refuses unless the caller may change policies (`administrator` or
    /// `policymaker`).
    pub fn require_policymaker(&self) -> Result<(), ApiError> {
        if self.administrator || self.policymaker {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not policymaker user"))
        }
    }

    /// Lets the caller do to `name` in `vhost` what an AMQP client with its
    /// permissions may, as RabbitMQ's API does: administrators too need
    /// permissions in the vhost to declare, delete, bind, purge, publish or
    /// get there (RabbitMQ 3.10 answers an administrator without them 401
    /// `not_authorised`); reading needs none. 401 with the AMQP refusal's
    /// text otherwise.
    pub fn require_access(
        &self,
        broker: &Broker,
        vhost: &str,
        resource: crate::auth::Resource,
        name: &str,
        access: crate::auth::Access,
    ) -> Result<(), ApiError> {
        broker
            .auth
            .check(&self.name, vhost, resource, name, access)
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "not_authorised", e.text))
    }

    /// Topic permission for `routing_key` on `exchange`, as `queue.bind`
    /// checks it (administrators too, as above).
    pub fn require_topic_access(
        &self,
        broker: &Broker,
        vhost: &crate::vhost::Vhost,
        exchange: &str,
        routing_key: &str,
        access: crate::auth::Access,
    ) -> Result<(), ApiError> {
        vhost
            .check_topic(&broker.auth, &self.name, exchange, routing_key, access)
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "not_authorised", e.text))
    }

    /// Whether the caller may see every vhost's objects and connections.
    pub fn may_see_all(&self) -> bool {
        self.monitoring
    }

    /// Whether the caller may see objects of `vhost`.
    pub fn may_see(&self, broker: &Broker, vhost: &str) -> bool {
        self.administrator || self.monitoring || broker.auth.may_open(&self.name, vhost)
    }
}

impl FromRequestParts<Arc<Broker>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        broker: &Arc<Broker>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(SocketAddr::from(([127, 0, 0, 1], 0)), |c| c.0);
        let (user, pass) = basic_credentials(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized("Login failed"))?;
        if let Err(why) = broker.authenticate(&user, &pass, peer) {
            tracing::info!(%peer, user = %user, reason = %why, "management login refused");
            return Err(ApiError::unauthorized("Login failed"));
        }
        let tags = broker.auth.user(&user).map(|u| u.tags).unwrap_or_default();
        let has = |t: &str| tags.iter().any(|x| x == t);
        let caller = Caller {
            administrator: has("administrator"),
            monitoring: has("administrator") || has("monitoring"),
            policymaker: has("policymaker"),
            name: user,
        };
        if !(caller.monitoring || has("management") || has("policymaker")) {
            return Err(ApiError::unauthorized("Not management user"));
        }
        Ok(caller)
    }
}

/// `Authorization: Basic base64(user:pass)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Z3Vlc3Q6Z3Vlc3Q="),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("guest".to_owned(), "guest".to_owned()))
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic_credentials(&h), None);
    }
}
