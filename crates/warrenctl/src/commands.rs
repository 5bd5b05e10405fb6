//! What each warrenctl command does: the management API calls, the
//! banner, the listing's columns (rabbitmqctl's defaults and the keys it
//! knows), and the failures mapped to rabbitmqctl's exit codes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::api::{Api, Failure, seg};
use crate::output::{self, Format, Output};
use crate::{Cli, Command, checks};

/// The columns rabbitmqctl knows for each listing (unknown ones are a
/// usage error; known ones Warren has no figure for print empty).
const QUEUE_KEYS: &[&str] = &[
    "name",
    "durable",
    "auto_delete",
    "arguments",
    "policy",
    "pid",
    "owner_pid",
    "exclusive",
    "exclusive_consumer_pid",
    "exclusive_consumer_tag",
    "messages_ready",
    "messages_unacknowledged",
    "messages",
    "messages_ready_ram",
    "messages_unacknowledged_ram",
    "messages_ram",
    "messages_persistent",
    "message_bytes",
    "message_bytes_ready",
    "message_bytes_unacknowledged",
    "message_bytes_ram",
    "message_bytes_persistent",
    "head_message_timestamp",
    "disk_reads",
    "disk_writes",
    "consumers",
    "consumer_utilisation",
    "consumer_capacity",
    "memory",
    "slave_pids",
    "synchronised_slave_pids",
    "state",
    "type",
    "leader",
    "members",
    "online",
];
const EXCHANGE_KEYS: &[&str] = &[
    "name",
    "type",
    "durable",
    "auto_delete",
    "internal",
    "arguments",
    "policy",
];
const BINDING_KEYS: &[&str] = &[
    "source_name",
    "source_kind",
    "destination_name",
    "destination_kind",
    "routing_key",
    "arguments",
];
const CONNECTION_KEYS: &[&str] = &[
    "pid",
    "name",
    "port",
    "host",
    "peer_port",
    "peer_host",
    "ssl",
    "ssl_protocol",
    "ssl_key_exchange",
    "ssl_cipher",
    "ssl_hash",
    "peer_cert_subject",
    "peer_cert_issuer",
    "peer_cert_validity",
    "state",
    "channels",
    "protocol",
    "auth_mechanism",
    "user",
    "vhost",
    "timeout",
    "frame_max",
    "channel_max",
    "client_properties",
    "recv_oct",
    "recv_cnt",
    "send_oct",
    "send_cnt",
    "send_pend",
    "connected_at",
];
const CHANNEL_KEYS: &[&str] = &[
    "pid",
    "connection",
    "name",
    "number",
    "user",
    "vhost",
    "transactional",
    "confirm",
    "consumer_count",
    "messages_unacknowledged",
    "messages_uncommitted",
    "acks_uncommitted",
    "messages_unconfirmed",
    "prefetch_count",
    "global_prefetch_count",
];
const CONSUMER_KEYS: &[&str] = &[
    "queue_name",
    "channel_pid",
    "consumer_tag",
    "ack_required",
    "prefetch_count",
    "active",
    "arguments",
];
const VHOST_KEYS: &[&str] = &[
    "name",
    "description",
    "tags",
    "tracing",
    "cluster_state",
    "default_queue_type",
    "metadata",
];
const PERMISSION_KEYS: &[&str] = &["user", "configure", "write", "read"];

/// The limits a vhost can have (RabbitMQ's names).
const VHOST_LIMITS: [&str; 2] = ["max-connections", "max-queues"];

/// What `list_policies` and `list_operator_policies` show, in rabbitmqctl's order.
const POLICY_COLUMNS: [&str; 6] = [
    "vhost",
    "name",
    "pattern",
    "apply-to",
    "definition",
    "priority",
];

