//! `hubble observe`'s filter flags → a `GetFlowsRequest`'s whitelist and blacklist, built the way
//! the Hubble CLI builds them: flags in command-line order; `--not` sends the next filter to the
//! blacklist; a list is `left OR right`: a non-directional flag (`--ip`) sets the source field of
//! the left filter and the destination field of the right one (source OR destination), every other
//! flag (`--from-ip`, `--verdict`) is a condition of both; two identical filters are sent as one.
//! Values are checked here so a bad one names its flag.

use std::net::IpAddr;

use sigil_proto::flow as fpb;

/// A filter flag's value that cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub struct FlagError(pub String);

impl std::fmt::Display for FlagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FlagError {}

fn bad(flag: &str, value: &str, why: &str) -> FlagError {
    FlagError(format!("--{flag}: invalid value {value:?}: {why}"))
}

/// Every filter flag (`--not` aside), by its long name.
pub const FILTER_FLAGS: &[&str] = &[
    "ip",
    "from-ip",
    "to-ip",
    "pod",
    "from-pod",
    "to-pod",
    "namespace",
    "from-namespace",
    "to-namespace",
    "label",
    "from-label",
    "to-label",
    "identity",
    "from-identity",
    "to-identity",
    "port",
    "from-port",
    "to-port",
    "verdict",
    "protocol",
    "type",
    "traffic-direction",
    "node-name",
    "uuid",
    "ip-version",
    "tcp-flags",
    "reply",
];

/// Pairs that cannot be combined in one list (Hubble's rule): `--ip` fills the source field of
/// one filter and the destination field of the other, which `--from-ip` would break.
fn conflicts(a: &str, b: &str) -> bool {
    let base = |f: &str| {
        f.strip_prefix("from-")
            .or_else(|| f.strip_prefix("to-"))
            .map(str::to_owned)
    };
    (base(a).as_deref() == Some(b)) || (base(b).as_deref() == Some(a))
}

/// One list (whitelist or blacklist) being built: `left OR right`.
#[derive(Default)]
struct Tracker {
    left: Option<fpb::FlowFilter>,
    right: Option<fpb::FlowFilter>,
    used: Vec<String>,
}

enum Side {
    Both,
    /// Source field on the left, destination field on the right.
    Split,
}

impl Tracker {
    fn left(&mut self) -> &mut fpb::FlowFilter {
        self.left.get_or_insert_with(Default::default)
    }

    fn right(&mut self) -> &mut fpb::FlowFilter {
        self.right.get_or_insert_with(Default::default)
    }

    fn filters(self) -> Vec<fpb::FlowFilter> {
        match (self.left, self.right) {
            (Some(l), Some(r)) if l == r => vec![l],
            (l, r) => l.into_iter().chain(r).collect(),
        }
    }
}

/// The whitelist and blacklist being built from the flags, in order.
#[derive(Default)]
pub struct FilterBuilder {
    white: Tracker,
    black: Tracker,
    negate_next: bool,
}

fn parse_ip(flag: &str, v: &str) -> Result<String, FlagError> {
    let (addr, prefix) = match v.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (v, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| bad(flag, v, "not an IP address or CIDR"))?;
    if let Some(p) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match p.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => return Err(bad(flag, v, &format!("prefix length must be 0..={max}"))),
        }
    }
    Ok(v.to_owned())
}

fn parse_port(flag: &str, v: &str) -> Result<String, FlagError> {
    v.parse::<u16>()
        .map(|p| p.to_string())
        .map_err(|_| bad(flag, v, "not a port number (0-65535)"))
}

/// Cilium's reserved identities by name.
pub const RESERVED_IDENTITIES: &[(&str, u32)] = &[
    ("host", 1),
    ("world", 2),
    ("unmanaged", 3),
    ("health", 4),
    ("init", 5),
    ("remote-node", 6),
    ("kube-apiserver", 7),
    ("ingress", 8),
];

fn parse_identity(flag: &str, v: &str) -> Result<u32, FlagError> {
    if let Some((_, n)) = RESERVED_IDENTITIES.iter().find(|(name, _)| *name == v) {
        return Ok(*n);
    }
    match v.parse::<u32>() {
        Ok(n) if n < 1 << 24 => Ok(n),
        _ => Err(bad(
            flag,
            v,
            "not a numeric identity (0-16777215) or a reserved identity name (host, world, ...)",
        )),
    }
}

