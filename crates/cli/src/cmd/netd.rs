//! `sigil netd run|status`, the `--api-socket` flag of every command that talks to sigil-netd,
//! and two hidden helpers the demo runs inside endpoint namespaces (a TCP/UDP echo server and
//! a connection probe).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sigil_proto::netd::v1 as pb;
use tonic::transport::Channel;

use crate::client;
use crate::output::{self, Format, OutputArg};

/// `--api-socket`, taken by every command that talks to sigil-netd.
#[derive(Debug, Clone, clap::Args)]
pub struct NetdSocket {
    /// Path of sigil-netd's API socket.
    #[arg(id = "api_socket", long = "api-socket", value_name = "PATH", env = "SIGIL_NETD_SOCKET",
          default_value = sigil_netd::config::DEFAULT_API_SOCKET)]
    pub path: PathBuf,
}

impl NetdSocket {
    /// Connects to the socket.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        client::dial(&self.path).await.map_err(|e| {
            e.describe(
                "netd",
                &self.path,
                "is it running? start it with `sigil netd run`",
            )
        })
    }
}

/// `sigil netd ...`
#[derive(Debug, clap::Subcommand)]
pub enum NetdCommand {
    /// Run sigil-netd until SIGTERM or SIGINT (the datapath stays attached when it stops).
    Run(Box<sigil_netd::RunArgs>),
    /// Show the daemon's status.
    Status(StatusArgs),
    /// Check that sigil-netd serves (the gRPC health service on its API socket says SERVING);
    /// exit status 0 when it does.
    Healthcheck(HealthcheckArgs),
    /// Echo server for demos and tests: accepts TCP connections and UDP datagrams on ADDR and
    /// answers each with what it received.
    #[command(hide = true)]
    EchoServer(EchoArgs),
    /// Connection probe for demos and tests: sends `ping` over TCP (or UDP) and waits for the
    /// echo; exit status 0 when it came back.
    #[command(hide = true)]
    Probe(ProbeArgs),
}

/// Flags of `sigil netd status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    socket: NetdSocket,
    #[command(flatten)]
    output: OutputArg,
}

/// Flags of `sigil netd healthcheck`.
#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    socket: NetdSocket,
}

/// Flags of the echo server.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Address to listen on (TCP and UDP).
    #[arg(long)]
    bind: SocketAddr,
}

/// Flags of the probe.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Address to connect to.
    #[arg(long)]
    connect: SocketAddr,
    /// Use UDP instead of TCP.
    #[arg(long)]
    udp: bool,
    /// How long to wait.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Runs a `netd` subcommand.
pub async fn run(cmd: NetdCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NetdCommand::Run(args) => sigil_netd::run(*args).await.map(|()| ExitCode::SUCCESS),
        NetdCommand::Healthcheck(a) => {
            let checked = match a.socket.connect().await {
                Ok(channel) => client::serving(channel, "").await,
                Err(e) => Err(e),
            };
            match checked {
                Ok(()) => {
                    println!("netd is healthy.");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("netd is unhealthy: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        NetdCommand::Status(a) => {
            let mut c = pb::status_client::StatusClient::new(a.socket.connect().await?);
            let s = client::reply(c.get_status(pb::GetStatusRequest {}).await)?;
            let mut json = serde_json::json!({
                "node_name": s.node_name, "pod_cidr": s.pod_cidr, "pod_cidr_v6": s.pod_cidr_v6,
                "bpf_pin_dir": s.bpf_pin_dir, "policy_dir": s.policy_dir,
                "enforcement": s.enforcement, "endpoints": s.endpoints,
                "identities": s.identities, "policies": s.policies, "lost_events": s.lost_events,
            });
            if let (Some(x), Some(map)) = (&s.hubble_export, json.as_object_mut()) {
                map.insert(
                    "hubble_export".into(),
                    serde_json::json!({
                        "path": x.path, "exported": x.exported, "dropped": x.dropped,
                        "write_errors": x.write_errors, "filtered_out": x.filtered_out,
                        "rotations": x.rotations,
                    }),
                );
            }
            match a.output.output {
                Format::Json => output::print_json(&json)?,
                Format::Text => {
                    if let Some(map) = json.as_object() {
                        for (k, v) in map {
                            println!(
                                "{k}: {}",
                                v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                            );
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        NetdCommand::EchoServer(a) => {
            tokio::task::spawn_blocking(move || echo_server(a.bind)).await??;
            Ok(ExitCode::SUCCESS)
        }
        NetdCommand::Probe(a) => {
            let ok = tokio::task::spawn_blocking(move || probe(&a)).await?;
            match ok {
                Ok(()) => {
                    println!("connected");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("failed: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn echo_server(bind: SocketAddr) -> anyhow::Result<()> {
    let tcp = TcpListener::bind(bind)?;
    let udp = UdpSocket::bind(bind)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    for conn in tcp.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn probe(a: &ProbeArgs) -> anyhow::Result<()> {
    let mut buf = [0u8; 16];
    if a.udp {
        let bind: SocketAddr = if a.connect.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(a.timeout))?;
        s.send_to(b"ping", a.connect)?;
        let (n, _) = s.recv_from(&mut buf)?;
        anyhow::ensure!(&buf[..n] == b"ping", "unexpected reply");
    } else {
        let mut s = TcpStream::connect_timeout(&a.connect, a.timeout)?;
        s.set_read_timeout(Some(a.timeout))?;
        s.write_all(b"ping")?;
        s.read_exact(&mut buf[..4])?;
        anyhow::ensure!(&buf[..4] == b"ping", "unexpected reply");
    }
    Ok(())
}
