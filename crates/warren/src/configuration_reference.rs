//! `docs/configuration.md`, generated from the settings' own definitions so
//! that it cannot drift: the flags, their environment variables, help texts
//! and headings come from clap (`Args`), the config file keys from the
//! config file struct (`FileConfig`), and the `rabbitmq.conf` keys from the
//! table below, each of which a test feeds to the `rabbitmq.conf` reader.
//!
//! `cargo test -p warren` fails when the file is out of date;
//! `WARREN_WRITE_DOCS=1 cargo test -p warren configuration_reference`
//! rewrites it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clap::CommandFactory;

use super::{Args, FileConfig};

/// What RabbitMQ calls a setting.
enum Rabbit {
    /// `rabbitmq.conf` keys Warren's reader accepts, each with a value to
    /// prove it (a test reads `key = value` and checks the setting is set).
    Conf(&'static [(&'static str, &'static str)]),
    /// RabbitMQ's equivalent outside `rabbitmq.conf`, or why there is none.
    Elsewhere(&'static str),
}

/// `rabbitmq.conf` keys Warren accepts that set none of its settings, each
/// with a value the reader takes (a test checks it).
const ACCEPTED_WITHOUT_SETTING: &[(&str, &str)] = &[
    ("log.console", "true"),
    ("log.file", "false"),
    ("cluster_formation.peer_discovery_backend", "classic_config"),
    ("cluster_formation.peer_discovery_backend", "dns"),
];

/// RabbitMQ's name for every setting (the flag's id). A test fails if a
/// flag is missing here, so a new setting must say how it maps.
const RABBITMQ: &[(&str, Rabbit)] = &[
    (
        "config",
        Rabbit::Elsewhere("`RABBITMQ_CONFIG_FILE` (environment)"),
    ),
    (
        "data_dir",
        Rabbit::Elsewhere("`RABBITMQ_MNESIA_BASE` / `RABBITMQ_MNESIA_DIR` (environment)"),
    ),
    (
        "load_definitions",
        Rabbit::Conf(&[("load_definitions", "/etc/warren/definitions.json")]),
    ),
    (
        "log_level",
        Rabbit::Conf(&[("log.console.level", "warning")]),
    ),
    (
        "log_json",
        Rabbit::Conf(&[("log.console.formatter", "json")]),
    ),
    ("repair_store", Rabbit::Elsewhere("none")),
    (
        "bind",
        Rabbit::Conf(&[("listeners.tcp.default", "127.0.0.1:5672")]),
    ),
    ("port", Rabbit::Conf(&[("listeners.tcp.default", "5672")])),
    (
        "no_plain_listener",
        Rabbit::Conf(&[("listeners.tcp", "none")]),
    ),
    (
        "tls_port",
        Rabbit::Conf(&[("listeners.ssl.default", "5671")]),
    ),
    (
        "tls_cert",
        Rabbit::Conf(&[("ssl_options.certfile", "/etc/warren/server.pem")]),
    ),
    (
        "tls_key",
        Rabbit::Conf(&[("ssl_options.keyfile", "/etc/warren/server.key")]),
    ),
    (
        "tls_ca",
        Rabbit::Conf(&[("ssl_options.cacertfile", "/etc/warren/ca.pem")]),
    ),
    (
        "tls_verify_peer",
        Rabbit::Conf(&[("ssl_options.verify", "verify_peer")]),
    ),
    (
        "tls_fail_if_no_peer_cert",
        Rabbit::Conf(&[("ssl_options.fail_if_no_peer_cert", "true")]),
    ),
    ("heartbeat", Rabbit::Conf(&[("heartbeat", "60")])),
    ("channel_max", Rabbit::Conf(&[("channel_max", "2047")])),
    ("frame_max", Rabbit::Conf(&[("frame_max", "131072")])),
    (
        "max_message_size",
        Rabbit::Conf(&[("max_message_size", "134217728")]),
    ),
    (
        "max_connections",
        Rabbit::Conf(&[("connection_max", "1000"), ("connection_max", "infinity")]),
    ),
    (
        "max_consumers_per_channel",
        Rabbit::Elsewhere("none in 3.10"),
    ),
    (
        "consumer_timeout",
        Rabbit::Conf(&[("consumer_timeout", "1800000")]),
    ),
    (
        "consumer_timeout_cancels_consumer",
        Rabbit::Elsewhere("none (RabbitMQ 3.10 closes the channel)"),
    ),
    ("default_user", Rabbit::Conf(&[("default_user", "guest")])),
    ("default_pass", Rabbit::Conf(&[("default_pass", "guest")])),
    (
        "loopback_users",
        Rabbit::Conf(&[("loopback_users.guest", "true"), ("loopback_users", "none")]),
    ),
    (
        "memory_high_watermark",
        Rabbit::Conf(&[
            ("vm_memory_high_watermark.relative", "0.4"),
            ("vm_memory_high_watermark.absolute", "2GB"),
        ]),
    ),
    (
        "disk_free_limit",
        Rabbit::Conf(&[
            ("disk_free_limit.absolute", "50MB"),
            ("disk_free_limit.relative", "1.5"),
        ]),
    ),
    (
        "total_memory_available",
        Rabbit::Conf(&[("total_memory_available_override_value", "4GB")]),
    ),
    (
        "queue_flow_limit",
        Rabbit::Elsewhere("none (RabbitMQ's internal credit flow)"),
    ),
    (
        "store_backlog_limit",
        Rabbit::Elsewhere("none (RabbitMQ's internal credit flow)"),
    ),
    (
        "management_port",
        Rabbit::Conf(&[("management.tcp.port", "15672")]),
    ),
    (
        "management_bind",
        Rabbit::Conf(&[("management.tcp.ip", "0.0.0.0")]),
    ),
    (
        "no_management",
        Rabbit::Elsewhere("`rabbitmq-plugins disable rabbitmq_management`"),
    ),
    (
        "prometheus_port",
        Rabbit::Conf(&[("prometheus.tcp.port", "15692")]),
    ),
    (
        "prometheus_bind",
        Rabbit::Conf(&[("prometheus.tcp.ip", "0.0.0.0")]),
    ),
    (
        "no_prometheus",
        Rabbit::Elsewhere("`rabbitmq-plugins disable rabbitmq_prometheus`"),
    ),
    (
        "node_name",
        Rabbit::Elsewhere("`RABBITMQ_NODENAME` (environment)"),
    ),
    ("cluster_name", Rabbit::Conf(&[("cluster_name", "prod")])),
    (
        "cluster_port",
        Rabbit::Elsewhere("`RABBITMQ_DIST_PORT` (environment; 25672 by default in both)"),
    ),
    (
        "peers",
        Rabbit::Conf(&[("cluster_formation.classic_config.nodes.1", "rabbit@host-a")]),
    ),
    (
        "peer_dns",
        Rabbit::Conf(&[("cluster_formation.dns.hostname", "warren.default.svc")]),
    ),
    (
        "cluster_secret_file",
        Rabbit::Elsewhere("the Erlang cookie (`~/.erlang.cookie`, `RABBITMQ_ERLANG_COOKIE`)"),
    ),
    (
        "cluster_tls_cert",
        Rabbit::Elsewhere("inter-node TLS (`inter_node_tls.config`)"),
    ),
    (
        "cluster_tls_key",
        Rabbit::Elsewhere("inter-node TLS (`inter_node_tls.config`)"),
    ),
    (
        "cluster_tls_ca",
        Rabbit::Elsewhere("inter-node TLS (`inter_node_tls.config`)"),
    ),
];

/// One setting as the reference shows it.
struct Setting {
    id: String,
    heading: String,
    flag: String,
    env: Option<String>,
    file_key: Option<String>,
    rabbitmq: String,
    default: String,
    meaning: String,
}

/// The config file's keys (every field of `FileConfig`, serialized empty).
fn file_keys() -> Vec<String> {
    match serde_json::to_value(FileConfig::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        other => panic!("FileConfig serializes as a map, not {other:?}"),
    }
}

/// The help text's `[default: X]`, and the text without it.
fn split_default(help: &str) -> (String, Option<String>) {
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(at) = help.find("[default: ") else {
        return (help, None);
    };
    let rest = &help[at + "[default: ".len()..];
    let Some(close) = rest.find(']') else {
        return (help, None);
    };
    let text = format!("{}{}", help[..at].trim_end(), &rest[close + 1..]);
    (text, Some(rest[..close].to_owned()))
}

fn settings() -> Vec<Setting> {
    let keys = file_keys();
    let rabbit: BTreeMap<&str, &Rabbit> = RABBITMQ.iter().map(|(id, r)| (*id, r)).collect();
    let command = Args::command();
    let mut out = Vec::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let Some(long) = arg.get_long() else {
            panic!("setting {id} has no long flag")
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let (meaning, default) = split_default(&help);
        let takes_value = arg.get_action().takes_values();
        let default = match default {
            Some(d) => d,
            None if !takes_value => "off".to_owned(),
            None => "none".to_owned(),
        };
        let flag = if takes_value {
            let value = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map(|v| v.to_string())
                .unwrap_or_else(|| id.to_uppercase());
            format!("--{long} {value}")
        } else {
            format!("--{long}")
        };
        let rabbitmq = match rabbit.get(id) {
            Some(Rabbit::Conf(pairs)) => pairs
                .iter()
                .map(|(k, v)| format!("`{k} = {v}`"))
                .collect::<Vec<_>>()
                .join("<br>"),
            Some(Rabbit::Elsewhere(text)) => format!("*{text}*"),
            None => panic!("setting {id} is missing from configuration_reference::RABBITMQ"),
        };
        out.push(Setting {
            id: id.to_owned(),
            heading: arg
                .get_help_heading()
                .unwrap_or_else(|| panic!("setting {id} has no help_heading"))
                .to_owned(),
            flag,
            env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            file_key: keys.iter().find(|k| k.as_str() == id).cloned(),
            rabbitmq,
            default,
            meaning,
        });
    }
    out
}

/// A default as code, unless it is a phrase (or `none`, `off`).
fn default_cell(default: &str) -> String {
    if default == "none" || default == "off" || default.contains([' ', '`']) {
        default.to_owned()
    } else {
        format!("`{default}`")
    }
}

/// The sentence naming [`ACCEPTED_WITHOUT_SETTING`].
fn accepted_without_setting() -> String {
    let pairs: Vec<String> = ACCEPTED_WITHOUT_SETTING
        .iter()
        .map(|(k, v)| format!("`{k} = {v}`"))
        .collect();
    format!(
        "It also accepts {}, which change nothing in Warren.",
        pairs.join(", ")
    )
}

/// `|` inside a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The whole of `docs/configuration.md`.
fn render() -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "<!-- Generated from the code by crates/warren/src/configuration_reference.rs: do not edit.\n     \
         WARREN_WRITE_DOCS=1 cargo test -p warren configuration_reference rewrites it. -->\n\n\
         # Configuration\n\n\
         Every setting of `warren` has a command-line flag, an environment variable and a key\n\
         in the config file; a flag wins over the environment, which wins over the file, which\n\
         wins over the default. `warren --help` prints the same list.\n\n\
         The config file (`--config FILE`) is TOML, with the keys below:\n\n\
         ```toml\n\
         data_dir = \"/var/lib/warren\"\n\
         port = 5672\n\
         memory_high_watermark = 0.4          # a fraction of RAM (with a decimal point), or \"2GB\"\n\
         disk_free_limit = \"2GB\"\n\
         loopback_users = []                  # let guest log in from other hosts\n\
         ```\n\n\
         A file whose name ends in `.conf` is read as RabbitMQ's `rabbitmq.conf` instead.\n\
         The *RabbitMQ* column shows, as `key = value`, the `rabbitmq.conf` keys Warren reads\n\
         for each setting; in italics, RabbitMQ's equivalent that Warren does not read (an\n\
         environment variable, a plugin, the Erlang cookie), for reference. {accepted}\n\
         An existing file works unchanged as long as it only uses those keys: a key Warren\n\
         does not have, in either format, stops the broker with an error naming it (and its\n\
         line), rather than being ignored.\n\n\
         Flags that switch something on (`--log-json`, `--no-management`, ...) take no value;\n\
         as environment variables and file keys they take `true` or `false` (the environment\n\
         also `1` or `0`). Sizes (`memory_high_watermark`, `disk_free_limit`) are written as\n\
         RabbitMQ writes them: octets, `512MiB`, `2GB`, or a fraction or multiple of RAM. In\n\
         the TOML file a number with a decimal point is a fraction or multiple of RAM (`0.4`,\n\
         `1.0`) and a whole number is octets (`1` is one octet, not all of RAM).\n\
         Settings that take a list (`--peer`, `--peer-dns`, `--loopback-users`) repeat the flag\n\
         or separate values with commas; in the file they are TOML arrays.\n",
        accepted = accepted_without_setting(),
    ));
    let mut heading = String::new();
    for s in settings() {
        if s.heading != heading {
            heading = s.heading.clone();
            let _ = write!(
                md,
                "\n## {heading}\n\n\
                 | Flag | Environment | Config file key | RabbitMQ | Default | Meaning |\n\
                 |---|---|---|---|---|---|\n"
            );
        }
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} |",
            s.flag,
            s.env.map_or("—".to_owned(), |e| format!("`{e}`")),
            s.file_key
                .map_or("— (flag only)".to_owned(), |k| format!("`{k}`")),
            cell(&s.rabbitmq),
            cell(&default_cell(&s.default)),
            cell(&s.meaning),
        );
    }
    md
}

