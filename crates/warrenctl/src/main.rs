//! `warrenctl`: operate a Warren broker the way `rabbitmqctl` operates
//! RabbitMQ — list queues, exchanges, bindings, connections, consumers, users,
//! vhosts and permissions (with column selection), manage users, vhosts and
//! permissions, set and clear policies, purge and delete queues, close
//! connections, export and import definitions, turn a vhost's firehose on
//! and off (`trace_on` / `trace_off`), and move the alarm limits at run time
//! (`set_vm_memory_high_watermark`, `set_disk_free_limit`) — by talking to
//! the broker's management HTTP API.
//!
//! Output is tab-separated with a header line (as `rabbitmqctl`), or JSON
//! with `--formatter json`. Exit codes: 0 success, 1 the broker refused
//! (the API's reason is printed), 2 bad usage, 69 the broker cannot be reached.

use std::process::ExitCode;

/// `println!` that survives a closed pipe (see [`print_line`]).
macro_rules! out {
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*))
    };
}

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "warrenctl",
    version,
    about = "Operate a Warren broker through its management API"
)]
struct Cli {
    /// Management API base URL.
    #[arg(
        long,
        env = "WARRENCTL_URL",
        default_value = "http://localhost:15672",
        global = true
    )]
    url: String,
    /// User to authenticate as (needs the administrator tag to change things).
    #[arg(
        long,
        env = "WARRENCTL_USERNAME",
        default_value = "guest",
        global = true
    )]
    username: String,
    /// Its password.
    #[arg(
        long,
        env = "WARRENCTL_PASSWORD",
        default_value = "guest",
        global = true
    )]
    password: String,
    /// Virtual host for commands that act in one.
    #[arg(short = 'p', long = "vhost", default_value = "/", global = true)]
    vhost: String,
    /// Output format.
    #[arg(long, value_parser = ["table", "json"], default_value = "table", global = true)]
    formatter: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[command(rename_all = "snake_case")]
