//! `warren`: the broker binary. `cargo run --release` starts it on
//! 0.0.0.0:5672 with its data in `./data`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Warren, an AMQP 0-9-1 message broker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Data directory (sled database).
    #[arg(long, env = "WARREN_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Address to listen on for AMQP.
    #[arg(long, env = "WARREN_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// AMQP port.
    #[arg(long, env = "WARREN_PORT", default_value_t = 5672)]
    port: u16,
    /// Largest message body accepted, in octets.
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE", default_value_t = 128 << 20)]
    max_message_size: u64,
    /// Heartbeat interval offered to clients, in seconds (0 disables).
    #[arg(long, env = "WARREN_HEARTBEAT", default_value_t = 60)]
    heartbeat: u16,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "WARREN_LOG_JSON")]
    log_json: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("WARREN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let config = server::Config {
            data_dir: args.data_dir,
            bind: SocketAddr::new(args.bind, args.port),
            max_message_size: args.max_message_size,
            heartbeat: args.heartbeat,
            ..server::Config::default()
        };
        let handle = match server::start(config).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return std::process::ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        match handle.shutdown().await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "store did not close cleanly");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