fn parse_verdict(flag: &str, v: &str) -> Result<i32, FlagError> {
    let upper = v.to_ascii_uppercase();
    match fpb::Verdict::from_str_name(&upper) {
        Some(x) if x != fpb::Verdict::Unknown => Ok(x as i32),
        _ => Err(bad(
            flag,
            v,
            "one of FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED, TRANSLATED",
        )),
    }
}

fn parse_protocol(flag: &str, v: &str) -> Result<String, FlagError> {
    let lower = v.to_ascii_lowercase();
    match lower.as_str() {
        "tcp" | "udp" | "icmp" | "icmpv4" | "icmpv6" | "sctp" => Ok(lower),
        _ => Err(bad(flag, v, "one of tcp, udp, icmp, icmpv4, icmpv6, sctp")),
    }
}

/// Cilium's monitor message types by Hubble's names.
pub const EVENT_TYPES: &[(&str, i32)] = &[
    ("drop", 1),
    ("debug", 2),
    ("capture", 3),
    ("trace", 4),
    ("policy-verdict", 5),
    ("recorder", 6),
    ("trace-sock", 7),
    ("l7", 129),
    ("agent", 130),
];

/// Cilium's trace sub-types (observation points) by Hubble's names.
pub const TRACE_SUB_TYPES: &[(&str, i32)] = &[
    ("to-endpoint", 0),
    ("to-proxy", 1),
    ("to-host", 2),
    ("to-stack", 3),
    ("to-overlay", 4),
    ("from-endpoint", 5),
    ("from-proxy", 6),
    ("from-host", 7),
    ("from-stack", 8),
    ("from-overlay", 9),
    ("from-network", 10),
    ("to-network", 11),
];

