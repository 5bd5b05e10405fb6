//! RabbitMQ's `rabbitmq.conf` (new-style, sysctl-like `key = value` lines,
//! `#` comments) read into the same settings as the TOML config file, for
//! the keys whose settings Warren has: an operator's existing file works
//! with `--config rabbitmq.conf`. A key Warren does not know is an error
//! naming it and its line, never silently ignored.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::{FileAmount, FileConfig};

/// Reads `text` (a whole `rabbitmq.conf`).
pub(crate) fn parse(text: &str) -> Result<FileConfig, String> {
    let mut c = FileConfig::default();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {}: expected `key = value`, got `{line}`",
                n + 1
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        set(&mut c, key, value).map_err(|e| format!("line {}: {key}: {e}", n + 1))?;
    }
    Ok(c)
}

fn number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("`{value}` is not a valid number here"))
}

fn boolean(value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("expected true or false, got `{other}`")),
    }
}

/// A listener's value: a port, or `address:port` (`[::1]:5672` too).
fn listener(value: &str) -> Result<(Option<IpAddr>, u16), String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok((None, port));
    }
    let addr: SocketAddr = value
        .parse()
        .map_err(|_| format!("expected a port or address:port, got `{value}`"))?;
    Ok((Some(addr.ip()), addr.port()))
}

/// A listener's address, if it names one: Warren's AMQP and AMQPS
/// listeners share one address (`bind`), so two different ones are an error
/// rather than one of them silently ignored.
fn listen_on(c: &mut FileConfig, ip: Option<IpAddr>) -> Result<(), String> {
    match (ip, c.bind) {
        (Some(ip), Some(bind)) if ip != bind => Err(format!(
            "Warren's AMQP and AMQPS listeners share one address: {bind} and {ip} differ"
        )),
        (Some(ip), _) => {
            c.bind = Some(ip);
            Ok(())
        }
        (None, _) => Ok(()),
    }
}

/// A RabbitMQ node name `name@host` as a seed's cluster address.
fn seed(node: &str) -> String {
    let host = node.split_once('@').map_or(node, |(_, h)| h);
    format!("{host}:25672")
}

