//! The `mongo-replicator` binary: parses arguments, sets up logging, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mongo_replicator::config::Config;

#[derive(Parser)]
#[command(
    name = "mongo-replicator",
    version,
    about = "Keeps MongoDB followers identical to a source, through change streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Overrides `node_id` from the config.
        #[arg(long, env = "MONGO_REPLICATOR_NODE_ID")]
        node_id: Option<String>,
    },
    /// Compare the source with each follower (exit 0 identical, 1 differences, 2 usage or
    /// config error, 3 could not run).
    Check(mongo_replicator::check::CheckArgs),
    /// Print the running node's status.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the node on `[http] listen` answers `/healthz` (a container healthcheck
    /// that needs no curl).
    Healthz {
        #[arg(long)]
        config: PathBuf,
    },
    /// Copy one follower again from the source; it then streams as before.
    Resync {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        follower: String,
    },
    /// Stop applying changes to one follower (its checkpoint is kept) until `resume`.
    Pause {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        follower: String,
    },
    /// Resume a paused follower: it catches up from its checkpoint.
    Resume {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        follower: String,
    },
}

const EXIT_USAGE: u8 = 2;

/// Loads the config for a one-shot command, printing its warnings.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    let config = load_quietly(path)?;
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    Ok(config)
}

fn load_quietly(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let code = run(cli).await;
        mongo_replicator::source::shutdown_clients().await;
        code
    })
}

async fn run(cli: Cli) -> ExitCode {
    {
        match cli.command {
            Command::Run { config, node_id } => {
                let mut config = match load_quietly(&config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                if let Err(e) = config.resolve_node_id(node_id) {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
                mongo_replicator::logging::init_logging(&config);
                for w in &config.warnings {
                    tracing::warn!("{w}");
                }
                match mongo_replicator::service::run(
                    config,
                    mongo_replicator::service::shutdown_signal(),
                )
                .await
                {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        let msg = mongo_replicator::config::redact(&format!("{e:#}"));
                        tracing::error!(error = %msg, "fatal");
                        eprintln!("error: {msg}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Check(args) => mongo_replicator::check::main(args).await,
            Command::Status { config, json } => {
                let config = match load(&config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                mongo_replicator::cli::status(&config, json).await
            }
            Command::Healthz { config } => {
                let config = match load(&config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                mongo_replicator::cli::healthz(&config).await
            }
            Command::Resync { config, follower } => {
                let config = match load(&config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                mongo_replicator::cli::resync(&config, &follower).await
            }
            Command::Pause { config, follower } => match load(&config) {
                Ok(config) => mongo_replicator::cli::set_paused(&config, &follower, true).await,
                Err(code) => code,
            },
            Command::Resume { config, follower } => match load(&config) {
                Ok(config) => mongo_replicator::cli::set_paused(&config, &follower, false).await,
                Err(code) => code,
            },
        }
    }
}
