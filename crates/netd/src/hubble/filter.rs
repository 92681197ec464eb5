//! Hubble's flow filters, compiled once per request: a flow passes when the whitelist is empty or
//! one whitelist filter matches, and no blacklist filter matches; inside a filter every field set
//! must match, and a field matches when any of its values does. A request using a field sigil
//! cannot evaluate (DNS names, services, L7, workloads, trace ids) is refused rather than
//! answered as if the field were absent.

use std::net::IpAddr;

use sigil_proto::flow as fpb;

/// A filter field that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: invalid value {value:?}: {reason}")]
pub struct FilterError {
    /// The field path, e.g. `whitelist[0].source_ip[1]`.
    pub field: String,
    /// The offending value.
    pub value: String,
    /// Why.
    pub reason: String,
}

fn err(field: String, value: impl Into<String>, reason: impl Into<String>) -> FilterError {
    FilterError {
        field,
        value: value.into(),
        reason: reason.into(),
    }
}

/// An address or CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if a.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Cidr { addr: a, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & m == u32::from(b) & m
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & m == u128::from(b) & m
            }
            _ => false,
        }
    }
}

/// `[namespace/]pod-name-prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pod {
    namespace: Option<String>,
    prefix: String,
}

impl Pod {
    fn matches(&self, ep: &fpb::Endpoint) -> bool {
        if ep.pod_name.is_empty() {
            return false;
        }
        self.namespace.as_ref().is_none_or(|ns| *ns == ep.namespace)
            && ep.pod_name.starts_with(&self.prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement of a label selector: `[source:]key` with an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    /// `None`: any source.
    source: Option<String>,
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A label of a flow endpoint, `source:key=value`.
fn split_label(l: &str) -> (&str, &str, &str) {
    let (source, rest) = l.split_once(':').unwrap_or(("", l));
    let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
    (source, key, value)
}

impl Requirement {
    fn value_of<'a>(&self, labels: &'a [String]) -> Option<&'a str> {
        labels.iter().find_map(|l| {
            let (s, k, v) = split_label(l);
            let source_ok = self
                .source
                .as_deref()
                .is_none_or(|want| want == "any" || want == s);
            (source_ok && k == self.key).then_some(v)
        })
    }

    fn matches(&self, labels: &[String]) -> bool {
        let v = self.value_of(labels);
        match self.op {
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
            Op::In => v.is_some_and(|v| self.values.iter().any(|w| w == v)),
            Op::NotIn => v.is_none_or(|v| self.values.iter().all(|w| w != v)),
        }
    }
}

/// Splits a selector at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_key(k: &str) -> Result<(Option<String>, String), String> {
    let k = k.trim();
    let (source, key) = match k.split_once(':') {
        Some((s, key)) => (Some(s.to_owned()), key),
        None => (None, k),
    };
    let bad = |c: char| c.is_whitespace() || matches!(c, '=' | '!' | '(' | ')' | ',');
    if key.is_empty() || key.contains(bad) {
        return Err(format!("{k:?} is not a label key"));
    }
    if source
        .as_deref()
        .is_some_and(|s| s.is_empty() || s.contains(bad))
    {
        return Err(format!("{k:?} has an empty or malformed source"));
    }
    Ok((source, key.to_owned()))
}

/// Parses a Kubernetes-style label selector: `key=value`, `key==value`, `key!=value`, `key`,
/// `!key`, `key in (a,b)`, `key notin (a,b)`, joined by commas (all must hold).
fn parse_selector(s: &str) -> Result<Vec<Requirement>, String> {
    if s.trim().is_empty() {
        return Err("an empty selector".into());
    }
    let mut reqs = Vec::new();
    for part in split_top(s) {
        let p = part.trim();
        if p.is_empty() {
            return Err("an empty requirement between commas".into());
        }
        let req = if let Some(k) = p.strip_prefix('!') {
            let (source, key) = parse_key(k)?;
            Requirement {
                source,
                key,
                op: Op::DoesNotExist,
                values: Vec::new(),
            }
        } else if let Some((k, v)) = p.split_once("!=") {
            let (source, key) = parse_key(k)?;
            Requirement {
                source,
                key,
                op: Op::NotIn,
                values: vec![v.trim().to_owned()],
            }
        } else if let Some((k, v)) = p.split_once('=') {
            let v = v.strip_prefix('=').unwrap_or(v);
            let (source, key) = parse_key(k)?;
            Requirement {
                source,
                key,
                op: Op::In,
                values: vec![v.trim().to_owned()],
            }
        } else if let Some((k, rest)) = p
            .split_once(" notin ")
            .map(|(k, r)| (k, (Op::NotIn, r)))
            .or_else(|| p.split_once(" in ").map(|(k, r)| (k, (Op::In, r))))
        {
            let (op, list) = rest;
            let list = list.trim();
            let inner = list
                .strip_prefix('(')
                .and_then(|l| l.strip_suffix(')'))
                .ok_or_else(|| format!("{list:?}: the values must be in parentheses"))?;
            let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
            if values.iter().any(String::is_empty) {
                return Err(format!("{list:?}: an empty value"));
            }
            let (source, key) = parse_key(k)?;
            Requirement {
                source,
                key,
                op,
                values,
            }
        } else {
            let (source, key) = parse_key(p)?;
            Requirement {
                source,
                key,
                op: Op::Exists,
                values: Vec::new(),
            }
        };
        reqs.push(req);
    }
    Ok(reqs)
}

