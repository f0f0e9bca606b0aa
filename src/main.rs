//! The `nixmesh` command: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use nixmesh::cli::{admin_client, render};
use nixmesh::config::Config;

#[derive(Parser)]
#[command(
    name = "nixmesh",
    version,
    about = "A LAN peer-to-peer cache mesh for Nix"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Agent {
        /// Config file (default: /etc/nixmesh/config.toml if it exists,
        /// else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a config file and exit: 0 when it loads, 2 when it does not.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show the agent's peer table.
    Peers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Show this node's identity, listeners, store and counts.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Print this node's public key (the identity peers pin), making the
    /// node key in the state dir if there is none yet.
    Id {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check this host's setup and say what to fix (exit 1 when something
    /// is wrong).
    Doctor {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Which peers have a path, which would win, and how fast they are.
    Why {
        /// A store path or its 32-character hash part.
        path: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Make a signing key pair in Nix's format (like
    /// `nix-store --generate-binary-cache-key`).
    Keygen {
        /// Key name, e.g. `office-1`.
        name: String,
        /// Where to write the secret key (mode 0600).
        secret_file: PathBuf,
        /// Where to write the public key.
        public_file: PathBuf,
    },
}

/// Which agent to ask: its admin address, or the one in its config file.
#[derive(clap::Args)]
struct AdminTarget {
    /// Admin API address (default: admin.listen from the config).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl AdminTarget {
    fn addr(&self) -> Result<std::net::SocketAddr, ExitCode> {
        match self.admin {
            Some(a) => Ok(a),
            None => load_config(self.config.as_deref()).map(|c| c.admin.listen),
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Our error types already carry their causes in their message.
            eprintln!("nixmesh: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code for a config file that does not load.
const EXIT_BAD_CONFIG: u8 = 2;

fn load_config(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("nixmesh: config: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent { config } => {
            let config = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            // Before any other thread exists: it edits the environment.
            let inherited = nixmesh::agent::activation::inherited();
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutting down");
                    trigger.cancel();
                });
                nixmesh::agent::run(config, inherited, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Peers { json, target } => {
            let addr = match target.addr() {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            let body = block_on(admin_client::admin_get(addr, "/peers"))??;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let peers: Vec<nixmesh::api::PeerView> = serde_json::from_slice(&body)?;
                print!("{}", render::render_peers(&peers));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, target } => {
            let addr = match target.addr() {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            let body = block_on(admin_client::admin_get(addr, "/status"))??;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let status: nixmesh::api::StatusView = serde_json::from_slice(&body)?;
                print!("{}", render::render_status(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Id { config } => {
            let config = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let key = nixmesh::config::keys::load_or_create_node_key(&config.state_dir)?;
            println!("{}", key.public().to_nix_string());
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { config } => {
            let source = config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(defaults)".into());
            let loaded = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let findings = block_on(nixmesh::cli::doctor::run(&loaded, &source))?;
            print!("{}", nixmesh::cli::doctor::render(&findings));
            let broken = findings
                .iter()
                .any(|f| f.verdict == nixmesh::cli::doctor::Verdict::Fail);
            Ok(if broken {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Why { path, json, target } => {
            let addr = match target.addr() {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            let Some(hash) = render::hash_part_of(&path) else {
                eprintln!("nixmesh: {path:?} is neither a store path nor a hash part");
                return Ok(ExitCode::from(EXIT_BAD_CONFIG));
            };
            let body = block_on(admin_client::admin_get(addr, &format!("/why/{hash}")))??;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let rows: Vec<nixmesh::api::SurveyRow> = serde_json::from_slice(&body)?;
                print!("{}", render::render_why(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => Ok(match load_config(config.as_deref()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(code) => code,
        }),
        Command::Keygen {
            name,
            secret_file,
            public_file,
        } => {
            let key = nixmesh::config::keys::generate_pair(&name, &secret_file, &public_file)?;
            println!("{}", key.public().to_nix_string());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?;
    Ok(runtime.block_on(f))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
