//! The health checks of `rabbitmq-diagnostics` (and `await_startup`), as
//! Kubernetes probes and Docker health checks run them: each prints what
//! RabbitMQ's prints and fails with exit status 69 when the check fails
//! (75 when `await_startup` runs out of time).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::api::{Api, Failure, seg};
use crate::output::{Format, Output, text};

/// `node`'s entry of `/api/nodes` (69 if the cluster does not know it).
async fn node_info(api: &Api, node: &str) -> Result<Value, Failure> {
    api.get(&format!("/api/nodes/{}", seg(node)))
        .await
        .map_err(|e| match e {
            Failure::Refused(404, _) => {
                Failure::Unavailable(format!("unable to perform an operation on node '{node}'"))
            }
            e => e,
        })
}

/// Prints a check's success: `message`, or RabbitMQ's `{"result": "ok"}`
/// in JSON; nothing with `--silent`.
fn passed(out: &Output, message: &str) {
    if out.silent {
        return;
    }
    match out.format {
        Format::Json => out!("{}", json!({"result": "ok"})),
        _ => out!("{message}"),
    }
}

/// `ping`: the node answers.
pub(crate) async fn ping(api: &Api, out: &Output, node: &str) -> Result<(), Failure> {
    out.banner(&format!(
        "Will ping {node}. This only checks that it answers its management API."
    ));
    let info = node_info(api, node).await?;
    if info["running"] == json!(false) {
        return Err(Failure::Unavailable(format!(
            "Failed to connect and authenticate to {node}"
        )));
    }
    out.message("Ping succeeded");
    Ok(())
}

/// `check_running`: the node runs and has booted.
pub(crate) async fn running(api: &Api, out: &Output, node: &str) -> Result<(), Failure> {
    out.banner(&format!(
        "Checking if RabbitMQ is running on node {node} ..."
    ));
    let info = node_info(api, node).await?;
    if info["running"] == json!(false) {
        return Err(Failure::Unavailable(format!(
            "RabbitMQ on node {node} is not running or has not fully booted yet (check with is_booting)"
        )));
    }
    out.message(&format!(
        "RabbitMQ on node {node} is fully booted and running"
    ));
    Ok(())
}

/// `check_local_alarms`: no memory or disk alarm on the node.
pub(crate) async fn local_alarms(api: &Api, out: &Output, node: &str) -> Result<(), Failure> {
    out.banner(&format!(
        "Asking node {node} to report any local resource alarms ..."
    ));
    let info = node_info(api, node).await?;
    let mut alarms = Vec::new();
    if info["mem_alarm"] == json!(true) {
        alarms.push(format!("Memory alarm on node {node}"));
    }
    if info["disk_free_alarm"] == json!(true) {
        alarms.push(format!("Free disk space alarm on node {node}"));
    }
    if alarms.is_empty() {
        passed(out, &format!("Node {node} reported no local alarms"));
        return Ok(());
    }
    if out.format == Format::Json {
        out!(
            "{}",
            json!({"local": alarms, "message": format!("Node {node} reported local alarms"), "result": "error"})
        );
    }
    Err(Failure::Unavailable(alarms.join("\n")))
}

/// `check_virtual_hosts`: every vhost runs (on the node the URL reaches).
pub(crate) async fn virtual_hosts(api: &Api, out: &Output, node: &str) -> Result<(), Failure> {
    out.banner(&format!(
        "Checking if all vhosts are running on node {node} ..."
    ));
    let (status, body) = api
        .get_with_status("/api/health/checks/virtual-hosts")
        .await?;
    match status {
        200..=299 => {
            passed(out, &format!("Node {node} reported all vhosts as running"));
            Ok(())
        }
        503 => Err(Failure::Unavailable(format!(
            "Some virtual hosts on node {node} are down: {}",
            text(&body["reason"])
        ))),
        other => Err(Failure::Refused(other, text(&body["reason"]))),
    }
}

/// What a listener is for, in RabbitMQ's words.
fn purpose(protocol: &str) -> &'static str {
    match protocol {
        "amqp" => "AMQP 0-9-1",
        "amqp/ssl" => "AMQP 0-9-1 over TLS",
        "http" => "HTTP API",
        "http/prometheus" => "Prometheus exporter API over HTTP",
        "clustering" => "inter-node and CLI tool communication",
        _ => "",
    }
}