/// The API's body for `set_policy` and `set_operator_policy`.
fn policy_body(p: &crate::PolicyArgs) -> Result<Value, Failure> {
    let definition: Value = serde_json::from_str(&p.definition)
        .map_err(|e| Failure::DataErr(format!("definition is not JSON: {e}")))?;
    Ok(
        json!({"pattern": p.pattern, "definition": definition, "priority": p.priority, "apply-to": p.apply_to}),
    )
}

/// A field of an API object as text.
fn field(v: &Value, key: &str) -> String {
    output::text(&v[key])
}

/// A listing's rows.
async fn list(api: &Api, path: &str) -> Result<Vec<Value>, Failure> {
    Ok(api.get(path).await?.as_array().cloned().unwrap_or_default())
}

/// The node a command acts on: `-n`'s, which must be a member of the
/// cluster (69 otherwise, as rabbitmqctl for a node it cannot reach), or
/// the node the URL reaches.
async fn target_node(api: &Api, asked: Option<&str>) -> Result<String, Failure> {
    let Some(asked) = asked else {
        return Ok(field(&api.get("/api/overview").await?, "node"));
    };
    let nodes = list(api, "/api/nodes").await?;
    if nodes.iter().any(|n| n["name"] == asked) {
        Ok(asked.to_owned())
    } else {
        Err(Failure::Unavailable(format!(
            "unable to perform an operation on node '{asked}': it is not a member of the cluster of the node at {}",
            api.base()
        )))
    }
}

/// 67 unless `user` exists.
async fn user_exists(api: &Api, user: &str) -> Result<(), Failure> {
    api.get(&format!("/api/users/{}", seg(user)))
        .await
        .map(|_| ())
        .map_err(|e| match e {
            Failure::Refused(404, _) => Failure::NoUser(format!("User {user} does not exist")),
            e => e,
        })
}

/// 69 unless `vhost` exists (rabbitmqctl's code for the topic
/// permission commands).
async fn vhost_exists(api: &Api, vhost: &str) -> Result<(), Failure> {
    api.get(&format!("/api/vhosts/{}", seg(vhost)))
        .await
        .map(|_| ())
        .map_err(|e| match e {
            Failure::Refused(404, _) => {
                Failure::Unavailable(format!("Virtual host {vhost} does not exist"))
            }
            e => e,
        })
}

/// A password from standard input (its first line), as rabbitmqctl reads
/// one that is not an argument.
fn password_from_stdin() -> Result<String, Failure> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Failure::Local(format!("standard input: {e}")))?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        return Err(Failure::Local(
            "Password is not provided via argument or stdin".into(),
        ));
    }
    Ok(line)
}