enum Command {
    /// Queues of the vhost [default columns: name messages].
    ListQueues { columns: Vec<String> },
    /// Exchanges of the vhost [name type].
    ListExchanges { columns: Vec<String> },
    /// Bindings of the vhost [source_name source_kind destination_name destination_kind routing_key arguments].
    ListBindings { columns: Vec<String> },
    /// Client connections [user peer_host peer_port state].
    ListConnections { columns: Vec<String> },
    /// Consumers of the vhost [queue_name channel_pid consumer_tag ack_required prefetch_count active arguments].
    ListConsumers { columns: Vec<String> },
    /// Users [user tags].
    ListUsers,
    /// Virtual hosts [name].
    ListVhosts,
    /// Permissions in the vhost [user configure write read].
    ListPermissions,
    /// Adds a user.
    AddUser {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: String,
    },
    /// Deletes a user.
    DeleteUser { name: String },
    /// Changes a user's password.
    ChangePassword {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: String,
    },
    /// Replaces a user's tags.
    SetUserTags { name: String, tags: Vec<String> },
    /// Sets a user's permissions in the vhost (regular expressions).
    SetPermissions {
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    /// Removes a user's permissions in the vhost.
    ClearPermissions { user: String },
    /// Adds a virtual host (through the management API, which, as
    /// RabbitMQ's, gives the calling user full permissions on it).
    AddVhost { name: String },
    /// Deletes a virtual host and everything in it.
    DeleteVhost { name: String },
    /// Sets a policy in the vhost: a regular expression on names and a JSON
    /// definition, e.g. `set_policy cap '^orders\.' '{"max-length":1000}'`.
    SetPolicy {
        name: String,
        pattern: String,
        definition: String,
        /// Higher wins when several policies match.
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// queues, exchanges or all.
        #[arg(long = "apply-to", default_value = "all")]
        apply_to: String,
    },
    /// Removes a policy from the vhost.
    ClearPolicy { name: String },
    /// Policies of the vhost [vhost name pattern apply-to definition priority].
    ListPolicies,
    /// Sets the vhost's limits from a JSON object, replacing any others, e.g.
    /// `set_vhost_limits '{"max-connections": 64, "max-queues": 256}'`
    /// (a negative value means no limit).
    SetVhostLimits { definition: String },
    /// Lifts every limit of the vhost.
    ClearVhostLimits,
    /// The vhost's limits, as JSON [vhost value].
    ListVhostLimits,
    /// Removes every ready message of a queue.
    PurgeQueue { name: String },
    /// Deletes a queue.
    DeleteQueue { name: String },
    /// Closes a connection (by the name `list_connections name` shows).
    CloseConnection {
        name: String,
        reason: Option<String>,
    },
    /// Writes the broker's definitions (RabbitMQ's JSON format) to a file, `-` for stdout.
    ExportDefinitions { file: String },
    /// Imports definitions from a file (RabbitMQ's JSON format), `-` for stdin.
    ImportDefinitions { file: String },
    /// Broker overview: version, object totals, alarms.
    Status,
    /// The cluster's name and nodes: running or not, and each one's part in
    /// the metadata group (leader, voter, learner).
    ClusterStatus,
    /// Gives NODE a replica of replicated queue QUEUE in the vhost
    /// (rabbitmq-queues add_member): it catches up, then votes.
    AddMember { queue: String, node: String },
    /// Removes NODE's replica of replicated queue QUEUE in the vhost
    /// (rabbitmq-queues delete_member).
    DeleteMember { queue: String, node: String },
    /// Gives NODE a replica of every replicated queue (`all`) or of those
    /// with an even number of replicas (`even`) that it has none of, in
    /// the vhosts and queues the patterns match (rabbitmq-queues grow).
    Grow {
        node: String,
        #[arg(value_parser = ["all", "even"])]
        strategy: String,
        /// Vhosts whose queues grow (a regular expression).
        #[arg(long, default_value = ".*")]
        vhost_pattern: String,
        /// Queues that grow (a regular expression).
        #[arg(long, default_value = ".*")]
        queue_pattern: String,
    },
    /// Removes NODE's replica of every replicated queue it has one of
    /// (rabbitmq-queues shrink).
    Shrink {
        node: String,
        /// Lists only the queues whose replica could not be removed.
        #[arg(long)]
        errors_only: bool,
    },
    /// Fails (exit status 69, as rabbitmq-queues) if stopping this node
    /// would leave a replicated queue without a majority of its replicas
    /// online; lists those queues.
    CheckIfNodeIsQuorumCritical,
    /// Removes a node from the cluster for good; it cannot rejoin under the
    /// same identity (reset its data directory to join again as new).
    ForgetClusterNode { node: String },
    /// Makes this node a member of NODE's cluster (its cluster address
    /// host:port, or its name name@host on the default cluster port 25672).
    /// The node is reset first, as by rabbitmqctl reset: it keeps none of
    /// its definitions (refused while it holds a durable queue), restarts
    /// and joins; waits until it serves as a member.
    JoinCluster { node: String },
    /// Turns the vhost's firehose on: copies of every message published and
    /// delivered go to its `amq.rabbitmq.trace` exchange (until trace_off or
    /// a restart).
    TraceOn,
    /// Turns the vhost's firehose off.
    TraceOff,
    /// Sets the memory high watermark now (until a restart): a fraction of
    /// RAM (`0.4`), or `absolute <amount>` (`absolute 2GB`). `0` raises the
    /// memory alarm at once, for drills.
    SetVmMemoryHighWatermark {
        /// A fraction of RAM, or the word `absolute`.
        #[arg(value_name = "FRACTION|absolute")]
        value: String,
        /// The amount after `absolute` (octets or with a unit: 2GB, 512MiB).
        #[arg(value_name = "AMOUNT")]
        amount: Option<String>,
    },
    /// Sets the free disk space limit now (until a restart): an amount
    /// (`50MB`, `2GB`) or `mem_relative <fraction>` of RAM.
    SetDiskFreeLimit {
        /// An amount, or the word `mem_relative`.
        #[arg(value_name = "AMOUNT|mem_relative")]
        value: String,
        /// The fraction of RAM after `mem_relative`.
        #[arg(value_name = "FRACTION")]
        fraction: Option<String>,
    },
}

/// The JSON body of a limit: `{"absolute": amount}` or `{relative: f}`
/// when the first word is `keyword` (rabbitmqctl's forms).
fn limit_body(
    first: &str,
    second: Option<&str>,
    keyword: &str,
    relative: &str,
) -> Result<Value, Failure> {
    let number = |s: &str| {
        s.parse::<f64>()
            .map_err(|_| Failure::Local(format!("'{s}' is not a number")))
    };
    match (first, second) {
        (word, Some(value)) if word == keyword => Ok(if keyword == "absolute" {
            json!({ "absolute": value })
        } else {
            json!({ relative: number(value)? })
        }),
        (word, None) if word == keyword => Err(Failure::Local(format!(
            "'{keyword}' needs a value after it"
        ))),
        (value, None) if keyword == "absolute" => Ok(json!({ relative: number(value)? })),
        (value, None) => Ok(json!({ "absolute": value })),
        (value, Some(extra)) => Err(Failure::Local(format!(
            "unexpected '{extra}' after '{value}'"
        ))),
    }
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
enum Failure {
    /// The broker refused: status and reason.
    Refused(u16, String),
    /// The broker cannot be reached.
    Unreachable(String),
    /// A local problem (a file).
    Local(String),
    /// A health check failed: the node is quorum critical.
    QuorumCritical(String),
}

impl Failure {
    fn exit(&self) -> ExitCode {
        match self {
            Failure::Refused(..) => ExitCode::from(1),
            Failure::Local(_) => ExitCode::from(1),
            Failure::Unreachable(_) | Failure::QuorumCritical(_) => ExitCode::from(69),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(status, reason) => write!(f, "Error ({status}): {reason}"),
            Failure::Unreachable(e) => write!(f, "Error: unable to reach the management API: {e}"),
            Failure::Local(e) | Failure::QuorumCritical(e) => write!(f, "Error: {e}"),
        }
    }
}

struct Api {
    base: String,
    user: String,
    pass: String,
    http: reqwest::Client,
}

/// The limits a vhost can have (RabbitMQ's names).
const VHOST_LIMITS: [&str; 2] = ["max-connections", "max-queues"];

/// Percent-encodes one path segment (vhost `/` becomes `%2F`).
fn seg(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        reason: Option<&str>,
    ) -> Result<Value, Failure> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base.trim_end_matches('/')))
            .basic_auth(&self.user, Some(&self.pass));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(r) = reason {
            req = req.header("X-Reason", r);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            Ok(json)
        } else {
            let reason = json
                .get("reason")
                .and_then(Value::as_str)
                .map_or_else(|| json.to_string(), str::to_owned);
            Err(Failure::Refused(status.as_u16(), reason))
        }
    }

    /// `GET` whatever the status: the status and the JSON body.
    async fn get_with_status(&self, path: &str) -> Result<(u16, Value), Failure> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base.trim_end_matches('/')))
            .basic_auth(&self.user, Some(&self.pass))
            .send()
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .json()
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        Ok((status, body))
    }

    async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    async fn put(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(reqwest::Method::PUT, path, Some(body), None)
            .await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(reqwest::Method::POST, path, Some(body), None)
            .await
    }

    async fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.call(reqwest::Method::DELETE, path, None, None).await
    }
}

