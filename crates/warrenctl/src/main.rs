//! `warrenctl`: operate a Warren broker the way `rabbitmqctl`,
//! `rabbitmq-diagnostics` and `rabbitmq-queues` operate RabbitMQ, through
//! the broker's management HTTP API: list queues, exchanges, bindings,
//! connections, channels, consumers, users, vhosts and permissions (with
//! column selection), manage users, vhosts, permissions and topic
//! permissions, set and clear policies and limits, purge and delete queues,
//! close connections, export and import definitions, health checks (`ping`,
//! `check_running`, `check_local_alarms`, `check_port_connectivity`,
//! `check_virtual_hosts`), cluster membership and replicas, the firehose
//! and the alarm limits.
//!
//! rabbitmqctl's global flags work (`-q`, `-s`, `--no-table-headers`,
//! `-p`, `--formatter table|json|csv`, `-n`, `-t`) and so do its exit codes
//! (`api.rs`). Installed (or symlinked) as `rabbitmqctl` or
//! `rabbitmq-diagnostics`, it accepts the commands that tool has and no
//! others, as RabbitMQ's do, so that existing scripts run unchanged.
//!
//! Module map: `api.rs` (the HTTP client, failures and exit codes),
//! `output.rs` (banners, listings, formats), `commands.rs` (what each
//! command does), `checks.rs` (the health checks).

use std::process::ExitCode;

/// `println!` that survives a closed pipe (see [`output::print_line`]).
macro_rules! out {
    ($($arg:tt)*) => {
        crate::output::print_line(format_args!($($arg)*))
    };
}

mod api;
mod checks;
mod commands;
mod output;

use clap::{Args, Parser, Subcommand};

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
    #[arg(long, value_parser = ["table", "json", "csv"], default_value = "table", global = true)]
    formatter: String,
    /// No banner ("Listing queues ...") before the output.
    #[arg(short = 'q', long, global = true)]
    quiet: bool,
    /// No banner and no table headers.
    #[arg(short = 's', long, global = true)]
    silent: bool,
    /// No header line over listings.
    #[arg(long = "no-table-headers", global = true)]
    no_table_headers: bool,
    /// The node to act on: it must be a member of the cluster the URL's
    /// node belongs to (node-level commands then report on it).
    #[arg(short = 'n', long = "node", value_name = "NODE", global = true)]
    target_node: Option<String>,
    /// Give up after this many seconds (exit status 75).
    #[arg(short = 't', long, global = true)]
    timeout: Option<u64>,
    /// Accepted for rabbitmqctl's sake (Erlang long node names); no effect.
    #[arg(short = 'l', long, global = true, hide = true)]
    longnames: bool,
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
    ListVhosts { columns: Vec<String> },
    /// Permissions in the vhost [user configure write read].
    ListPermissions,
    /// Channels [pid user consumer_count messages_unacknowledged].
    ListChannels { columns: Vec<String> },
    /// A user's permissions in every vhost [vhost configure write read].
    ListUserPermissions { user: String },
    /// Topic permissions in the vhost [user exchange write read].
    ListTopicPermissions,
    /// Sets a user's topic permissions on EXCHANGE in the vhost: regular
    /// expressions on the routing keys it may publish (write) and bind
    /// (read) with.
    SetTopicPermissions {
        user: String,
        exchange: String,
        write: String,
        read: String,
    },
    /// Removes a user's topic permissions in the vhost (on EXCHANGE only,
    /// if given).
    ClearTopicPermissions {
        user: String,
        exchange: Option<String>,
    },
    /// Checks a user's credentials (the password is read from standard
    /// input if not given); exit status 65 if they are wrong.
    AuthenticateUser {
        user: String,
        // (Not `password`: that is the global flag's name.)
        #[arg(value_name = "PASSWORD")]
        secret: Option<String>,
    },
    /// Adds a user.
    AddUser {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: String,
    },
    /// Deletes a user.
    DeleteUser { name: String },
    /// Changes a user's password (read from standard input if not given).
    ChangePassword {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: Option<String>,
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
    SetPolicy(PolicyArgs),
    /// Removes a policy from the vhost.
    ClearPolicy { name: String },
    /// Policies of the vhost [vhost name pattern apply-to definition priority].
    ListPolicies,
    /// Sets an operator policy in the vhost: caps (`max-length`,
    /// `max-length-bytes`, `message-ttl`, `expires`, `delivery-limit`) that
    /// users' policies and queue arguments cannot lift, e.g.
    /// `set_operator_policy cap '.*' '{"max-length":100000}' --apply-to queues`.
    SetOperatorPolicy(PolicyArgs),
    /// Removes an operator policy from the vhost.
    ClearOperatorPolicy { name: String },
    /// Operator policies of the vhost [vhost name pattern apply-to definition priority].
    ListOperatorPolicies,
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
    /// The node's settings in effect (listeners, limits, timeouts, alarm
    /// thresholds).
    Environment,
    /// Everything an operator asks for in a support request: status,
    /// cluster status, connections, channels, and each vhost's queues,
    /// exchanges, bindings, permissions and policies.
    Report,
    /// Waits until the broker answers (at most `--timeout`, 300 s by
    /// default); exit status 75 if it does not.
    AwaitStartup,
    /// Whether the node answers (rabbitmq-diagnostics ping).
    Ping,
    /// Whether the node is running and has booted (rabbitmq-diagnostics).
    CheckRunning,
    /// Fails (69) if the node has a memory or disk alarm in effect.
    CheckLocalAlarms,
    /// Fails (69) if any of the node's listeners refuses a TCP connection.
    CheckPortConnectivity,
    /// Fails (69) if any vhost is not running on the node.
    CheckVirtualHosts,
    /// The node's listeners: interface, port, protocol, purpose.
    Listeners,
    /// The cluster's name and nodes: running or not, and each one's part in
    /// the metadata group (leader, voter, learner).
    ClusterStatus,
    /// Each member of replicated queue QUEUE in the vhost as its node
    /// reports it: Raft state, last log index, commit index, snapshot
    /// index, term (rabbitmq-queues quorum_status). A follower whose log
    /// index trails the leader's is behind; `noproc`: its node did not
    /// answer.
    QuorumStatus { queue: String },
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

/// Which RabbitMQ tool a command belongs to, for running as that tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// Any command (`warrenctl`).
    Warrenctl,
    /// `rabbitmqctl`'s commands.
    Ctl,
    /// `rabbitmq-diagnostics`' commands.
    Diagnostics,
    /// `rabbitmq-queues`' commands.
    Queues,
}