/// `report`: the status and cluster status, then every listing of the
/// node and of each vhost, each under a heading.
async fn report(api: &Api, out: &Output, node: &str) -> Result<(), Failure> {
    out.banner(&format!("Reporting server status of node {node} ..."));
    let quiet = Output {
        quiet: true,
        ..*out
    };
    let section = |title: &str| out!("\n{title}\n");
    section("Status");
    let overview = api.get("/api/overview").await?;
    out!(
        "{}",
        serde_json::to_string_pretty(&overview).unwrap_or_default()
    );
    section("Cluster status");
    for n in list(api, "/api/nodes").await? {
        out!(
            "{}\t{}",
            field(&n, "name"),
            if n["running"] == json!(true) {
                "running"
            } else {
                "down"
            }
        );
    }
    section("Connections");
    quiet.rows(
        &list(api, "/api/connections").await?,
        &[],
        &[
            "name",
            "user",
            "vhost",
            "peer_host",
            "peer_port",
            "state",
            "channels",
        ],
        CONNECTION_KEYS,
    )?;
    section("Channels");
    quiet.rows(
        &list(api, "/api/channels").await?,
        &[],
        &[
            "name",
            "user",
            "vhost",
            "consumer_count",
            "messages_unacknowledged",
            "prefetch_count",
        ],
        CHANNEL_KEYS,
    )?;
    for v in list(api, "/api/vhosts").await? {
        let name = field(&v, "name");
        let vh = seg(&name);
        section(&format!("Queues on {name}"));
        quiet.rows(
            &list(api, &format!("/api/queues/{vh}")).await?,
            &[],
            &[
                "name",
                "durable",
                "auto_delete",
                "messages",
                "consumers",
                "type",
            ],
            QUEUE_KEYS,
        )?;
        section(&format!("Exchanges on {name}"));
        quiet.rows(
            &list(api, &format!("/api/exchanges/{vh}")).await?,
            &[],
            &["name", "type", "durable", "auto_delete", "internal"],
            EXCHANGE_KEYS,
        )?;
        section(&format!("Bindings on {name}"));
        quiet.rows(
            &list(api, &format!("/api/bindings/{vh}")).await?,
            &[],
            BINDING_KEYS,
            BINDING_KEYS,
        )?;
        section(&format!("Permissions on {name}"));
        quiet.rows(
            &list(api, &format!("/api/vhosts/{vh}/permissions")).await?,
            &[],
            PERMISSION_KEYS,
            PERMISSION_KEYS,
        )?;
        section(&format!("Policies on {name}"));
        let keys = ["name", "pattern", "apply-to", "definition", "priority"];
        quiet.rows(
            &list(api, &format!("/api/policies/{vh}")).await?,
            &[],
            &keys,
            &keys,
        )?;
    }
    Ok(())
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
            .map_err(|_| Failure::DataErr(format!("'{s}' is not a number")))
    };
    match (first, second) {
        (word, Some(value)) if word == keyword => Ok(if keyword == "absolute" {
            json!({ "absolute": value })
        } else {
            json!({ relative: number(value)? })
        }),
        (word, None) if word == keyword => Err(Failure::DataErr(format!(
            "'{keyword}' needs a value after it"
        ))),
        (value, None) if keyword == "absolute" => Ok(json!({ relative: number(value)? })),
        (value, None) => Ok(json!({ "absolute": value })),
        (value, Some(extra)) => Err(Failure::DataErr(format!(
            "unexpected '{extra}' after '{value}'"
        ))),
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
                output::text(&q["vhost"]),
                output::text(&q["name"]),
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
fn print_membership_changes(rows: &[[String; 4]], errors_only: bool, out: &Output) {
    let json_out = out.format == Format::Json;
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

/// `quorum_status`'s columns: RabbitMQ 3.10's, in its order.
const QUORUM_STATUS_COLUMNS: [&str; 7] = [
    "Node Name",
    "Raft State",
    "Log Index",
    "Commit Index",
    "Snapshot Index",
    "Term",
    "Machine Version",
];

/// Runs the command `cli` names.
pub(crate) async fn run(cli: Cli) -> Result<(), Failure> {
    let timeout = cli.timeout.map(Duration::from_secs);
    let api = Api::new(&cli.url, &cli.username, &cli.password, timeout);
    let out = Output {
        format: match cli.formatter.as_str() {
            "json" => Format::Json,
            "csv" => Format::Csv,
            _ => Format::Table,
        },
        quiet: cli.quiet,
        silent: cli.silent,
        no_headers: cli.no_table_headers,
    };
    // await_startup waits for the broker before anything asks it which node
    // it is (which fails at once while it is still starting).
    if matches!(cli.command, Command::AwaitStartup) {
        checks::await_startup(&api, &out, timeout).await?;
    }
    let node = target_node(&api, cli.target_node.as_deref()).await?;
    let vh = seg(&cli.vhost);
    let vhost = cli.vhost.as_str();
    let json_out = out.format == Format::Json;
    match cli.command {
        Command::ListQueues { columns } => {
            let columns = out.columns(&columns, &["name", "messages"], QUEUE_KEYS)?;
            out.banner(&format!("Listing queues for vhost {vhost} ..."));
            let rows = list(&api, &format!("/api/queues/{vh}")).await?;
            out.table(&rows, &columns);
        }
        Command::ListExchanges { columns } => {
            let columns = out.columns(&columns, &["name", "type"], EXCHANGE_KEYS)?;
            out.banner(&format!("Listing exchanges for vhost {vhost} ..."));
            let rows = list(&api, &format!("/api/exchanges/{vh}")).await?;
            out.table(&rows, &columns);
        }
        Command::ListBindings { columns } => {
            let columns = out.columns(&columns, BINDING_KEYS, BINDING_KEYS)?;
            out.banner(&format!("Listing bindings for vhost {vhost}..."));
            let rows = list(&api, &format!("/api/bindings/{vh}")).await?;
            out.table(&rows, &columns);
        }
        Command::ListConnections { columns } => {
            let defaults = ["user", "peer_host", "peer_port", "state"];
            let columns = out.columns(&columns, &defaults, CONNECTION_KEYS)?;
            out.banner("Listing connections ...");
            let rows = list(&api, "/api/connections").await?;
            out.table(&rows, &columns);
        }
        Command::ListChannels { columns } => {
            let defaults = ["pid", "user", "consumer_count", "messages_unacknowledged"];
            let columns = out.columns(&columns, &defaults, CHANNEL_KEYS)?;
            out.banner("Listing channels ...");
            let rows = list(&api, "/api/channels").await?;
            out.table(&rows, &columns);
        }
        Command::ListConsumers { columns } => {
            let columns = out.columns(&columns, CONSUMER_KEYS, CONSUMER_KEYS)?;
            out.banner(&format!("Listing consumers in vhost {vhost} ..."));
            let mut rows = list(&api, "/api/consumers").await?;
            rows.retain(|c| c["queue"]["vhost"] == vhost);
            out.table(&rows, &columns);
        }
        Command::ListUsers => {
            out.banner("Listing users ...");
            let rows = list(&api, "/api/users").await?;
            out.rows(&rows, &[], &["user", "tags"], &["user", "tags"])?;
        }
        Command::ListVhosts { columns } => {
            let columns = out.columns(&columns, &["name"], VHOST_KEYS)?;
            out.banner("Listing vhosts ...");
            let rows = list(&api, "/api/vhosts").await?;
            out.table(&rows, &columns);
        }
        Command::ListPermissions => {
            out.banner(&format!("Listing permissions for vhost \"{vhost}\" ..."));
            let rows = list(&api, &format!("/api/vhosts/{vh}/permissions"))
                .await
                .map_err(|e| e.no_vhost(vhost))?;
            out.rows(&rows, &[], PERMISSION_KEYS, PERMISSION_KEYS)?;
        }
        Command::ListUserPermissions { user } => {
            out.banner(&format!("Listing permissions for user \"{user}\" ..."));
            let rows = list(&api, &format!("/api/users/{}/permissions", seg(&user)))
                .await
                .map_err(|e| match e {
                    // (rabbitmqctl: 69, "{:no_such_user, ...}".)
                    Failure::Refused(404, _) => {
                        Failure::Unavailable(format!("{{:no_such_user, \"{user}\"}}"))
                    }
                    e => e,
                })?;
            let keys = ["vhost", "configure", "write", "read"];
            out.rows(&rows, &[], &keys, &keys)?;
        }
        Command::ListTopicPermissions => {
            out.banner(&format!(
                "Listing topic permissions for vhost \"{vhost}\" ..."
            ));
            let rows = list(&api, &format!("/api/vhosts/{vh}/topic-permissions"))
                .await
                .map_err(|e| e.no_vhost(vhost))?;
            let keys = ["user", "exchange", "write", "read"];
            out.rows(&rows, &[], &keys, &keys)?;
        }
        Command::SetTopicPermissions {
            user,
            exchange,
            write,
            read,
        } => {
            out.banner(&format!(
                "Setting topic permissions on \"{exchange}\" for user \"{user}\" in vhost \"{vhost}\" ..."
            ));
            user_exists(&api, &user).await?;
            vhost_exists(&api, vhost).await?;
            api.put(
                &format!("/api/topic-permissions/{vh}/{}", seg(&user)),
                json!({"exchange": exchange, "write": write, "read": read}),
            )
            .await?;
        }
        Command::ClearTopicPermissions { user, exchange } => {
            match &exchange {
                Some(x) => out.banner(&format!(
                    "Clearing topic permissions on \"{x}\" for user \"{user}\" in vhost \"{vhost}\" ..."
                )),
                None => out.banner(&format!(
                    "Clearing topic permissions for user \"{user}\" in vhost \"{vhost}\" ..."
                )),
            }
            user_exists(&api, &user).await?;
            vhost_exists(&api, vhost).await?;
            let path = format!("/api/topic-permissions/{vh}/{}", seg(&user));
            // The API clears all of a user's in a vhost; one exchange's
            // alone: clear all, then set the others again.
            let keep: Vec<Value> = match &exchange {
                None => Vec::new(),
                Some(x) => list(
                    &api,
                    &format!("/api/users/{}/topic-permissions", seg(&user)),
                )
                .await?
                .into_iter()
                .filter(|p| p["vhost"] == vhost && p["exchange"] != x.as_str())
                .collect(),
            };
            match api.delete(&path).await {
                Ok(_) | Err(Failure::Refused(404, _)) => {}
                Err(e) => return Err(e),
            }
            for p in keep {
                api.put(
                    &path,
                    json!({"exchange": p["exchange"], "write": p["write"], "read": p["read"]}),
                )
                .await?;
            }
        }
        Command::AuthenticateUser { user, secret } => {
            out.banner(&format!("Authenticating user \"{user}\" ..."));
            let password = match secret {
                Some(p) => p,
                None => password_from_stdin()?,
            };
            let (status, body) = api
                .as_user(&user, &password)
                .get_with_status("/api/whoami")
                .await?;
            // (A user without a management tag logs in to AMQP but not to
            // the API: its credentials are right all the same.)
            let not_management = body["reason"] == "Not management user";
            match status {
                200..=299 => out.message("Success"),
                401 if not_management => out.message("Success"),
                401 => {
                    return Err(Failure::DataErr(format!(
                        "failed to authenticate user \"{user}\"\nuser '{user}' - invalid credentials"
                    )));
                }
                other => {
                    return Err(Failure::Refused(
                        other,
                        "unexpected answer to /api/whoami".into(),
                    ));
                }
            }
        }
        Command::AddUser { name, new_password } => {
            out.banner(&format!("Adding user \"{name}\" ..."));
            let path = format!("/api/users/{}", seg(&name));
            if api.get(&path).await.is_ok() {
                return Err(Failure::Refused(
                    409,
                    format!("user '{name}' already exists"),
                ));
            }
            api.put(&path, json!({"password": new_password, "tags": ""}))
                .await?;
        }
        Command::DeleteUser { name } => {
            out.banner(&format!("Deleting user \"{name}\" ..."));
            api.delete(&format!("/api/users/{}", seg(&name)))
                .await
                .map_err(|e| e.no_user(&name))?;
        }
        Command::ChangePassword { name, new_password } => {
            out.banner(&format!("Changing password for user \"{name}\" ..."));
            let new_password = match new_password {
                Some(p) => p,
                None => password_from_stdin()?,
            };
            let path = format!("/api/users/{}", seg(&name));
            let user = api.get(&path).await.map_err(|e| e.no_user(&name))?;
            api.put(
                &path,
                json!({"password": new_password, "tags": user["tags"]}),
            )
            .await?;
        }
        Command::SetUserTags { name, tags } => {
            out.banner(&format!(
                "Setting tags for user \"{name}\" to [{}] ...",
                tags.join(", ")
            ));
            let path = format!("/api/users/{}", seg(&name));
            let user = api.get(&path).await.map_err(|e| e.no_user(&name))?;
            let hash = user["password_hash"].clone();
            api.put(&path, json!({"password_hash": hash, "tags": tags}))
                .await?;
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
            out.banner(&format!(
                "Setting permissions for user \"{user}\" in vhost \"{}\" ...",
                cli.vhost
            ));
        }
        Command::ClearPermissions { user } => {
            api.delete(&format!("/api/permissions/{vh}/{}", seg(&user)))
                .await?;
            out.banner(&format!(
                "Clearing permissions for user \"{user}\" in vhost \"{}\" ...",
                cli.vhost
            ));
        }
        Command::AddVhost { name } => {
            api.put(&format!("/api/vhosts/{}", seg(&name)), json!({}))
                .await?;
            out.banner(&format!("Adding vhost \"{name}\" ..."));
        }
        Command::DeleteVhost { name } => {
            api.delete(&format!("/api/vhosts/{}", seg(&name))).await?;
            out.banner(&format!("Deleting vhost \"{name}\" ..."));
        }
        Command::SetPolicy(p) => {
            let body = policy_body(&p)?;
            api.put(&format!("/api/policies/{vh}/{}", seg(&p.name)), body)
                .await?;
            out.banner(&format!(
                "Setting policy \"{}\" for pattern \"{}\" ...",
                p.name, p.pattern
            ));
        }
        Command::ClearPolicy { name } => {
            api.delete(&format!("/api/policies/{vh}/{}", seg(&name)))
                .await
                .map_err(Failure::no_parameter)?;
            out.banner(&format!("Clearing policy \"{name}\" ..."));
        }
        Command::SetOperatorPolicy(p) => {
            let body = policy_body(&p)?;
            out.banner(&format!(
                "Setting operator policy override \"{}\" for pattern \"{}\" to \"{}\" with priority \"{}\" for vhost \"{}\" ...",
                p.name, p.pattern, p.definition, p.priority, cli.vhost
            ));
            api.put(
                &format!("/api/operator-policies/{vh}/{}", seg(&p.name)),
                body,
            )
            .await?;
        }
        Command::ClearOperatorPolicy { name } => {
            out.banner(&format!(
                "Clearing operator policy \"{name}\" on vhost \"{}\" ...",
                cli.vhost
            ));
            api.delete(&format!("/api/operator-policies/{vh}/{}", seg(&name)))
                .await
                .map_err(Failure::no_parameter)?;
        }
        Command::SetVhostLimits { definition } => {
            let limits: Value = serde_json::from_str(&definition)
                .map_err(|e| Failure::DataErr(format!("limits are not JSON: {e}")))?;
            let Some(limits) = limits.as_object() else {
                return Err(Failure::DataErr("limits must be a JSON object".into()));
            };
            // Checked whole before anything is applied, as rabbitmqctl does.
            for (name, value) in limits {
                if !VHOST_LIMITS.contains(&name.as_str()) {
                    return Err(Failure::DataErr(format!(
                        "unknown vhost limit '{name}' (known: {})",
                        VHOST_LIMITS.join(", ")
                    )));
                }
                if value.as_i64().is_none() {
                    return Err(Failure::DataErr(format!(
                        "limit '{name}' must be an integer, not {value}"
                    )));
                }
            }
            out.banner(&format!(
                "Applying limits to vhost \"{}\": {definition} ...",
                cli.vhost
            ));
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
            out.banner(&format!("Clearing limits of vhost \"{}\" ...", cli.vhost));
            for name in VHOST_LIMITS {
                api.delete(&format!("/api/vhost-limits/{vh}/{name}"))
                    .await?;
            }
        }
        Command::ListVhostLimits => {
            out.banner(&format!("Listing limits for vhost \"{vhost}\" ..."));
            let rows = list(&api, &format!("/api/vhost-limits/{vh}")).await?;
            out.rows(&rows, &[], &["vhost", "value"], &["vhost", "value"])?;
        }
        Command::ListPolicies => {
            out.banner(&format!("Listing policies for vhost \"{vhost}\" ..."));
            let rows = list(&api, &format!("/api/policies/{vh}")).await?;
            out.rows(&rows, &[], &POLICY_COLUMNS, &POLICY_COLUMNS)?;
        }
        Command::ListOperatorPolicies => {
            out.banner(&format!(
                "Listing operator policy overrides for vhost \"{vhost}\" ..."
            ));
            let rows = list(&api, &format!("/api/operator-policies/{vh}")).await?;
            out.rows(&rows, &[], &POLICY_COLUMNS, &POLICY_COLUMNS)?;
        }
        Command::PurgeQueue { name } => {
            api.delete(&format!("/api/queues/{vh}/{}/contents", seg(&name)))
                .await?;
            out.banner(&format!(
                "Purging queue '{name}' in vhost '{}' ...",
                cli.vhost
            ));
        }
        Command::DeleteQueue { name } => {
            api.delete(&format!("/api/queues/{vh}/{}", seg(&name)))
                .await?;
            out.banner(&format!(
                "Deleting queue '{name}' on vhost '{}' ...",
                cli.vhost
            ));
        }
        Command::CloseConnection { name, reason } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("/api/connections/{}", seg(&name)),
                None,
                reason.as_deref(),
            )
            .await?;
            out.banner(&format!("Closing connection {name} ..."));
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
                out.banner(&format!("Exported definitions to {file}"));
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
            out.banner(&format!("Imported definitions from {file}"));
        }
        Command::TraceOn | Command::TraceOff => {
            let on = matches!(cli.command, Command::TraceOn);
            // (The vhost must exist: PUT alone would create it.)
            api.get(&format!("/api/vhosts/{vh}")).await?;
            api.put(&format!("/api/vhosts/{vh}"), json!({ "tracing": on }))
                .await?;
            out.banner(&format!(
                "{} tracing for vhost \"{}\" ...",
                if on { "Starting" } else { "Stopping" },
                cli.vhost
            ));
        }
        // (RabbitMQ 3.10.8's banners, recorded: "to 2GB bytes ..." for an
        // absolute amount, "to 0.5 ..." for a fraction, "to 1.5 times the
        // total RAM ..." for a relative disk limit.)
        Command::SetVmMemoryHighWatermark { value, amount } => {
            let to = match amount.as_deref() {
                Some(a) if value == "absolute" => format!("{a} bytes"),
                _ => value.clone(),
            };
            out.banner(&format!("Setting memory threshold on {node} to {to} ..."));
            let body = limit_body(&value, amount.as_deref(), "absolute", "fraction")?;
            api.put(
                &format!("/api/nodes/{}/vm_memory_high_watermark", seg(&node)),
                body,
            )
            .await?;
        }
        Command::SetDiskFreeLimit { value, fraction } => {
            let to = match fraction.as_deref() {
                Some(f) if value == "mem_relative" => format!("{f} times the total RAM"),
                _ => format!("{value} bytes"),
            };
            out.banner(&format!("Setting disk free limit on {node} to {to} ..."));
            let body = limit_body(&value, fraction.as_deref(), "mem_relative", "mem_relative")?;
            api.put(&format!("/api/nodes/{}/disk_free_limit", seg(&node)), body)
                .await?;
        }
        Command::ClusterStatus => {
            out.banner(&format!("Cluster status of node {node} ..."));
            let name = api.get("/api/cluster-name").await?;
            let nodes = api.get("/api/nodes").await?;
            if json_out {
                out!("{}", json!({"cluster_name": name["name"], "nodes": nodes}));
            } else {
                out!("cluster\t{}", field(&name, "name"));
                for n in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
                    let running = if n["running"] == json!(true) {
                        "running"
                    } else {
                        "down"
                    };
                    let role = n["metadata_role"].as_str().unwrap_or("single");
                    out!("node\t{}\t{running}\t{role}", field(n, "name"));
                }
            }
        }
        Command::QuorumStatus { queue } => {
            out.banner(&format!(
                "Status of quorum queue {queue} on node {node} ..."
            ));
            let rows = api
                .get(&format!("/api/queues/quorum/{vh}/{}/status", seg(&queue)))
                .await?;
            let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
            let columns = QUORUM_STATUS_COLUMNS.map(str::to_owned);
            out.table(rows, &columns);
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
                regex::Regex::new(p).map_err(|e| Failure::DataErr(format!("pattern '{p}': {e}")))
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
            print_membership_changes(&results, false, &out);
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
            print_membership_changes(&results, errors_only, &out);
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
                            out!("{}", field(q, "readable_name"));
                        }
                    }
                    return Err(Failure::Unavailable(field(&body, "reason")));
                }
                other => return Err(Failure::Refused(other, field(&body, "reason"))),
            }
        }
        Command::ForgetClusterNode { node } => {
            api.delete(&format!("/api/cluster/nodes/{}", seg(&node)))
                .await?;
            out!("forgot node {node}");
        }
        Command::JoinCluster { node } => {
            let me = field(&api.get("/api/overview").await?, "node");
            let joined = api
                .post("/api/cluster/join", json!({ "node": node }))
                .await?;
            out.banner(&format!(
                "Clustering node {me} with {} (it restarts to join) ...",
                field(&joined, "node")
            ));
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
                    Ok(o) => field(&o, "node"),
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
                            field(&joined, "cluster"),
                            nodes.len()
                        );
                        break;
                    }
                }
            }
        }
        Command::Status => {
            out.banner(&format!("Status of node {node} ..."));
            let overview = api.get("/api/overview").await?;
            let alarms = api.get("/api/health/checks/alarms").await;
            if json_out {
                out!("{overview}");
            } else {
                out!(
                    "product\t{} {}",
                    field(&overview, "product_name"),
                    field(&overview, "product_version")
                );
                out!("node\t{}", field(&overview, "node"));
                for key in ["connections", "queues", "exchanges", "consumers"] {
                    out!("{key}\t{}", field(&overview["object_totals"], key));
                }
                for key in ["messages", "messages_ready", "messages_unacknowledged"] {
                    out!("{key}\t{}", field(&overview["queue_totals"], key));
                }
                match alarms {
                    Ok(_) => out!("alarms\tnone"),
                    Err(Failure::Refused(_, reason)) => out!("alarms\t{reason}"),
                    Err(e) => return Err(e),
                }
            }
        }
        Command::Report => report(&api, &out, &node).await?,
        Command::Environment => {
            out.banner(&format!("Application environment of node {node} ..."));
            let info = api.get(&format!("/api/nodes/{}", seg(&node))).await?;
            let env = &info["environment"];
            if json_out {
                out!("{env}");
            } else if let Some(settings) = env.as_object() {
                for (key, value) in settings {
                    out!("{key}\t{}", output::text(value));
                }
            }
        }
        // (Waited for before the node was asked for, above.)
        Command::AwaitStartup => {}
        Command::Ping => checks::ping(&api, &out, &node).await?,
        Command::CheckRunning => checks::running(&api, &out, &node).await?,
        Command::CheckLocalAlarms => checks::local_alarms(&api, &out, &node).await?,
        Command::CheckPortConnectivity => {
            checks::port_connectivity(&api, &out, &node, timeout).await?;
        }
        Command::CheckVirtualHosts => checks::virtual_hosts(&api, &out, &node).await?,
        Command::Listeners => checks::listeners(&api, &out, &node).await?,
    }
    Ok(())
}