/// `node`'s listeners as the overview lists them.
async fn node_listeners(api: &Api, node: &str) -> Result<Vec<Value>, Failure> {
    let overview = api.get("/api/overview").await?;
    Ok(overview["listeners"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l["node"] == node)
        .collect())
}

/// `listeners`: the node's listeners.
pub(crate) async fn listeners(api: &Api, out: &Output, node: &str) -> Result<(), Failure> {
    out.banner(&format!(
        "Asking node {node} to report its protocol listeners ..."
    ));
    let listeners = node_listeners(api, node).await?;
    if out.format == Format::Json {
        let items: Vec<Value> = listeners
            .iter()
            .map(|l| {
                let protocol = text(&l["protocol"]);
                json!({"interface": l["ip_address"], "node": node, "port": l["port"], "protocol": protocol, "purpose": purpose(&protocol)})
            })
            .collect();
        out!(
            "{}",
            json!({"listeners": items, "node": node, "result": "ok"})
        );
        return Ok(());
    }
    if listeners.is_empty() {
        out!("Node {node} reported no enabled listeners.");
    }
    for l in &listeners {
        let protocol = text(&l["protocol"]);
        out!(
            "Interface: {}, port: {}, protocol: {protocol}, purpose: {}",
            text(&l["ip_address"]),
            text(&l["port"]),
            purpose(&protocol)
        );
    }
    Ok(())
}

/// `check_port_connectivity`: every listener of the node takes a TCP
/// connection (an unspecified address is tried at the URL's host), within
/// `timeout` (30 s by default) shared between them.
pub(crate) async fn port_connectivity(
    api: &Api,
    out: &Output,
    node: &str,
    timeout: Option<Duration>,
) -> Result<(), Failure> {
    out.banner(&format!(
        "Testing TCP connections to all active listeners on node {node} ..."
    ));
    let listeners = node_listeners(api, node).await?;
    let url_host = reqwest::Url::parse(api.base())
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "localhost".into());
    let each = timeout.unwrap_or(Duration::from_secs(30)) / (listeners.len().max(1) as u32);
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for l in &listeners {
        let ip = text(&l["ip_address"]);
        let host = match ip.parse::<std::net::IpAddr>() {
            Ok(a) if a.is_unspecified() => url_host.clone(),
            _ => ip.clone(),
        };
        let port = l["port"].as_u64().unwrap_or(0);
        let target = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        match tokio::time::timeout(each, tokio::net::TcpStream::connect(&target)).await {
            Ok(Ok(_)) => ok.push(port),
            _ => failed.push(format!(
                "Interface: {ip}, port: {port}, protocol: {}, purpose: {}",
                text(&l["protocol"]),
                purpose(&text(&l["protocol"]))
            )),
        }
    }
    if failed.is_empty() {
        ok.sort_unstable();
        let ports: Vec<String> = ok.iter().map(u64::to_string).collect();
        if out.format == Format::Json {
            out!(
                "{}",
                json!({"listeners": listeners, "node": node, "result": "ok"})
            );
        } else if !out.silent {
            out!(
                "Successfully connected to ports {} on node {node}.",
                ports.join(", ")
            );
        }
        return Ok(());
    }
    if out.format == Format::Json {
        out!(
            "{}",
            json!({"failures": failed, "node": node, "result": "error"})
        );
    }
    Err(Failure::Unavailable(format!(
        "Connection to ports of the following listeners on node {node} failed: \n{}",
        failed.join("\n")
    )))
}

/// `await_startup`: waits until the broker answers, at most `timeout`
/// (300 s by default, as rabbitmqctl's).
pub(crate) async fn await_startup(
    api: &Api,
    out: &Output,
    timeout: Option<Duration>,
) -> Result<(), Failure> {
    let limit = timeout.unwrap_or(Duration::from_secs(300));
    let deadline = Instant::now() + limit;
    loop {
        match api.get("/api/overview").await {
            Ok(_) => return Ok(()),
            Err(Failure::Unavailable(_) | Failure::Timeout(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(Failure::Unavailable(e)) => {
                if !out.quiet && !out.silent {
                    eprintln!("{e}");
                }
                return Err(Failure::Timeout(format!(
                    "the broker at {} did not start within {} s",
                    api.base(),
                    limit.as_secs()
                )));
            }
            Err(e) => return Err(e),
        }
    }
}
