//! `sigil monitor`: streams sigil-netd's verdict and drop events, one line each (text, or JSON
//! lines with `--output json`).

use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::monitor_client::MonitorClient;

use crate::client;
use crate::cmd::netd::NetdSocket;
use crate::output::{self, Format, OutputArg};

/// Flags of `sigil monitor`.
#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    socket: NetdSocket,
    #[command(flatten)]
    output: OutputArg,
    /// Only dropped packets.
    #[arg(long)]
    drops_only: bool,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

/// An event as JSON.
pub fn event_json(e: &pb::Event) -> serde_json::Value {
    let peer = |p: &Option<pb::Peer>| {
        let p = p.clone().unwrap_or_default();
        serde_json::json!({
            "identity": p.identity, "labels": p.labels, "endpoint": p.endpoint,
            "addr": p.addr, "port": p.port,
        })
    };
    serde_json::json!({
        "ts_ns": e.ts_ns, "verdict": e.verdict, "direction": e.direction,
        "endpoint_id": e.endpoint_id, "endpoint": e.endpoint,
        "src": peer(&e.src), "dst": peer(&e.dst), "protocol": proto_name(e.protocol),
        "drop_reason": e.drop_reason, "drop_reason_name": e.drop_reason_name,
        "rule_cookie": e.rule_cookie, "rule": e.rule,
    })
}

fn proto_name(p: u32) -> String {
    match p {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        132 => "sctp".to_owned(),
        1 => "icmp".to_owned(),
        58 => "icmpv6".to_owned(),
        other => other.to_string(),
    }
}

/// One readable line: `-> DROPPED (Policy denied, 133) frontend[identity 256 k8s:app=x] 10.0.0.2:4321 -> backend[...] 10.0.0.3:8080 tcp`.
pub fn event_line(e: &pb::Event) -> String {
    let verdict = match e.verdict.as_str() {
        "dropped" => {
            let mut name = e.drop_reason_name.clone();
            if let Some(first) = name.get_mut(0..1) {
                first.make_ascii_uppercase();
            }
            format!("DROPPED ({name}, {})", e.drop_reason)
        }
        "allowed-reply" => "ALLOWED (reply)".to_owned(),
        _ => "ALLOWED".to_owned(),
    };
    let peer = |p: &Option<pb::Peer>| {
        let p = p.clone().unwrap_or_default();
        let name = if p.endpoint.is_empty() {
            "-".to_owned()
        } else {
            p.endpoint.clone()
        };
        let labels: Vec<&String> = p
            .labels
            .iter()
            .filter(|l| !l.starts_with("k8s:io.kubernetes.pod.namespace="))
            .collect();
        let labels = labels
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let addr = if p.addr.contains(':') {
            format!("[{}]", p.addr)
        } else {
            p.addr.clone()
        };
        let port = if p.port == 0 {
            String::new()
        } else {
            format!(":{}", p.port)
        };
        format!("{name}[identity {} {labels}] {addr}{port}", p.identity)
    };
    let rule = match &e.rule {
        Some(r) => format!(" by {r}"),
        None => String::new(),
    };
    format!(
        "-> {verdict} {} -> {} {} ({} of {}){rule}",
        peer(&e.src),
        peer(&e.dst),
        proto_name(e.protocol),
        e.direction,
        if e.endpoint.is_empty() {
            "-"
        } else {
            &e.endpoint
        },
    )
}

/// Runs `sigil monitor`.
pub async fn run(a: MonitorArgs) -> anyhow::Result<()> {
    let mut c = MonitorClient::new(a.socket.connect().await?);
    let mut stream = client::reply(c.events(pb::EventsRequest {}).await)?;
    let mut seen = 0u64;
    while let Some(ev) = stream.message().await.map_err(client::RpcError)? {
        if a.drops_only && ev.verdict != "dropped" {
            continue;
        }
        match a.output.output {
            Format::Json => output::print_json(&event_json(&ev))?,
            Format::Text => println!("{}", event_line(&ev)),
        }
        seen += 1;
        if a.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_lines_name_reason_peers_and_ports() {
        let e = pb::Event {
            verdict: "dropped".into(),
            direction: "ingress".into(),
            endpoint: "backend".into(),
            src: Some(pb::Peer {
                identity: 256,
                labels: vec![
                    "k8s:app=frontend".into(),
                    "k8s:io.kubernetes.pod.namespace=default".into(),
                ],
                endpoint: "frontend".into(),
                addr: "10.200.0.2".into(),
                port: 43210,
            }),
            dst: Some(pb::Peer {
                identity: 257,
                labels: vec!["k8s:app=backend".into()],
                endpoint: "backend".into(),
                addr: "10.200.0.3".into(),
                port: 8080,
            }),
            protocol: 6,
            drop_reason: 133,
            drop_reason_name: "policy denied".into(),
            ..pb::Event::default()
        };
        assert_eq!(
            event_line(&e),
            "-> DROPPED (Policy denied, 133) frontend[identity 256 k8s:app=frontend] 10.200.0.2:43210 \
             -> backend[identity 257 k8s:app=backend] 10.200.0.3:8080 tcp (ingress of backend)"
        );
        assert_eq!(event_json(&e)["src"]["labels"][0], "k8s:app=frontend");
        assert!(event_json(&e)["rule"].is_null());
    }

    #[test]
    fn lines_name_the_deciding_rule() {
        let e = pb::Event {
            verdict: "dropped".into(),
            direction: "ingress".into(),
            endpoint: "backend".into(),
            protocol: 6,
            drop_reason: 181,
            drop_reason_name: "policy deny".into(),
            rule_cookie: 7,
            rule: Some("CiliumNetworkPolicy/default/no-ssh: spec.ingressDeny[0]".into()),
            ..pb::Event::default()
        };
        assert!(
            event_line(&e).ends_with(
                "(ingress of backend) by CiliumNetworkPolicy/default/no-ssh: spec.ingressDeny[0]"
            ),
            "{}",
            event_line(&e)
        );
        let j = event_json(&e);
        assert_eq!(j["rule_cookie"], 7);
        assert_eq!(
            j["rule"],
            "CiliumNetworkPolicy/default/no-ssh: spec.ingressDeny[0]"
        );
    }
}