fn set(c: &mut FileConfig, key: &str, value: &str) -> Result<(), String> {
    let path = || Some(PathBuf::from(value));
    match key {
        "listeners.tcp" if value == "none" => c.no_plain_listener = Some(true),
        k if k.starts_with("listeners.tcp.") => {
            if c.port.is_some() {
                return Err(
                    "Warren listens on one AMQP address: give one listeners.tcp key".into(),
                );
            }
            let (ip, port) = listener(value)?;
            c.port = Some(port);
            listen_on(c, ip)?;
        }
        k if k.starts_with("listeners.ssl.") => {
            if c.tls_port.is_some() {
                return Err(
                    "Warren listens on one AMQPS address: give one listeners.ssl key".into(),
                );
            }
            let (ip, port) = listener(value)?;
            c.tls_port = Some(port);
            listen_on(c, ip)?;
        }
        "ssl_options.cacertfile" => c.tls_ca = path(),
        "ssl_options.certfile" => c.tls_cert = path(),
        "ssl_options.keyfile" => c.tls_key = path(),
        "ssl_options.verify" => {
            c.tls_verify_peer = Some(match value {
                "verify_peer" => true,
                "verify_none" => false,
                other => {
                    return Err(format!(
                        "expected verify_peer or verify_none, got `{other}`"
                    ));
                }
            });
        }
        "ssl_options.fail_if_no_peer_cert" => c.tls_fail_if_no_peer_cert = Some(boolean(value)?),
        "vm_memory_high_watermark.relative" => {
            c.memory_high_watermark = Some(FileAmount::OfRam(number(value)?));
        }
        "vm_memory_high_watermark.absolute" => {
            c.memory_high_watermark = Some(FileAmount::Text(value.to_owned()));
        }
        "disk_free_limit.absolute" => c.disk_free_limit = Some(FileAmount::Text(value.to_owned())),
        "disk_free_limit.relative" => c.disk_free_limit = Some(FileAmount::OfRam(number(value)?)),
        // (The RabbitMQ cluster operator for Kubernetes writes it: the
        // container's memory limit.)
        "total_memory_available_override_value" => {
            c.total_memory_available = Some(FileAmount::Text(value.to_owned()));
        }
        "default_user" => c.default_user = Some(value.to_owned()),
        "default_pass" => c.default_pass = Some(value.to_owned()),
        "loopback_users" if value == "none" => c.loopback_users = Some(Vec::new()),
        // `loopback_users.NAME = true` holds NAME to loopback; the list is
        // the names set to true (as RabbitMQ builds it: naming any user
        // replaces the default `guest`).
        k if k.starts_with("loopback_users.") => {
            let name = &k["loopback_users.".len()..];
            let users = c.loopback_users.get_or_insert_with(Vec::new);
            users.retain(|u| u != name);
            if boolean(value)? {
                users.push(name.to_owned());
            }
        }
        "management.tcp.port" => c.management_port = Some(number(value)?),
        "management.tcp.ip" => c.management_bind = Some(number_ip(value)?),
        "prometheus.tcp.port" => c.prometheus_port = Some(number(value)?),
        "prometheus.tcp.ip" => c.prometheus_bind = Some(number_ip(value)?),
        "heartbeat" => c.heartbeat = Some(number(value)?),
        "channel_max" => c.channel_max = Some(number(value)?),
        "frame_max" => c.frame_max = Some(number(value)?),
        "max_message_size" => c.max_message_size = Some(number(value)?),
        // RabbitMQ's `infinity` is Warren's 0, no limit.
        "connection_max" if value == "infinity" => c.max_connections = Some(0),
        "connection_max" => c.max_connections = Some(number(value)?),
        // (RabbitMQ's consumer_timeout is in milliseconds, as Warren's.)
        "consumer_timeout" => c.consumer_timeout = Some(number(value)?),
        // Warren always logs to standard output: `false` cannot be honoured.
        "log.console" => {
            if !boolean(value)? {
                return Err("Warren logs to standard output only: it cannot be turned off".into());
            }
        }
        "log.console.level" => {
            c.log_level = Some(
                match value {
                    "debug" => "debug",
                    "info" | "notice" => "info",
                    "warning" => "warn",
                    "error" | "critical" | "alert" | "emergency" => "error",
                    "none" => "off",
                    other => return Err(format!("unknown log level `{other}`")),
                }
                .to_owned(),
            );
        }
        "log.console.formatter" => {
            c.log_json = Some(match value {
                "json" => true,
                "plaintext" => false,
                other => return Err(format!("expected json or plaintext, got `{other}`")),
            });
        }
        "log.file" if value == "false" => {}
        "load_definitions" => c.load_definitions = path(),
        "cluster_name" => c.cluster_name = Some(value.to_owned()),
        "cluster_formation.peer_discovery_backend" => match value {
            "classic_config"
            | "rabbit_peer_discovery_classic_config"
            | "dns"
            | "rabbit_peer_discovery_dns" => {}
            other => {
                return Err(format!(
                    "Warren discovers peers by classic_config or dns, not `{other}`"
                ));
            }
        },
        k if k.starts_with("cluster_formation.classic_config.nodes.") => {
            c.peers.get_or_insert_with(Vec::new).push(seed(value));
        }
        "cluster_formation.dns.hostname" => {
            c.peer_dns
                .get_or_insert_with(Vec::new)
                .push(value.to_owned());
        }
        _ => {
            return Err(
                "not a setting Warren has (docs/configuration.md lists those it has)".into(),
            );
        }
    }
    Ok(())
}