/// A node name pattern: `*` matches any run of characters without a dot.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else {
                return false;
            };
            // Try every split of `rest` where the star's run stops before a dot.
            let mut end = 0;
            loop {
                if glob(tail, &rest[end..]) {
                    return true;
                }
                match rest[end..].chars().next() {
                    Some(c) if c != '.' => end += c.len_utf8(),
                    _ => return false,
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmpv4,
    Icmpv6,
    Icmp,
}

/// One compiled `FlowFilter`.
#[derive(Debug, Default, Clone)]
struct Compiled {
    uuid: Vec<String>,
    source_ip: Vec<Cidr>,
    destination_ip: Vec<Cidr>,
    source_pod: Vec<Pod>,
    destination_pod: Vec<Pod>,
    source_label: Vec<Vec<Requirement>>,
    destination_label: Vec<Vec<Requirement>>,
    source_identity: Vec<u32>,
    destination_identity: Vec<u32>,
    traffic_direction: Vec<i32>,
    verdict: Vec<i32>,
    event_type: Vec<fpb::EventTypeFilter>,
    protocol: Vec<Proto>,
    source_port: Vec<u32>,
    destination_port: Vec<u32>,
    reply: Vec<bool>,
    tcp_flags: Vec<fpb::TcpFlags>,
    node_name: Vec<String>,
    ip_version: Vec<i32>,
}

fn tcp_bits(f: &fpb::TcpFlags) -> u16 {
    [f.fin, f.syn, f.rst, f.psh, f.ack, f.urg, f.ece, f.cwr, f.ns]
        .iter()
        .enumerate()
        .fold(0, |acc, (i, b)| if *b { acc | (1 << i) } else { acc })
}

fn ports(f: &fpb::Flow) -> Option<(u32, u32)> {
    use fpb::layer4::Protocol;
    match f.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        Protocol::Sctp(s) => Some((s.source_port, s.destination_port)),
        _ => None,
    }
}

fn ip_of(s: Option<&String>) -> Option<IpAddr> {
    s?.parse().ok()
}