fn parse_type(flag: &str, v: &str) -> Result<fpb::EventTypeFilter, FlagError> {
    let (name, sub) = match v.split_once(':') {
        Some((n, s)) => (n, Some(s)),
        None => (v, None),
    };
    let names = || {
        EVENT_TYPES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ty = EVENT_TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .or_else(|| name.parse::<i32>().ok().filter(|t| (0..=255).contains(t)))
        .ok_or_else(|| bad(flag, v, &format!("unknown event type (one of {})", names())))?;
    let mut f = fpb::EventTypeFilter {
        r#type: ty,
        ..Default::default()
    };
    if let Some(sub) = sub {
        let by_name = if ty == 4 {
            TRACE_SUB_TYPES
                .iter()
                .find(|(n, _)| *n == sub)
                .map(|(_, s)| *s)
        } else {
            None
        };
        f.sub_type = by_name
            .or_else(|| sub.parse::<i32>().ok().filter(|s| (0..=255).contains(s)))
            .ok_or_else(|| {
                bad(
                    flag,
                    v,
                    "unknown sub-type (a number, or for trace: to-endpoint, to-stack, ...)",
                )
            })?;
        f.match_sub_type = true;
    }
    Ok(f)
}

fn parse_direction(flag: &str, v: &str) -> Result<i32, FlagError> {
    match v.to_ascii_lowercase().as_str() {
        "ingress" => Ok(fpb::TrafficDirection::Ingress as i32),
        "egress" => Ok(fpb::TrafficDirection::Egress as i32),
        _ => Err(bad(flag, v, "one of ingress, egress")),
    }
}

fn nonempty(flag: &str, v: &str) -> Result<String, FlagError> {
    if v.trim().is_empty() {
        Err(bad(flag, v, "must not be empty"))
    } else {
        Ok(v.to_owned())
    }
}

fn parse_tcp_flags(flag: &str, v: &str) -> Result<fpb::TcpFlags, FlagError> {
    let mut f = fpb::TcpFlags::default();
    for name in v.split(',') {
        let slot = match name.trim().to_ascii_uppercase().as_str() {
            "FIN" => &mut f.fin,
            "SYN" => &mut f.syn,
            "RST" => &mut f.rst,
            "PSH" => &mut f.psh,
            "ACK" => &mut f.ack,
            "URG" => &mut f.urg,
            "ECE" => &mut f.ece,
            "CWR" => &mut f.cwr,
            "NS" => &mut f.ns,
            _ => {
                return Err(bad(
                    flag,
                    v,
                    "comma-separated TCP flags (SYN, ACK, FIN, RST, PSH, URG, ECE, CWR, NS)",
                ));
            }
        };
        *slot = true;
    }
    Ok(f)
}

impl FilterBuilder {
    /// `--not`: the next filter flag goes to the blacklist.
    pub fn not(&mut self) {
        self.negate_next = true;
    }

    /// Applies filter flag `flag` (a name of [`FILTER_FLAGS`]) with `value`.
    pub fn add(&mut self, flag: &str, value: &str) -> Result<(), FlagError> {
        let t = if std::mem::take(&mut self.negate_next) {
            &mut self.black
        } else {
            &mut self.white
        };
        if let Some(other) = t.used.iter().find(|u| conflicts(u, flag)) {
            return Err(FlagError(format!(
                "filters --{other} and --{flag} cannot be combined"
            )));
        }
        if !t.used.iter().any(|u| u == flag) {
            t.used.push(flag.to_owned());
        }
        let dir = |side: Side,
                   t: &mut Tracker,
                   src: &dyn Fn(&mut fpb::FlowFilter),
                   dst: &dyn Fn(&mut fpb::FlowFilter)| match side {
            Side::Both => {
                src(t.left());
                src(t.right());
            }
            Side::Split => {
                src(t.left());
                dst(t.right());
            }
        };
        let (side, base) = if let Some(b) = flag.strip_prefix("from-") {
            (Side::Both, b)
        } else if let Some(b) = flag.strip_prefix("to-") {
            // A `--to-x` sets the destination field (of both filters).
            (Side::Both, b)
        } else {
            (Side::Split, flag)
        };
        let to = flag.starts_with("to-");
        // The source setter of a `--to-x` flag sets the destination field.
        macro_rules! directional {
            ($val:expr, $src:ident, $dst:ident) => {{
                let v = $val;
                let v2 = v.clone();
                if to {
                    dir(side, t, &|f| f.$dst.push(v.clone()), &|_| {});
                } else {
                    dir(side, t, &|f| f.$src.push(v.clone()), &|f| {
                        f.$dst.push(v2.clone())
                    });
                }
            }};
        }
        match base {
            "ip" => directional!(parse_ip(flag, value)?, source_ip, destination_ip),
            "pod" => directional!(nonempty(flag, value)?, source_pod, destination_pod),
            "namespace" => {
                let ns = nonempty(flag, value)?;
                if ns.contains('/') {
                    return Err(bad(flag, value, "a namespace has no '/'"));
                }
                directional!(format!("{ns}/"), source_pod, destination_pod)
            }
            "label" => directional!(nonempty(flag, value)?, source_label, destination_label),
            "identity" => directional!(
                parse_identity(flag, value)?,
                source_identity,
                destination_identity
            ),
            "port" => directional!(parse_port(flag, value)?, source_port, destination_port),
            "verdict" => {
                let v = parse_verdict(flag, value)?;
                dir(Side::Both, t, &|f| f.verdict.push(v), &|_| {});
            }
            "protocol" => {
                let v = parse_protocol(flag, value)?;
                dir(Side::Both, t, &|f| f.protocol.push(v.clone()), &|_| {});
            }
            "type" => {
                let v = parse_type(flag, value)?;
                dir(Side::Both, t, &|f| f.event_type.push(v), &|_| {});
            }
            "traffic-direction" => {
                let v = parse_direction(flag, value)?;
                dir(Side::Both, t, &|f| f.traffic_direction.push(v), &|_| {});
            }
            "node-name" => {
                let v = nonempty(flag, value)?;
                dir(Side::Both, t, &|f| f.node_name.push(v.clone()), &|_| {});
            }
            "uuid" => {
                let v = nonempty(flag, value)?;
                dir(Side::Both, t, &|f| f.uuid.push(v.clone()), &|_| {});
            }
            "ip-version" => {
                let v = match value.to_ascii_lowercase().as_str() {
                    "4" | "v4" | "ipv4" => fpb::IpVersion::IPv4 as i32,
                    "6" | "v6" | "ipv6" => fpb::IpVersion::IPv6 as i32,
                    _ => return Err(bad(flag, value, "one of 4, 6")),
                };
                dir(Side::Both, t, &|f| f.ip_version.push(v), &|_| {});
            }
            "tcp-flags" => {
                let v = parse_tcp_flags(flag, value)?;
                dir(Side::Both, t, &|f| f.tcp_flags.push(v), &|_| {});
            }
            "reply" => {
                let v = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad(flag, value, "true or false")),
                };
                dir(Side::Both, t, &|f| f.reply.push(v), &|_| {});
            }
            _ => return Err(FlagError(format!("--{flag}: not a filter flag"))),
        }
        Ok(())
    }

    /// The whitelist and the blacklist; a trailing `--not` is an error.
    pub fn build(self) -> Result<(Vec<fpb::FlowFilter>, Vec<fpb::FlowFilter>), FlagError> {
        if self.negate_next {
            return Err(FlagError(
                "--not: must be followed by the filter it negates (e.g. --not --from-ip 10.0.0.1)"
                    .into(),
            ));
        }
        Ok((self.white.filters(), self.black.filters()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(
        flags: &[(&str, &str)],
    ) -> Result<(Vec<fpb::FlowFilter>, Vec<fpb::FlowFilter>), FlagError> {
        let mut b = FilterBuilder::default();
        for (f, v) in flags {
            if *f == "not" {
                b.not();
            } else {
                b.add(f, v)?;
            }
        }
        b.build()
    }

    #[test]
    fn a_non_directional_flag_is_source_or_destination() {
        let (w, bl) = build(&[("ip", "10.0.0.1")]).unwrap();
        assert!(bl.is_empty());
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].source_ip, vec!["10.0.0.1"]);
        assert!(w[0].destination_ip.is_empty());
        assert_eq!(w[1].destination_ip, vec!["10.0.0.1"]);
        assert!(w[1].source_ip.is_empty());
    }

    #[test]
    fn directional_and_common_flags_make_one_filter() {
        let (w, _) = build(&[
            ("from-ip", "10.0.0.1"),
            ("to-port", "8080"),
            ("verdict", "dropped"),
            ("protocol", "TCP"),
            ("type", "trace:to-endpoint"),
            ("from-identity", "world"),
        ])
        .unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        let f = &w[0];
        assert_eq!(f.source_ip, vec!["10.0.0.1"]);
        assert_eq!(f.destination_port, vec!["8080"]);
        assert_eq!(f.verdict, vec![fpb::Verdict::Dropped as i32]);
        assert_eq!(f.protocol, vec!["tcp"]);
        assert_eq!(
            f.event_type,
            vec![fpb::EventTypeFilter {
                r#type: 4,
                match_sub_type: true,
                sub_type: 0
            }]
        );
        assert_eq!(f.source_identity, vec![2]);
    }

    #[test]
    fn not_negates_only_the_next_filter() {
        let (w, bl) = build(&[
            ("verdict", "FORWARDED"),
            ("not", ""),
            ("to-port", "9090"),
            ("from-pod", "default/fe"),
        ])
        .unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].verdict, vec![1]);
        assert_eq!(w[0].source_pod, vec!["default/fe"]);
        assert_eq!(bl.len(), 1);
        assert_eq!(bl[0].destination_port, vec!["9090"]);
        assert!(bl[0].verdict.is_empty());
    }

    #[test]
    fn repeated_flags_are_alternatives() {
        let (w, _) = build(&[("verdict", "DROPPED"), ("verdict", "FORWARDED")]).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].verdict, vec![2, 1]);
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        for (flag, value, want) in [
            (
                "from-ip",
                "10.0.0.300",
                "--from-ip: invalid value \"10.0.0.300\"",
            ),
            ("ip", "10.0.0.0/33", "--ip: invalid value \"10.0.0.0/33\""),
            ("port", "65536", "--port: invalid value \"65536\""),
            ("to-port", "http", "--to-port: invalid value \"http\""),
            ("verdict", "ALLOWED", "--verdict: invalid value \"ALLOWED\""),
            ("protocol", "gre", "--protocol: invalid value \"gre\""),
            ("type", "bogus", "--type: invalid value \"bogus\""),
            (
                "type",
                "trace:nowhere",
                "--type: invalid value \"trace:nowhere\"",
            ),
            (
                "identity",
                "16777216",
                "--identity: invalid value \"16777216\"",
            ),
            (
                "traffic-direction",
                "sideways",
                "--traffic-direction: invalid value",
            ),
            ("label", "", "--label: invalid value \"\""),
            ("tcp-flags", "SYN,XMAS", "--tcp-flags: invalid value"),
        ] {
            let e = build(&[(flag, value)]).expect_err(flag);
            assert!(e.0.starts_with(want), "{e}");
        }
    }

    #[test]
    fn conflicting_and_dangling_flags_are_refused() {
        let e = build(&[("ip", "10.0.0.1"), ("from-ip", "10.0.0.2")]).unwrap_err();
        assert_eq!(e.0, "filters --ip and --from-ip cannot be combined");
        // In different lists they do not conflict.
        build(&[("ip", "10.0.0.1"), ("not", ""), ("from-ip", "10.0.0.2")]).unwrap();
        let e = build(&[("ip", "10.0.0.1"), ("not", "")]).unwrap_err();
        assert!(e.0.starts_with("--not:"), "{e}");
    }
}