fn number_ip(value: &str) -> Result<IpAddr, String> {
    value
        .parse()
        .map_err(|_| format!("`{value}` is not an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typical_rabbitmq_conf_is_read() {
        let c = parse(
            "# broker\n\
             listeners.tcp.default = 5673\n\
             listeners.ssl.default = 5671\n\
             ssl_options.cacertfile = /etc/ca.pem\n\
             ssl_options.certfile = /etc/cert.pem\n\
             ssl_options.keyfile = /etc/key.pem\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n\
             vm_memory_high_watermark.relative = 0.6\n\
             disk_free_limit.absolute = 2GB\n\
             default_user = admin\n\
             default_pass = s3cret\n\
             loopback_users.guest = false\n\
             management.tcp.port = 15673\n\
             management.tcp.ip = 127.0.0.1\n\
             prometheus.tcp.port = 15693\n\
             heartbeat = 30\n\
             channel_max = 64\n\
             frame_max = 65536\n\
             max_message_size = 1048576\n\
             consumer_timeout = 900000\n\
             log.console.level = warning\n\
             load_definitions = /etc/definitions.json\n\
             cluster_formation.peer_discovery_backend = classic_config\n\
             cluster_formation.classic_config.nodes.1 = rabbit@host-a\n\
             cluster_formation.classic_config.nodes.2 = rabbit@host-b\n",
        )
        .unwrap();
        assert_eq!(c.port, Some(5673));
        assert_eq!(c.tls_port, Some(5671));
        assert_eq!(c.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.tls_verify_peer, Some(true));
        assert_eq!(c.tls_fail_if_no_peer_cert, Some(true));
        assert!(
            matches!(c.memory_high_watermark, Some(FileAmount::OfRam(f)) if (f - 0.6).abs() < 1e-9)
        );
        assert!(matches!(&c.disk_free_limit, Some(FileAmount::Text(t)) if t == "2GB"));
        assert_eq!(c.default_user.as_deref(), Some("admin"));
        assert_eq!(c.loopback_users, Some(Vec::new()));
        assert_eq!(c.management_port, Some(15673));
        assert_eq!(c.management_bind, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(c.prometheus_port, Some(15693));
        assert_eq!(c.heartbeat, Some(30));
        assert_eq!(c.channel_max, Some(64));
        assert_eq!(c.frame_max, Some(65536));
        assert_eq!(c.max_message_size, Some(1_048_576));
        assert_eq!(c.consumer_timeout, Some(900_000));
        assert_eq!(c.log_level.as_deref(), Some("warn"));
        assert_eq!(
            c.load_definitions,
            Some(PathBuf::from("/etc/definitions.json"))
        );
        assert_eq!(
            c.peers,
            Some(vec!["host-a:25672".to_owned(), "host-b:25672".to_owned()])
        );
    }

    #[test]
    fn an_unknown_key_or_a_bad_value_is_an_error_naming_it() {
        let e = parse("heartbeat = 30\nqueue_master_locator = min-masters\n").unwrap_err();
        assert!(e.starts_with("line 2: queue_master_locator: "), "{e}");
        let e = parse("heartbeat = often\n").unwrap_err();
        assert!(e.contains("line 1: heartbeat: `often`"), "{e}");
        let e = parse("just words\n").unwrap_err();
        assert!(e.contains("expected `key = value`"), "{e}");
        let e = parse("listeners.tcp.1 = 5672\nlisteners.tcp.2 = 5673\n").unwrap_err();
        assert!(e.contains("one AMQP address"), "{e}");
        let e = parse(
            "listeners.tcp.default = 127.0.0.1:5672\nlisteners.ssl.default = 10.0.0.1:5671\n",
        )
        .unwrap_err();
        assert!(e.contains("share one address"), "{e}");
        let e = parse("log.console = false\n").unwrap_err();
        assert!(e.contains("standard output only"), "{e}");
    }

    #[test]
    fn a_listener_may_name_its_address() {
        let c = parse("listeners.tcp.default = 127.0.0.1:5672\n").unwrap();
        assert_eq!(
            (c.bind, c.port),
            (Some("127.0.0.1".parse().unwrap()), Some(5672))
        );
        let c = parse(
            "listeners.ssl.default = 127.0.0.1:5671\nlisteners.tcp.default = 127.0.0.1:5672\n",
        )
        .unwrap();
        assert_eq!(
            (c.bind, c.tls_port),
            (Some("127.0.0.1".parse().unwrap()), Some(5671))
        );
        let c = parse("loopback_users.alice = true\nloopback_users.guest = false\n").unwrap();
        assert_eq!(c.loopback_users, Some(vec!["alice".to_owned()]));
        let c = parse("listeners.tcp.default = [::1]:5672\nloopback_users = none\n").unwrap();
        assert_eq!(c.bind, Some("::1".parse().unwrap()));
        assert_eq!(c.loopback_users, Some(Vec::new()));
        assert_eq!(
            parse("listeners.tcp = none\n").unwrap().no_plain_listener,
            Some(true)
        );
    }
}
