//! The `tollgate` command line.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{config::Config, daemon, policy::PolicySet};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Egress enforcement for workloads, by kernel-verified identity"
)]
struct Cli {
    /// Log as JSON lines instead of plain text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: attach (or adopt) the kernel programs and serve redirected connections.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Create this file once enforcing (for supervisors and tests).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Show the programs attached at each enforced root (from the kernel's query interface).
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// What is left of each budget the running daemon keeps (JSON, one object a bucket; a
    /// budget not listed is full).
    Budgets {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The connections each workload holds open through the running daemon (JSON, one object
    /// a workload, most first; a workload not listed holds none).
    Connections {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Remove every attachment and pin of this config's pin directory.
    Uninstall {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Workload network namespaces.
    Netns {
        #[command(subcommand)]
        command: NetnsCommand,
    },
    /// Work with policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run the demo on the embedded default config (needs root, curl and python3).
    Demo,
}

#[derive(Subcommand)]
enum NetnsCommand {
    /// Serve the namespace at PATH (e.g. /run/netns/<pod>) before its workloads start; returns
    /// when its listener is up.
    Add {
        #[arg(long, short)]
        config: PathBuf,
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check every policy in DIR; print each error as file:line:column.
    Check {
        dir: PathBuf,
        /// Also check that every credential a rule names is in this credentials file and
        /// lists the rule's host, as the daemon does when it starts (the file's secrets are
        /// read, so run it where they are).
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
    /// Show the decision and the rule that makes it, for a workload and a request:
    /// `tcp IP:PORT`, `tls HOST:PORT` or `METHOD http://HOST[:PORT]/PATH`.
    Explain {
        /// The policy directory.
        #[arg(long)]
        policies: PathBuf,
        /// The workload's cgroup path (relative to the cgroup2 mount).
        #[arg(long)]
        cgroup: String,
        #[arg(long)]
        exe: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        uid: u32,
        /// The request, e.g. "POST http://api.openai.com/v1/chat/completions".
        request: String,
        /// A request header, `Name: value` (repeat for more).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The `model` the request's JSON body names (`''`: a body without one), for rules
        /// that limit models.
        #[arg(long)]
        model: Option<String>,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tollgate: {msg}");
    ExitCode::FAILURE
}

/// A daemon's JSON array reply, one element a line.
fn print_lines(reply: Result<serde_json::Value, String>) -> ExitCode {
    match reply {
        Ok(serde_json::Value::Array(items)) => {
            for item in items {
                println!("{item}");
            }
            ExitCode::SUCCESS
        }
        Ok(other) => fail(format!("bad reply {other}")),
        Err(e) => fail(e),
    }
}

/// An error with its whole source chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let load = |path: &PathBuf| Config::load(path);
    match cli.command {
        Command::Run { config, ready_file } => match load(&config) {
            Ok(cfg) => match daemon::run(&cfg, ready_file.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(chain(&e)),
            },
            Err(e) => fail(e),
        },
        Command::Status { config } => match load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| daemon::status(&c).map_err(|e| e.to_string()))
        {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Budgets { config } => print_lines(
            load(&config)
                .map_err(|e| e.to_string())
                .and_then(|c| daemon::budgets(&c)),
        ),
        Command::Connections { config } => print_lines(
            load(&config)
                .map_err(|e| e.to_string())
                .and_then(|c| daemon::connections(&c)),
        ),
        Command::Uninstall { config } => match load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| daemon::uninstall(&c).map_err(|e| e.to_string()))
        {
            Ok(n) => {
                println!("removed {n} pins");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Netns {
            command: NetnsCommand::Add { config, path },
        } => {
            match load(&config)
                .map_err(|e| e.to_string())
                .and_then(|c| daemon::register_netns(&c, &path))
            {
                Ok(cookie) => {
                    println!("serving {} (netns cookie {cookie})", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Policy {
            command: PolicyCommand::Check { dir, credentials },
        } => match PolicySet::load_dir(&dir) {
            Ok(set) => {
                if let Some(path) = credentials {
                    let checked = crate::credentials::Credentials::load(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|c| daemon::check_bindings(&set, &c));
                    if let Err(e) = checked {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                }
                println!("{} policies OK", set.len());
                ExitCode::SUCCESS
            }
            Err(errs) => {
                for e in &errs {
                    eprintln!("{e}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    policies,
                    cgroup,
                    exe,
                    uid,
                    request,
                    headers,
                    model,
                },
        } => {
            let set = match PolicySet::load_dir(&policies) {
                Ok(set) => set,
                Err(errs) => {
                    for e in &errs {
                        eprintln!("{e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            let cgroup = match crate::cgroup::CgroupPath::parse(&cgroup) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let placement = crate::container::placement(cgroup.as_str());
            let view = crate::policy::WorkloadView {
                cgroup: &cgroup,
                container_id: placement.container.as_ref().map(|c| c.id.as_str()),
                pod_uid: placement.pod.as_ref().map(|p| p.uid.as_str()),
                exe: exe.as_deref(),
                uid,
            };
            let mut header_map = http::HeaderMap::new();
            for h in &headers {
                let parsed = h.split_once(':').and_then(|(name, value)| {
                    Some((
                        http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                        http::HeaderValue::from_str(value.trim()).ok()?,
                    ))
                });
                let Some((name, value)) = parsed else {
                    return fail(format!("--header {h:?}: give `Name: value`"));
                };
                header_map.append(name, value);
            }
            match crate::policy::explain(&set, &view, &request, &header_map, model.as_deref()) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Demo => match crate::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("demo failed: {e:#}")),
        },
    }
}