impl Compiled {
    fn new(f: &fpb::FlowFilter, path: &str) -> Result<Compiled, FilterError> {
        let unsupported = |name: &str, set: bool, what: &str| {
            if set {
                Err(err(
                    format!("{path}.{name}"),
                    "",
                    format!("not supported by sigil-netd ({what})"),
                ))
            } else {
                Ok(())
            }
        };
        unsupported("source_fqdn", !f.source_fqdn.is_empty(), "no DNS names")?;
        unsupported(
            "destination_fqdn",
            !f.destination_fqdn.is_empty(),
            "no DNS names",
        )?;
        unsupported(
            "source_service",
            !f.source_service.is_empty(),
            "no services",
        )?;
        unsupported(
            "destination_service",
            !f.destination_service.is_empty(),
            "no services",
        )?;
        unsupported(
            "source_workload",
            !f.source_workload.is_empty(),
            "no workloads",
        )?;
        unsupported(
            "destination_workload",
            !f.destination_workload.is_empty(),
            "no workloads",
        )?;
        unsupported(
            "http_status_code",
            !f.http_status_code.is_empty(),
            "no L7 flows",
        )?;
        unsupported("http_method", !f.http_method.is_empty(), "no L7 flows")?;
        unsupported("http_path", !f.http_path.is_empty(), "no L7 flows")?;
        unsupported("dns_query", !f.dns_query.is_empty(), "no L7 flows")?;
        unsupported("trace_id", !f.trace_id.is_empty(), "no trace contexts")?;

        let cidrs = |name: &str, v: &[String]| {
            v.iter()
                .enumerate()
                .map(|(i, s)| {
                    Cidr::parse(s).ok_or_else(|| {
                        err(
                            format!("{path}.{name}[{i}]"),
                            s.as_str(),
                            "not an IP address or CIDR",
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let pods = |name: &str, v: &[String]| {
            v.iter()
                .enumerate()
                .map(|(i, s)| {
                    let pod = match s.split_once('/') {
                        Some((ns, p)) => Pod {
                            namespace: Some(ns.to_owned()),
                            prefix: p.to_owned(),
                        },
                        None => Pod {
                            namespace: None,
                            prefix: s.clone(),
                        },
                    };
                    if pod.namespace.as_deref() == Some("") || s.is_empty() {
                        return Err(err(
                            format!("{path}.{name}[{i}]"),
                            s.as_str(),
                            "want [namespace/]pod-name-prefix",
                        ));
                    }
                    Ok(pod)
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let selectors = |name: &str, v: &[String]| {
            v.iter()
                .enumerate()
                .map(|(i, s)| {
                    parse_selector(s).map_err(|r| err(format!("{path}.{name}[{i}]"), s.as_str(), r))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let port_list = |name: &str, v: &[String]| {
            v.iter()
                .enumerate()
                .map(|(i, s)| {
                    s.trim().parse::<u16>().map(u32::from).map_err(|_| {
                        err(
                            format!("{path}.{name}[{i}]"),
                            s.as_str(),
                            "not a port number (0-65535)",
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let enums = |name: &str, v: &[i32], ok: &dyn Fn(i32) -> bool| {
            v.iter()
                .enumerate()
                .map(|(i, x)| {
                    if ok(*x) {
                        Ok(*x)
                    } else {
                        Err(err(
                            format!("{path}.{name}[{i}]"),
                            x.to_string(),
                            "not a known value",
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let protocol = f
            .protocol
            .iter()
            .enumerate()
            .map(|(i, p)| match p.to_ascii_lowercase().as_str() {
                "tcp" => Ok(Proto::Tcp),
                "udp" => Ok(Proto::Udp),
                "sctp" => Ok(Proto::Sctp),
                "icmp" => Ok(Proto::Icmp),
                "icmpv4" => Ok(Proto::Icmpv4),
                "icmpv6" => Ok(Proto::Icmpv6),
                _ => Err(err(
                    format!("{path}.protocol[{i}]"),
                    p.as_str(),
                    "want tcp, udp, sctp, icmp, icmpv4 or icmpv6 (sigil-netd has no L7 flows)",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, n) in f.node_name.iter().enumerate() {
            if n.is_empty() {
                return Err(err(
                    format!("{path}.node_name[{i}]"),
                    "",
                    "an empty pattern",
                ));
            }
        }
        for (i, e) in f.event_type.iter().enumerate() {
            if e.r#type < 0 || e.r#type > 255 {
                return Err(err(
                    format!("{path}.event_type[{i}].type"),
                    e.r#type.to_string(),
                    "not a monitor message type (0-255)",
                ));
            }
        }
        Ok(Compiled {
            uuid: f.uuid.clone(),
            source_ip: cidrs("source_ip", &f.source_ip)?,
            destination_ip: cidrs("destination_ip", &f.destination_ip)?,
            source_pod: pods("source_pod", &f.source_pod)?,
            destination_pod: pods("destination_pod", &f.destination_pod)?,
            source_label: selectors("source_label", &f.source_label)?,
            destination_label: selectors("destination_label", &f.destination_label)?,
            source_identity: f.source_identity.clone(),
            destination_identity: f.destination_identity.clone(),
            traffic_direction: enums("traffic_direction", &f.traffic_direction, &|x| {
                fpb::TrafficDirection::try_from(x).is_ok()
            })?,
            verdict: enums("verdict", &f.verdict, &|x| {
                fpb::Verdict::try_from(x).is_ok()
            })?,
            event_type: f.event_type.clone(),
            protocol,
            source_port: port_list("source_port", &f.source_port)?,
            destination_port: port_list("destination_port", &f.destination_port)?,
            reply: f.reply.clone(),
            tcp_flags: f.tcp_flags.clone(),
            node_name: f.node_name.clone(),
            ip_version: enums("ip_version", &f.ip_version, &|x| {
                fpb::IpVersion::try_from(x).is_ok()
            })?,
        })
    }

    fn matches(&self, f: &fpb::Flow) -> bool {
        fn any<T>(v: &[T], pred: impl Fn(&T) -> bool) -> bool {
            v.is_empty() || v.iter().any(pred)
        }
        let empty = fpb::Endpoint::default();
        let src = f.source.as_ref().unwrap_or(&empty);
        let dst = f.destination.as_ref().unwrap_or(&empty);
        let sip = ip_of(f.ip.as_ref().map(|i| &i.source));
        let dip = ip_of(f.ip.as_ref().map(|i| &i.destination));
        let p = ports(f);
        let et = f.event_type.unwrap_or_default();
        any(&self.uuid, |u| *u == f.uuid)
            && any(&self.source_ip, |c| sip.is_some_and(|ip| c.contains(ip)))
            && any(&self.destination_ip, |c| {
                dip.is_some_and(|ip| c.contains(ip))
            })
            && any(&self.source_pod, |p| p.matches(src))
            && any(&self.destination_pod, |p| p.matches(dst))
            && any(&self.source_label, |s| {
                s.iter().all(|r| r.matches(&src.labels))
            })
            && any(&self.destination_label, |s| {
                s.iter().all(|r| r.matches(&dst.labels))
            })
            && any(&self.source_identity, |i| *i == src.identity)
            && any(&self.destination_identity, |i| *i == dst.identity)
            && any(&self.traffic_direction, |d| *d == f.traffic_direction)
            && any(&self.verdict, |v| *v == f.verdict)
            && any(&self.event_type, |e| {
                e.r#type == et.r#type && (!e.match_sub_type || e.sub_type == et.sub_type)
            })
            && any(&self.protocol, |want| proto_matches(*want, f))
            && any(&self.source_port, |port| p.is_some_and(|(s, _)| s == *port))
            && any(&self.destination_port, |port| {
                p.is_some_and(|(_, d)| d == *port)
            })
            && any(&self.reply, |r| f.is_reply == Some(*r))
            && any(&self.tcp_flags, |want| {
                let have = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                    Some(fpb::layer4::Protocol::Tcp(t)) => {
                        t.flags.as_ref().map(tcp_bits).unwrap_or(0)
                    }
                    _ => return false,
                };
                let want = tcp_bits(want);
                have & want == want
            })
            && any(&self.node_name, |n| glob(n, &f.node_name))
            && any(&self.ip_version, |v| {
                f.ip.as_ref().is_some_and(|ip| ip.ip_version == *v)
            })
    }
}

fn proto_matches(want: Proto, f: &fpb::Flow) -> bool {
    use fpb::layer4::Protocol;
    let Some(p) = f.l4.as_ref().and_then(|l| l.protocol.as_ref()) else {
        return false;
    };
    matches!(
        (want, p),
        (Proto::Tcp, Protocol::Tcp(_))
            | (Proto::Udp, Protocol::Udp(_))
            | (Proto::Sctp, Protocol::Sctp(_))
            | (Proto::Icmpv4 | Proto::Icmp, Protocol::IcmPv4(_))
            | (Proto::Icmpv6 | Proto::Icmp, Protocol::IcmPv6(_))
    )
}

/// A request's whitelist and blacklist, compiled.
#[derive(Debug, Default, Clone)]
pub struct Filters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl Filters {
    /// Compiles `whitelist` and `blacklist`; an error names the field path and value.
    pub fn new(
        whitelist: &[fpb::FlowFilter],
        blacklist: &[fpb::FlowFilter],
    ) -> Result<Filters, FilterError> {
        let compile = |name: &str, v: &[fpb::FlowFilter]| {
            v.iter()
                .enumerate()
                .map(|(i, f)| Compiled::new(f, &format!("{name}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Filters {
            whitelist: compile("whitelist", whitelist)?,
            blacklist: compile("blacklist", blacklist)?,
        })
    }

    /// Whether `f` passes.
    pub fn matches(&self, f: &fpb::Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|c| c.matches(f)))
            && !self.blacklist.iter().any(|c| c.matches(f))
    }
}

#[cfg(test)]
mod tests;