impl Tool {
    /// The tool this program runs as, by the name it was started under
    /// (a symlink `rabbitmqctl -> warrenctl` makes it rabbitmqctl).
    fn from_program(arg0: &std::ffi::OsStr) -> Tool {
        let name = std::path::Path::new(arg0)
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match name {
            "rabbitmqctl" => Tool::Ctl,
            "rabbitmq-diagnostics" => Tool::Diagnostics,
            "rabbitmq-queues" => Tool::Queues,
            _ => Tool::Warrenctl,
        }
    }

    /// Whether this tool has `c`, as RabbitMQ's CLI scopes its commands.
    fn has(self, c: &Command) -> bool {
        use Command as C;
        let diagnostics_only = matches!(
            c,
            C::CheckRunning
                | C::CheckLocalAlarms
                | C::CheckPortConnectivity
                | C::CheckVirtualHosts
                | C::Listeners
        );
        let both = matches!(
            c,
            C::ListQueues { .. }
                | C::ListExchanges { .. }
                | C::ListBindings { .. }
                | C::ListConnections { .. }
                | C::ListConsumers { .. }
                | C::ListChannels { .. }
                | C::ListUsers
                | C::ListVhosts { .. }
                | C::ListPermissions
                | C::ListUserPermissions { .. }
                | C::ListTopicPermissions
                | C::ListPolicies
                | C::ListOperatorPolicies
                | C::ListVhostLimits
                | C::Status
                | C::Environment
                | C::ClusterStatus
                | C::Report
                | C::Ping
        );
        let queues = matches!(
            c,
            C::AddMember { .. }
                | C::QuorumStatus { .. }
                | C::DeleteMember { .. }
                | C::Grow { .. }
                | C::Shrink { .. }
                | C::CheckIfNodeIsQuorumCritical
        );
        match self {
            Tool::Warrenctl => true,
            Tool::Ctl => !diagnostics_only && !queues,
            Tool::Diagnostics => diagnostics_only || both,
            Tool::Queues => queues,
        }
    }
}

/// What `set_policy` and `set_operator_policy` take, as rabbitmqctl's.
#[derive(Args, Debug)]
pub(crate) struct PolicyArgs {
    pub(crate) name: String,
    /// A regular expression on queue and exchange names.
    pub(crate) pattern: String,
    /// The definition, a JSON object.
    pub(crate) definition: String,
    /// Higher wins when several match.
    #[arg(long, default_value_t = 0)]
    pub(crate) priority: i64,
    /// queues, exchanges or all.
    #[arg(long = "apply-to", default_value = "all")]
    pub(crate) apply_to: String,
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let tool = Tool::from_program(
        args.first()
            .map_or_else(Default::default, |a| a.as_os_str()),
    );
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let usage = !matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            );
            let _ = e.print();
            // (rabbitmqctl: 64 for bad usage, 0 for help.)
            return if usage {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if !tool.has(&cli.command) {
        let name = <Cli as clap::CommandFactory>::command()
            .try_get_matches_from(&args)
            .ok()
            .and_then(|m| m.subcommand_name().map(str::to_owned))
            .unwrap_or_default();
        eprintln!("\nCommand '{name}' not found. \n");
        return ExitCode::from(64);
    }
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
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("{f}");
            f.exit()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_name_chooses_the_tool_and_its_commands() {
        let tool = |n: &str| Tool::from_program(std::ffi::OsStr::new(n));
        assert_eq!(tool("/usr/local/bin/rabbitmqctl"), Tool::Ctl);
        assert_eq!(tool("rabbitmq-diagnostics"), Tool::Diagnostics);
        assert_eq!(tool("rabbitmq-queues"), Tool::Queues);
        assert_eq!(tool("target/release/warrenctl"), Tool::Warrenctl);
        assert!(Tool::Ctl.has(&Command::ListUsers));
        assert!(!Tool::Ctl.has(&Command::CheckRunning));
        assert!(Tool::Diagnostics.has(&Command::CheckRunning));
        assert!(Tool::Diagnostics.has(&Command::Ping));
        assert!(!Tool::Diagnostics.has(&Command::DeleteUser { name: "x".into() }));
        assert!(Tool::Queues.has(&Command::CheckIfNodeIsQuorumCritical));
        assert!(Tool::Warrenctl.has(&Command::CheckRunning));
    }
}