/// A column of a listing: rabbitmqctl's name and where it is in the JSON.
fn column(row: &Value, name: &str) -> String {
    let v = match name {
        "source_name" => &row["source"],
        "source_kind" => return "exchange".into(),
        "destination_name" => &row["destination"],
        "destination_kind" => &row["destination_type"],
        "queue_name" => &row["queue"]["name"],
        "channel_pid" => &row["channel_details"]["name"],
        "user" if row.get("user").is_none() => &row["name"],
        other => &row[other],
    };
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => {
            let items: Vec<String> = a
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

fn print_rows(rows: &Value, columns: &[String], defaults: &[&str], json_out: bool) {
    let columns: Vec<String> = if columns.is_empty() {
        defaults.iter().map(|c| (*c).to_owned()).collect()
    } else {
        columns.to_vec()
    };
    let rows = rows.as_array().cloned().unwrap_or_default();
    if json_out {
        let out: Vec<Value> = rows
            .iter()
            .map(|r| {
                Value::Object(
                    columns
                        .iter()
                        .map(|c| (c.clone(), Value::String(column(r, c))))
                        .collect(),
                )
            })
            .collect();
        out!("{}", Value::Array(out));
        return;
    }
    out!("{}", columns.join("\t"));
    for r in &rows {
        let cells: Vec<String> = columns.iter().map(|c| column(r, c)).collect();
        out!("{}", cells.join("\t"));
    }
}

/// Every replicated queue of the cluster: vhost, name, members.
async fn replicated_queues(api: &Api) -> Result<Vec<(String, String, Vec<String>)>, Failure> {
    let all = api.get("/api/queues").await?;
    Ok(all
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|q| {
            let members = q["members"].as_array()?;
            Some((
                column(q, "vhost"),
                column(q, "name"),
                members
                    .iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect(),
            ))
        })
        .collect())
}

/// One queue's row of `grow` or `shrink`: vhost, name, its size (after
/// the change if it was made, before if not), result.
fn membership_change<T>(
    vhost: String,
    name: String,
    (before, after): (usize, usize),
    result: Result<T, Failure>,
) -> [String; 4] {
    match result {
        Ok(_) => [vhost, name, after.to_string(), "ok".into()],
        Err(e) => [vhost, name, before.to_string(), format!("error: {e}")],
    }
}

/// Prints `grow`'s or `shrink`'s rows as rabbitmq-queues does.
fn print_membership_changes(rows: &[[String; 4]], errors_only: bool, json_out: bool) {
    let rows = rows.iter().filter(|r| !errors_only || r[3] != "ok");
    if json_out {
        let out: Vec<Value> = rows
            .map(|[vhost, name, size, result]| {
                json!({"vhost": vhost, "name": name, "size": size, "result": result})
            })
            .collect();
        out!("{}", Value::Array(out));
        return;
    }
    out!("vhost\tname\tsize\tresult");
    for r in rows {
        out!("{}", r.join("\t"));
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let api = Api {
        base: cli.url.clone(),
        user: cli.username.clone(),
        pass: cli.password.clone(),
        http: reqwest::Client::new(),
    };
    let vh = seg(&cli.vhost);
    let json_out = cli.formatter == "json";
    match cli.command {
        Command::ListQueues { columns } => {
            let rows = api.get(&format!("/api/queues/{vh}")).await?;
            print_rows(&rows, &columns, &["name", "messages"], json_out);
        }
        Command::ListExchanges { columns } => {
            let rows = api.get(&format!("/api/exchanges/{vh}")).await?;
            print_rows(&rows, &columns, &["name", "type"], json_out);
        }
        Command::ListBindings { columns } => {
            let rows = api.get(&format!("/api/bindings/{vh}")).await?;
            let defaults = [
                "source_name",
                "source_kind",
                "destination_name",
                "destination_kind",
                "routing_key",
                "arguments",
            ];
            print_rows(&rows, &columns, &defaults, json_out);
        }
        Command::ListConnections { columns } => {
            let rows = api.get("/api/connections").await?;
            let defaults = ["user", "peer_host", "peer_port", "state"];
            print_rows(&rows, &columns, &defaults, json_out);
        }
        Command::ListConsumers { columns } => {
            let all = api.get("/api/consumers").await?;
            let rows: Vec<Value> = all
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|c| c["queue"]["vhost"] == cli.vhost.as_str())
                .collect();
            let defaults = [
                "queue_name",
                "channel_pid",
                "consumer_tag",
                "ack_required",
                "prefetch_count",
                "active",
                "arguments",
            ];
            print_rows(&Value::Array(rows), &columns, &defaults, json_out);
        }
        Command::ListUsers => {
            let rows = api.get("/api/users").await?;
            print_rows(&rows, &[], &["user", "tags"], json_out);
        }
        Command::ListVhosts => {
            let rows = api.get("/api/vhosts").await?;
            print_rows(&rows, &[], &["name"], json_out);
        }
        Command::ListPermissions => {
            let all = api.get("/api/permissions").await?;
            let rows: Vec<Value> = all
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p["vhost"] == cli.vhost.as_str())
                .collect();
            let defaults = ["user", "configure", "write", "read"];
            print_rows(&Value::Array(rows), &[], &defaults, json_out);
        }
        Command::AddUser { name, new_password } => {
            let path = format!("/api/users/{}", seg(&name));
            if api.get(&path).await.is_ok() {
                return Err(Failure::Refused(
                    409,
                    format!("user '{name}' already exists"),
                ));
            }
            api.put(&path, json!({"password": new_password, "tags": ""}))
                .await?;
            eprintln!("Adding user \"{name}\" ...");
        }
        Command::DeleteUser { name } => {
            api.delete(&format!("/api/users/{}", seg(&name))).await?;
            eprintln!("Deleting user \"{name}\" ...");
        }
        Command::ChangePassword { name, new_password } => {
            let path = format!("/api/users/{}", seg(&name));
            let user = api.get(&path).await?;
            api.put(
                &path,
                json!({"password": new_password, "tags": user["tags"]}),
            )
            .await?;
            eprintln!("Changing password for user \"{name}\" ...");
        }
        Command::SetUserTags { name, tags } => {
            let path = format!("/api/users/{}", seg(&name));
            let user = api.get(&path).await?;
            let hash = user["password_hash"].clone();
            api.put(&path, json!({"password_hash": hash, "tags": tags}))
                .await?;
            eprintln!("Setting tags for user \"{name}\" to {tags:?} ...");
        }
        Command::SetPermissions {
            user,
            configure,
            write,
            read,
        } => {
            api.put(
                &format!("/api/permissions/{vh}/{}", seg(&user)),
                json!({"configure": configure, "write": write, "read": read}),
            )
            .await?;
            eprintln!(
                "Setting permissions for user \"{user}\" in vhost \"{}\" ...",
                cli.vhost
            );
        }
        Command::ClearPermissions { user } => {
            api.delete(&format!("/api/permissions/{vh}/{}", seg(&user)))
                .await?;
            eprintln!(
                "Clearing permissions for user \"{user}\" in vhost \"{}\" ...",
                cli.vhost
            );
        }
        Command::AddVhost { name } => {
            api.put(&format!("/api/vhosts/{}", seg(&name)), json!({}))
                .await?;
            eprintln!("Adding vhost \"{name}\" ...");
        }
        Command::DeleteVhost { name } => {
            api.delete(&format!("/api/vhosts/{}", seg(&name))).await?;
            eprintln!("Deleting vhost \"{name}\" ...");
        }
        Command::SetPolicy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
        } => {
            let definition: Value = serde_json::from_str(&definition)
                .map_err(|e| Failure::Local(format!("definition is not JSON: {e}")))?;
            api.put(
                &format!("/api/policies/{vh}/{}", seg(&name)),
                json!({"pattern": pattern, "definition": definition, "priority": priority, "apply-to": apply_to}),
            )
            .await?;
            eprintln!("Setting policy \"{name}\" for pattern \"{pattern}\" ...");
        }
        Command::ClearPolicy { name } => {
            api.delete(&format!("/api/policies/{vh}/{}", seg(&name)))
                .await?;
            eprintln!("Clearing policy \"{name}\" ...");
        }
        Command::SetVhostLimits { definition } => {
            let limits: Value = serde_json::from_str(&definition)
                .map_err(|e| Failure::Local(format!("limits are not JSON: {e}")))?;
            let Some(limits) = limits.as_object() else {
                return Err(Failure::Local("limits must be a JSON object".into()));
            };
            // Checked whole before anything is applied, as rabbitmqctl does.
            for (name, value) in limits {
                if !VHOST_LIMITS.contains(&name.as_str()) {
                    return Err(Failure::Local(format!(
                        "unknown vhost limit '{name}' (known: {})",
                        VHOST_LIMITS.join(", ")
                    )));
                }
                if value.as_i64().is_none() {
                    return Err(Failure::Local(format!(
                        "limit '{name}' must be an integer, not {value}"
                    )));
                }
            }
            eprintln!(
                "Applying limits to vhost \"{}\": {definition} ...",
                cli.vhost
            );
            for (name, value) in limits {
                api.put(
                    &format!("/api/vhost-limits/{vh}/{}", seg(name)),
                    json!({ "value": value }),
                )
                .await?;
            }
            for name in VHOST_LIMITS.iter().filter(|n| !limits.contains_key(**n)) {
                api.delete(&format!("/api/vhost-limits/{vh}/{name}"))
                    .await?;
            }
        }
        Command::ClearVhostLimits => {
            eprintln!("Clearing limits of vhost \"{}\" ...", cli.vhost);
            for name in VHOST_LIMITS {
                api.delete(&format!("/api/vhost-limits/{vh}/{name}"))
                    .await?;
            }
        }
        Command::ListVhostLimits => {
            let rows = api.get(&format!("/api/vhost-limits/{vh}")).await?;
            print_rows(&rows, &[], &["vhost", "value"], json_out);
        }
        Command::ListPolicies => {
            let rows = api.get(&format!("/api/policies/{vh}")).await?;
            let defaults = [
                "vhost",
                "name",
                "pattern",
                "apply-to",
                "definition",
                "priority",
            ];
            print_rows(&rows, &[], &defaults, json_out);
        }
        Command::PurgeQueue { name } => {
            api.delete(&format!("/api/queues/{vh}/{}/contents", seg(&name)))
                .await?;
            eprintln!("Purging queue '{name}' in vhost '{}' ...", cli.vhost);
        }
        Command::DeleteQueue { name } => {
            api.delete(&format!("/api/queues/{vh}/{}", seg(&name)))
                .await?;
            eprintln!("Deleting queue '{name}' on vhost '{}' ...", cli.vhost);
        }
        Command::CloseConnection { name, reason } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("/api/connections/{}", seg(&name)),
                None,
                reason.as_deref(),
            )
            .await?;
            eprintln!("Closing connection {name} ...");
        }
        Command::ExportDefinitions { file } => {
            let defs = api.get("/api/definitions").await?;
            let text =
                serde_json::to_string_pretty(&defs).map_err(|e| Failure::Local(e.to_string()))?;
            if file == "-" {
                out!("{text}");
            } else {
                std::fs::write(&file, text + "\n")
                    .map_err(|e| Failure::Local(format!("{file}: {e}")))?;
                eprintln!("Exported definitions to {file}");
            }
        }
        Command::ImportDefinitions { file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| Failure::Local(format!("stdin: {e}")))?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| Failure::Local(format!("{file}: {e}")))?
            };
            let defs: Value =
                serde_json::from_str(&text).map_err(|e| Failure::Local(format!("{file}: {e}")))?;
            api.call(reqwest::Method::POST, "/api/definitions", Some(defs), None)
                .await?;
            eprintln!("Imported definitions from {file}");
        }
        Command::TraceOn | Command::TraceOff => {
            let on = matches!(cli.command, Command::TraceOn);
            // (The vhost must exist: PUT alone would create it.)
            api.get(&format!("/api/vhosts/{vh}")).await?;
            api.put(&format!("/api/vhosts/{vh}"), json!({ "tracing": on }))
                .await?;
            eprintln!(
                "{} tracing for vhost \"{}\" ...",
                if on { "Starting" } else { "Stopping" },
                cli.vhost
            );
        }
        Command::SetVmMemoryHighWatermark { value, amount } => {
            let body = limit_body(&value, amount.as_deref(), "absolute", "fraction")?;
            let node = api.get("/api/overview").await?;
            let node = seg(&column(&node, "node"));
            api.put(&format!("/api/nodes/{node}/vm_memory_high_watermark"), body)
                .await?;
            eprintln!("Setting memory threshold on {} to {value} ...", cli.url);
        }
        Command::SetDiskFreeLimit { value, fraction } => {
            let body = limit_body(&value, fraction.as_deref(), "mem_relative", "mem_relative")?;
            let node = api.get("/api/overview").await?;
            let node = seg(&column(&node, "node"));
            api.put(&format!("/api/nodes/{node}/disk_free_limit"), body)
                .await?;
            eprintln!("Setting disk free limit on {} to {value} ...", cli.url);
        }
        Command::ClusterStatus => {
            let name = api.get("/api/cluster-name").await?;
            let nodes = api.get("/api/nodes").await?;
            if json_out {
                out!("{}", json!({"cluster_name": name["name"], "nodes": nodes}));
            } else {
                out!("cluster\t{}", column(&name, "name"));
                for n in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
                    let running = if n["running"] == json!(true) {
                        "running"
                    } else {
                        "down"
                    };
                    let role = n["metadata_role"].as_str().unwrap_or("single");
                    out!("node\t{}\t{running}\t{role}", column(n, "name"));
                }
            }
        }
        Command::AddMember { queue, node } => {
            api.post(
                &format!("/api/queues/quorum/{vh}/{}/replicas/add", seg(&queue)),
                json!({ "node": node }),
            )
            .await?;
        }
        Command::DeleteMember { queue, node } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("/api/queues/quorum/{vh}/{}/replicas/delete", seg(&queue)),
                Some(json!({ "node": node })),
                None,
            )
            .await?;
        }
        Command::Grow {
            node,
            strategy,
            vhost_pattern,
            queue_pattern,
        } => {
            let pattern = |p: &str| {
                regex::Regex::new(p).map_err(|e| Failure::Local(format!("pattern '{p}': {e}")))
            };
            let (vhosts, queues) = (pattern(&vhost_pattern)?, pattern(&queue_pattern)?);
            let replicated = replicated_queues(&api).await?;
            let chosen = replicated.into_iter().filter(|(vhost, name, members)| {
                vhosts.is_match(vhost)
                    && queues.is_match(name)
                    && !members.contains(&node)
                    && (strategy == "all" || members.len() % 2 == 0)
            });
            let mut results = Vec::new();
            for (vhost, name, members) in chosen {
                let path = format!(
                    "/api/queues/quorum/{}/{}/replicas/add",
                    seg(&vhost),
                    seg(&name)
                );
                let result = api.post(&path, json!({ "node": node })).await;
                let sizes = (members.len(), members.len() + 1);
                results.push(membership_change(vhost, name, sizes, result));
            }
            print_membership_changes(&results, false, json_out);
        }
        Command::Shrink { node, errors_only } => {
            let replicated = replicated_queues(&api).await?;
            let mut results = Vec::new();
            for (vhost, name, members) in replicated {
                if !members.contains(&node) {
                    continue;
                }
                let path = format!(
                    "/api/queues/quorum/{}/{}/replicas/delete",
                    seg(&vhost),
                    seg(&name)
                );
                let result = api
                    .call(
                        reqwest::Method::DELETE,
                        &path,
                        Some(json!({ "node": node })),
                        None,
                    )
                    .await;
                let sizes = (members.len(), members.len() - 1);
                results.push(membership_change(vhost, name, sizes, result));
            }
            print_membership_changes(&results, errors_only, json_out);
        }
        Command::CheckIfNodeIsQuorumCritical => {
            let (status, body) = api
                .get_with_status("/api/health/checks/node-is-quorum-critical")
                .await?;
            match status {
                200..=299 => {
                    out!("ok: no replicated queue would lose its majority if this node stopped")
                }
                503 => {
                    if json_out {
                        out!("{body}");
                    } else {
                        for q in body["queues"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                        {
                            out!("{}", column(q, "readable_name"));
                        }
                    }
                    return Err(Failure::QuorumCritical(column(&body, "reason")));
                }
                other => return Err(Failure::Refused(other, column(&body, "reason"))),
            }
        }
        Command::ForgetClusterNode { node } => {
            api.delete(&format!("/api/cluster/nodes/{}", seg(&node)))
                .await?;
            out!("forgot node {node}");
        }
        Command::JoinCluster { node } => {
            let me = column(&api.get("/api/overview").await?, "node");
            let joined = api
                .post("/api/cluster/join", json!({ "node": node }))
                .await?;
            eprintln!(
                "Clustering node {me} with {} (it restarts to join) ...",
                column(&joined, "node")
            );
            // The node answers again once it has restarted, and lists
            // itself among the running members once it has joined (with
            // the cluster's users: these credentials must be valid there).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                if std::time::Instant::now() > deadline {
                    return Err(Failure::Local(format!(
                        "node {me} restarted to join but is not serving as a member after 60 s: see its log"
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                // Its name as it now runs (a node alone may have run
                // under another).
                let me = match api.get("/api/overview").await {
                    Ok(o) => column(&o, "node"),
                    Err(_) => continue,
                };
                if let Ok(nodes) = api.get("/api/nodes").await {
                    let nodes = nodes.as_array().cloned().unwrap_or_default();
                    let running = |n: &Value| n["running"] == json!(true);
                    if nodes.len() > 1
                        && nodes
                            .iter()
                            .any(|n| n["name"] == json!(me.as_str()) && running(n))
                    {
                        out!(
                            "joined cluster {} with {} nodes",
                            column(&joined, "cluster"),
                            nodes.len()
                        );
                        break;
                    }
                }
            }
        }
        Command::Status => {
            let overview = api.get("/api/overview").await?;
            let alarms = api.get("/api/health/checks/alarms").await;
            if json_out {
                out!("{overview}");
            } else {
                out!(
                    "product\t{} {}",
                    column(&overview, "product_name"),
                    column(&overview, "product_version")
                );
                out!("node\t{}", column(&overview, "node"));
                for key in ["connections", "queues", "exchanges", "consumers"] {
                    out!("{key}\t{}", column(&overview["object_totals"], key));
                }
                for key in ["messages", "messages_ready", "messages_unacknowledged"] {
                    out!("{key}\t{}", column(&overview["queue_totals"], key));
                }
                match alarms {
                    Ok(_) => out!("alarms\tnone"),
                    Err(Failure::Refused(_, reason)) => out!("alarms\t{reason}"),
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Writes one line to standard output. A reader that went away (`| head`)
/// ends the program quietly instead of panicking as `println!` does.
fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{args}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("cannot write to standard output: {e}");
        std::process::exit(74);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("{f}");
            f.exit()
        }
    }
}