fn doc_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md")
}

#[test]
fn configuration_reference_is_up_to_date() {
    let rendered = render();
    let path = doc_path();
    if std::env::var_os("WARREN_WRITE_DOCS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{} is out of date: run WARREN_WRITE_DOCS=1 cargo test -p warren configuration_reference",
        path.display()
    );
}

#[test]
fn every_config_file_key_is_a_flag_and_every_mapping_names_a_flag() {
    let ids: Vec<String> = settings().into_iter().map(|s| s.id).collect();
    for key in file_keys() {
        assert!(
            ids.contains(&key),
            "config file key {key} has no flag of the same name"
        );
    }
    for (id, _) in RABBITMQ {
        assert!(
            ids.iter().any(|i| i == id),
            "RABBITMQ names {id}, which is no flag"
        );
    }
}

#[test]
fn every_rabbitmq_conf_key_listed_sets_its_setting() {
    for (id, rabbit) in RABBITMQ {
        let Rabbit::Conf(pairs) = rabbit else {
            continue;
        };
        for (key, value) in *pairs {
            let parsed = super::rabbitmq_conf::parse(&format!("{key} = {value}\n"))
                .unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
            let json = serde_json::to_value(&parsed).unwrap();
            assert!(
                !json[*id].is_null(),
                "`{key} = {value}` does not set {id}: {json}"
            );
        }
    }
}

