//! The `weft` command: the agent (`weft launch`) and the CLI that talks to it.

use std::process::ExitCode;

use clap::Parser;
use hyper::Method;
use weft::api::client::{self, ClientError};
use weft::api::{AttachRequest, DetachRequest};
use weft::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version are not errors; bad usage is EX_USAGE (64).
            return if e.use_stderr() { ExitCode::from(64) } else { ExitCode::SUCCESS };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Launch(args) => {
            // Every flag is checked before anything is touched.
            let config = match weft::config::LaunchConfig::from_args(&args, cli.api) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("weft: {e}");
                    return ExitCode::from(weft::app::exit::USAGE);
                }
            };
            init_logging(&args.log);
            match runtime.block_on(weft::app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        command => match runtime.block_on(run_client(cli.api, command)) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("weft: ignoring --log {filter:?}: {e}");
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn run_client(api: weft::api::ApiAddr, command: Command) -> Result<String, ClientError> {
    let get = |path: &'static str| client::request(&api, Method::GET, path, None);
    match command {
        Command::Launch(_) => unreachable!("handled by main"),
        Command::Stop => client::request(&api, Method::POST, "/stop", None).await,
        Command::Connect { replace, peers } => {
            let mut pairs: Vec<(&str, &str)> = peers.iter().map(|p| ("peer", p.as_str())).collect();
            if replace {
                pairs.push(("replace", "true"));
            }
            client::request(&api, Method::POST, "/connect", Some(client::form(&pairs))).await
        }
        Command::Forget { peers } => {
            let pairs: Vec<(&str, &str)> = peers.iter().map(|p| ("peer", p.as_str())).collect();
            client::request(&api, Method::POST, "/forget", Some(client::form(&pairs))).await
        }
        Command::Status { what } => match what.as_deref() {
            None => get("/status").await,
            Some(w) => client::request(&api, Method::GET, &format!("/status/{w}"), None).await,
        },
        Command::Report => get("/report").await.map(|s| pretty_json(&s)),
        Command::Attach(a) => {
            let mut args = a.args;
            let container = if a.netns.is_none() { args.pop() } else { None };
            let req = AttachRequest {
                container,
                netns: a.netns,
                id: a.id,
                addrs: args,
                ifname: Some(a.ifname),
                no_multicast_route: a.no_multicast_route,
                dns_name: a.dns_name,
            };
            client::request(&api, Method::POST, "/attach", Some(client::json(&req))).await
        }
        Command::Detach { id } => {
            client::request(&api, Method::POST, "/detach", Some(client::json(&DetachRequest { id }))).await
        }
        Command::Ps => get("/ps").await,
        Command::Env { restore } => {
            if restore {
                return Ok(match std::env::var("ORIG_DOCKER_HOST") {
                    Ok(orig) if !orig.is_empty() => format!("export DOCKER_HOST={orig}\nunset ORIG_DOCKER_HOST\n"),
                    _ => "unset DOCKER_HOST ORIG_DOCKER_HOST\n".to_string(),
                });
            }
            let proxy = first_line(get("/proxy").await?);
            let orig = std::env::var("DOCKER_HOST").unwrap_or_default();
            // Run twice, `eval $(weft env)` must not remember the proxy as the original.
            let orig = if orig == proxy { std::env::var("ORIG_DOCKER_HOST").unwrap_or_default() } else { orig };
            Ok(format!("export DOCKER_HOST={proxy} ORIG_DOCKER_HOST={orig}\n"))
        }
        Command::Config => Ok(format!("-H={}\n", first_line(get("/proxy").await?))),
        Command::Rmpeer { peer, force } => {
            let query = if force { "?force=true" } else { "" };
            client::request(&api, Method::DELETE, &format!("/peer/{}{query}", url_segment(&peer)), None).await
        }
        Command::Reset(args) => match client::request(&api, Method::POST, "/reset", None).await {
            Err(e) if e.is_not_running() && args.force => {
                weft::app::reset_offline(&args).await.map_err(|e| ClientError::Local(Box::new(e)))
            }
            other => other,
        },
        Command::DnsAdd(a) => dns_change(&api, a, true).await,
        Command::DnsRemove(a) => dns_change(&api, a, false).await,
        Command::DnsLookup { name } => {
            client::request(&api, Method::GET, &format!("/name/{}", url_segment(&name)), None).await
        }
    }
}

fn first_line(s: String) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

fn pretty_json(s: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(v) => format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => s.to_string(),
    }
}

/// Percent-encodes one path segment.
fn url_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `weft dns-add` / `dns-remove`: `IP... [CONTAINER] [-h FQDN]` (Weave's form).
async fn dns_change(api: &weft::api::ApiAddr, a: weft::cli::DnsArgs, add: bool) -> Result<String, ClientError> {
    let (ips, rest): (Vec<&String>, Vec<&String>) = a.args.iter().partition(|x| x.parse::<std::net::Ipv4Addr>().is_ok());
    if rest.len() > 1 {
        return Err(ClientError::Usage(format!("too many arguments: {rest:?}; give IP... [CONTAINER] [-h NAME]")));
    }
    let container = rest.first().map(|s| s.as_str()).unwrap_or("weave:extern");
    if rest.is_empty() && a.hostname.is_none() {
        return Err(ClientError::Usage("give a container or -h NAME".into()));
    }
    let mut ips: Vec<String> = ips.into_iter().cloned().collect();
    if ips.is_empty() && add {
        // The container's own addresses.
        let body = client::request(api, Method::GET, &format!("/ip/{}", url_segment(container)), None).await?;
        ips = body.lines().filter_map(|l| l.split('/').next()).map(str::to_string).collect();
    }
    if ips.is_empty() {
        return client::request(api, Method::DELETE, &format!("/name/{}", url_segment(container)), None).await;
    }
    let name = a.hostname.clone().unwrap_or_else(|| container.to_string());
    for ip in ips {
        let mut path = format!("/name/{}/{ip}", url_segment(container));
        if add || a.hostname.is_some() {
            path.push_str(&format!("?fqdn={}", url_segment(&name)));
        }
        let method = if add { Method::PUT } else { Method::DELETE };
        client::request(api, method, &path, None).await?;
    }
    Ok(String::new())
}
