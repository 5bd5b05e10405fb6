//! The management API client warrenctl's commands use, and why a command
//! failed, with rabbitmqctl's exit codes (BSD sysexits, as RabbitMQ's CLI
//! `ExitCodes`): 64 usage, 65 bad data (a missing vhost, wrong
//! credentials), 67 no such user, 69 unavailable (the broker cannot be
//! reached, refused, or a health check failed), 70 internal, 75 timed out.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Bad usage: an unknown command or column, a wrong argument (64).
    Usage(String),
    /// Bad data: a vhost that does not exist, wrong credentials (65).
    DataErr(String),
    /// A user that does not exist (67).
    NoUser(String),
    /// The broker refused: status and reason (69, rabbitmqctl's code for
    /// an error the node returned).
    Refused(u16, String),
    /// The broker cannot be reached, or a health check failed (69).
    Unavailable(String),
    /// A local problem: a file, standard input (70).
    Local(String),
    /// The broker did not answer within `--timeout` (75).
    Timeout(String),
}

impl Failure {
    /// The exit code rabbitmqctl gives the same failure.
    pub(crate) fn exit(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Usage(_) => 64,
            Failure::DataErr(_) => 65,
            Failure::NoUser(_) => 67,
            Failure::Refused(..) | Failure::Unavailable(_) => 69,
            Failure::Local(_) => 70,
            Failure::Timeout(_) => 75,
        })
    }

    /// A 404 from the API as "no such user" (67).
    pub(crate) fn no_user(self, user: &str) -> Failure {
        match self {
            Failure::Refused(404, _) => Failure::NoUser(format!("User \"{user}\" does not exist")),
            other => other,
        }
    }

    /// A 404 from the API for a runtime parameter (a policy, an operator
    /// policy) as rabbitmqctl words it (69).
    pub(crate) fn no_parameter(self) -> Failure {
        match self {
            Failure::Refused(404, _) => Failure::Refused(404, "Parameter does not exist".into()),
            other => other,
        }
    }

    /// A 404 from the API as "no such vhost" (65).
    pub(crate) fn no_vhost(self, vhost: &str) -> Failure {
        match self {
            Failure::Refused(404, _) => {
                Failure::DataErr(format!("Virtual host '{vhost}' does not exist"))
            }
            other => other,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(status, reason) => write!(f, "Error ({status}): {reason}"),
            Failure::Unavailable(e) => write!(f, "Error: {e}"),
            Failure::Usage(e) => write!(f, "Error (argument validation): {e}"),
            Failure::DataErr(e) | Failure::NoUser(e) | Failure::Local(e) | Failure::Timeout(e) => {
                write!(f, "Error: {e}")
            }
        }
    }
}

/// The management API at `base`, as one user.
#[derive(Debug)]
pub(crate) struct Api {
    base: String,
    user: String,
    pass: String,
    http: reqwest::Client,
}

/// Percent-encodes one path segment (vhost `/` becomes `%2F`).
pub(crate) fn seg(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

impl Api {
    /// A client of the API at `base` as `user`; each request gives up
    /// after `timeout` if one is set.
    pub(crate) fn new(base: &str, user: &str, pass: &str, timeout: Option<Duration>) -> Api {
        let mut http = reqwest::Client::builder();
        if let Some(t) = timeout {
            http = http.timeout(t);
        }
        Api {
            base: base.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            pass: pass.to_owned(),
            http: http.build().unwrap_or_default(),
        }
    }

    /// The same API as another user.
    pub(crate) fn as_user(&self, user: &str, pass: &str) -> Api {
        Api {
            base: self.base.clone(),
            user: user.to_owned(),
            pass: pass.to_owned(),
            http: self.http.clone(),
        }
    }

    /// The API's base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: &reqwest::Error) -> Failure {
        if e.is_timeout() {
            Failure::Timeout(format!(
                "the management API at {} timed out: {e}",
                self.base
            ))
        } else {
            Failure::Unavailable(format!(
                "unable to reach the management API at {}: {e}",
                self.base
            ))
        }
    }

    /// Sends a request; the JSON answer (`Null` if none), or why not.
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        reason: Option<&str>,
    ) -> Result<Value, Failure> {
        let (status, json) = self.send(method, path, body, reason).await?;
        if (200..300).contains(&status) {
            Ok(json)
        } else {
            let reason = json
                .get("reason")
                .and_then(Value::as_str)
                .map_or_else(|| json.to_string(), str::to_owned);
            Err(Failure::Refused(status, reason))
        }
    }

    /// Sends a request; the status and JSON answer whatever the status.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        reason: Option<&str>,
    ) -> Result<(u16, Value), Failure> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(r) = reason {
            req = req.header("X-Reason", r);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.unreachable(&e))?;
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, json))
    }

    /// `GET` whatever the status: the status and the JSON body.
    pub(crate) async fn get_with_status(&self, path: &str) -> Result<(u16, Value), Failure> {
        self.send(reqwest::Method::GET, path, None, None).await
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    pub(crate) async fn put(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(reqwest::Method::PUT, path, Some(body), None)
            .await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(reqwest::Method::POST, path, Some(body), None)
            .await
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.call(reqwest::Method::DELETE, path, None, None).await
    }
}