#[test]
fn keys_accepted_without_a_setting_are_accepted() {
    for (key, value) in ACCEPTED_WITHOUT_SETTING {
        super::rabbitmq_conf::parse(&format!("{key} = {value}\n"))
            .unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
    }
}

#[test]
fn documented_defaults_are_the_defaults() {
    let c = super::config(
        <Args as clap::Parser>::parse_from(["warren"]),
        FileConfig::default(),
    )
    .unwrap();
    let numbers: BTreeMap<&str, u64> = [
        ("port", u64::from(c.bind.port())),
        ("max_message_size", c.max_message_size),
        ("heartbeat", u64::from(c.heartbeat)),
        ("channel_max", u64::from(c.channel_max)),
        ("frame_max", u64::from(c.frame_max)),
        ("consumer_timeout", c.consumer_timeout.as_millis() as u64),
        ("queue_flow_limit", c.queue_flow_limit),
        ("store_backlog_limit", c.store_backlog_limit),
        ("max_connections", c.max_connections as u64),
        (
            "max_consumers_per_channel",
            c.max_consumers_per_channel as u64,
        ),
        ("management_port", u64::from(c.management.unwrap().port())),
        ("prometheus_port", u64::from(c.prometheus.unwrap().port())),
    ]
    .into_iter()
    .collect();
    let all = settings();
    for (id, value) in numbers {
        let s = all.iter().find(|s| s.id == id).unwrap();
        assert_eq!(s.default, value.to_string(), "documented default of {id}");
    }
    let s = |id: &str| all.iter().find(|s| s.id == id).unwrap().default.clone();
    assert_eq!(s("data_dir"), c.data_dir.display().to_string());
    assert_eq!(s("default_user"), c.default_user);
    assert_eq!(s("default_pass"), c.default_pass);
    assert_eq!(
        c.loopback_users.join(","),
        s("loopback_users").trim_matches('`')
    );
    assert!(c.plain_listener && s("no_plain_listener") == "off");
}

#[test]
fn the_example_config_file_is_read() {
    let md = render();
    let start = md.find("```toml\n").unwrap() + "```toml\n".len();
    let end = start + md[start..].find("```").unwrap();
    let file: FileConfig = toml::from_str(&md[start..end]).unwrap();
    let c = super::config(<Args as clap::Parser>::parse_from(["warren"]), file).unwrap();
    assert_eq!(c.data_dir, std::path::PathBuf::from("/var/lib/warren"));
    assert_eq!(c.disk_free_limit, 2_000_000_000);
    assert!(c.loopback_users.is_empty());
}
