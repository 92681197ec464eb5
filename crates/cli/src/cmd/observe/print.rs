//! `hubble observe`'s output formats for `GetFlowsResponse`s: `compact` (one line per flow),
//! `dict` (KEY: value blocks), `table` (aligned columns), `jsonpb`/`json` (proto3 JSON of the
//! whole response, one per line). Lost-event notices go to stderr in the text formats.

use std::io::Write;

use sigil_proto::flow as fpb;
use sigil_proto::observer as opb;
use sigil_proto::observer::get_flows_response::ResponseTypes;

use super::filter::{EVENT_TYPES, RESERVED_IDENTITIES, TRACE_SUB_TYPES};

/// An output format of `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line per flow.
    Compact,
    /// Each flow as KEY: value lines.
    Dict,
    /// Proto3 JSON of each `GetFlowsResponse` (alias of jsonpb, as in Hubble).
    Json,
    /// Proto3 JSON of each `GetFlowsResponse`.
    Jsonpb,
    /// Tab-aligned columns.
    Table,
}

/// Writes responses in one format.
pub struct Printer<W: Write> {
    format: Format,
    node_name: bool,
    out: W,
    printed: u64,
    /// Table rows held until [`Printer::finish`] (or written at once when following).
    rows: Vec<Vec<String>>,
    follow: bool,
}

/// `Jan _2 15:04:05.000` (Go's StampMilli, Hubble's default), in UTC.
pub fn stamp_milli(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return "N/A".to_owned();
    };
    let days = t.seconds.div_euclid(86_400);
    let secs = t.seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let _year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let name = usize::try_from(month - 1)
        .ok()
        .and_then(|m| MONTHS.get(m))
        .copied()
        .unwrap_or("???");
    format!(
        "{name} {day:>2} {:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        t.nanos / 1_000_000
    )
}

fn ports(f: &fpb::Flow) -> (Option<u32>, Option<u32>) {
    use fpb::layer4::Protocol;
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => (Some(t.source_port), Some(t.destination_port)),
        Some(Protocol::Udp(u)) => (Some(u.source_port), Some(u.destination_port)),
        Some(Protocol::Sctp(s)) => (Some(s.source_port), Some(s.destination_port)),
        _ => (None, None),
    }
}

fn endpoint(ep: Option<&fpb::Endpoint>, ip: &str, port: Option<u32>) -> String {
    let ep = ep.cloned().unwrap_or_default();
    let host = if !ep.pod_name.is_empty() {
        if ep.namespace.is_empty() {
            ep.pod_name.clone()
        } else {
            format!("{}/{}", ep.namespace, ep.pod_name)
        }
    } else if ip.contains(':') && port.is_some() {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    let host = match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    let id = RESERVED_IDENTITIES
        .iter()
        .find(|(_, n)| *n == ep.identity)
        .map(|(name, _)| (*name).to_owned())
        .unwrap_or_else(|| format!("ID:{}", ep.identity));
    format!("{host} ({id})")
}

/// Source and destination as Hubble shows them.
pub fn source_destination(f: &fpb::Flow) -> (String, String) {
    let (sp, dp) = ports(f);
    let ip = f.ip.clone().unwrap_or_default();
    (
        endpoint(f.source.as_ref(), &ip.source, sp),
        endpoint(f.destination.as_ref(), &ip.destination, dp),
    )
}

fn match_type(m: u32) -> &'static str {
    match m {
        1 => "L3-Only",
        2 => "L3-L4",
        3 => "L4-Only",
        4 => "all",
        _ => "none",
    }
}

/// Hubble's type column: the observation point of a trace, the drop reason of a drop,
/// `policy-verdict:<match> <DIRECTION>` of a policy verdict.
pub fn flow_type(f: &fpb::Flow) -> String {
    let et = f.event_type.unwrap_or_default();
    match et.r#type {
        1 => {
            let mut name = sigil_datapath::drop_reason_name(f.drop_reason_desc as u32).to_owned();
            if let Some(c) = name.get_mut(0..1) {
                c.make_ascii_uppercase();
            }
            if name.is_empty() || name == "Unknown" {
                fpb::DropReason::try_from(f.drop_reason_desc)
                    .map(|d| d.as_str_name().to_owned())
                    .unwrap_or_else(|_| format!("drop reason {}", f.drop_reason_desc))
            } else {
                name
            }
        }
        4 => TRACE_SUB_TYPES
            .iter()
            .find(|(_, s)| *s == et.sub_type)
            .map(|(n, _)| (*n).to_owned())
            .unwrap_or_else(|| "trace".to_owned()),
        5 => {
            let m = if f.verdict == fpb::Verdict::Dropped as i32 {
                "none"
            } else {
                match_type(f.policy_match_type)
            };
            let dir = fpb::TrafficDirection::try_from(f.traffic_direction)
                .map(|d| d.as_str_name())
                .unwrap_or("TRAFFIC_DIRECTION_UNKNOWN");
            format!("policy-verdict:{m} {dir}")
        }
        t => EVENT_TYPES
            .iter()
            .find(|(_, n)| *n == t)
            .map(|(n, _)| (*n).to_owned())
            .unwrap_or_else(|| format!("type {t}")),
    }
}

fn verdict(f: &fpb::Flow) -> String {
    fpb::Verdict::try_from(f.verdict)
        .map(|v| v.as_str_name().to_owned())
        .unwrap_or_else(|_| f.verdict.to_string())
}

/// Hubble's summary of the L4 header: `TCP Flags: SYN, ACK`, `UDP`, `ICMPv4 EchoRequest`.
pub fn summary(f: &fpb::Flow) -> String {
    use fpb::layer4::Protocol;
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => {
            let fl = t.flags.unwrap_or_default();
            let names: Vec<&str> = [
                (fl.syn, "SYN"),
                (fl.fin, "FIN"),
                (fl.rst, "RST"),
                (fl.psh, "PSH"),
                (fl.ack, "ACK"),
                (fl.urg, "URG"),
                (fl.ece, "ECE"),
                (fl.cwr, "CWR"),
                (fl.ns, "NS"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
            format!("TCP Flags: {}", names.join(", "))
        }
        Some(Protocol::Udp(_)) => "UDP".to_owned(),
        Some(Protocol::Sctp(_)) => "SCTP".to_owned(),
        Some(Protocol::IcmPv4(i)) => format!("ICMPv4 type {} code {}", i.r#type, i.code),
        Some(Protocol::IcmPv6(i)) => format!("ICMPv6 type {} code {}", i.r#type, i.code),
        None => String::new(),
    }
}

impl<W: Write> Printer<W> {
    /// A printer writing `format` to `out`; `node_name` adds the node to the text formats.
    pub fn new(format: Format, node_name: bool, follow: bool, out: W) -> Self {
        Self {
            format,
            node_name,
            out,
            printed: 0,
            rows: Vec::new(),
            follow,
        }
    }

    fn header(&self) -> Vec<String> {
        let mut h = vec!["TIMESTAMP".to_owned()];
        if self.node_name {
            h.push("NODE".to_owned());
        }
        h.extend(
            ["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        h
    }

    /// Writes one response.
    pub fn write(&mut self, resp: &opb::GetFlowsResponse) -> anyhow::Result<()> {
        if matches!(self.format, Format::Json | Format::Jsonpb) {
            let line = sigil_proto::json::to_json("observer.GetFlowsResponse", resp)?;
            writeln!(self.out, "{line}")?;
            if matches!(resp.response_types, Some(ResponseTypes::Flow(_))) {
                self.printed += 1;
            }
            return self.flush_if_following();
        }
        let flow = match &resp.response_types {
            Some(ResponseTypes::Flow(f)) => f,
            Some(ResponseTypes::LostEvents(l)) => {
                let source = fpb::LostEventSource::try_from(l.source)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_else(|_| l.source.to_string());
                let cpu = l.cpu.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
                eprintln!(
                    "EVENTS LOST: {source} CPU({cpu}) {} (node {})",
                    l.num_events_lost, resp.node_name
                );
                return Ok(());
            }
            Some(ResponseTypes::NodeStatus(n)) => {
                let state = sigil_proto::relay::NodeState::try_from(n.state_change)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_default();
                eprintln!("{state}: {} {}", n.node_names.join(", "), n.message);
                return Ok(());
            }
            None => return Ok(()),
        };
        self.printed += 1;
        let time = stamp_milli(flow.time.as_ref());
        let node = if flow.node_name.is_empty() {
            resp.node_name.clone()
        } else {
            flow.node_name.clone()
        };
        let (src, dst) = source_destination(flow);
        let (ty, verdict, summary) = (flow_type(flow), verdict(flow), summary(flow));
        match self.format {
            Format::Compact => {
                let node = if self.node_name {
                    format!(" [{node}]")
                } else {
                    String::new()
                };
                let arrow = if flow.is_reply == Some(true) {
                    "<-"
                } else {
                    "->"
                };
                // A reply is shown from the connection's point of view, as Hubble does.
                let (a, b) = if flow.is_reply == Some(true) {
                    (dst, src)
                } else {
                    (src, dst)
                };
                writeln!(
                    self.out,
                    "{time}{node}: {a} {arrow} {b} {ty} {verdict} ({summary})"
                )?;
            }
            Format::Dict => {
                if self.printed > 1 {
                    writeln!(self.out, "------------")?;
                }
                writeln!(self.out, "  TIMESTAMP: {time}")?;
                if self.node_name {
                    writeln!(self.out, "       NODE: {node}")?;
                }
                writeln!(self.out, "     SOURCE: {src}")?;
                writeln!(self.out, "DESTINATION: {dst}")?;
                writeln!(self.out, "       TYPE: {ty}")?;
                writeln!(self.out, "    VERDICT: {verdict}")?;
                writeln!(self.out, "    SUMMARY: {summary}")?;
            }
            Format::Table => {
                let mut row = vec![time];
                if self.node_name {
                    row.push(node);
                }
                row.extend([src, dst, ty, verdict, summary]);
                if self.follow {
                    if self.printed == 1 {
                        let h = self.header();
                        write_row(&mut self.out, &h, &[])?;
                    }
                    write_row(&mut self.out, &row, &[])?;
                } else {
                    self.rows.push(row);
                }
            }
            Format::Json | Format::Jsonpb => {}
        }
        self.flush_if_following()
    }

    fn flush_if_following(&mut self) -> anyhow::Result<()> {
        if self.follow {
            self.out.flush()?;
        }
        Ok(())
    }

    /// Writes what was held (the table) and flushes.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if self.format == Format::Table && !self.rows.is_empty() {
            let header = self.header();
            let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
            for r in &self.rows {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.chars().count());
                }
            }
            write_row(&mut self.out, &header, &widths)?;
            for r in std::mem::take(&mut self.rows) {
                write_row(&mut self.out, &r, &widths)?;
            }
        }
        self.out.flush()?;
        Ok(())
    }
}

/// One table row, columns padded to `widths` (or separated by a tab when none) and two spaces.
fn write_row(out: &mut impl Write, row: &[String], widths: &[usize]) -> std::io::Result<()> {
    let mut line = String::new();
    for (i, c) in row.iter().enumerate() {
        if i + 1 == row.len() {
            line.push_str(c);
        } else if let Some(w) = widths.get(i) {
            line.push_str(&format!("{c:<w$}  "));
        } else {
            line.push_str(c);
            line.push('\t');
        }
    }
    writeln!(out, "{}", line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> opb::GetFlowsResponse {
        let f = fpb::Flow {
            time: Some(prost_types::Timestamp {
                seconds: 1_796_469_743, // 2026-12-05 11:22:23 UTC
                nanos: 123_456_789,
            }),
            verdict: fpb::Verdict::Dropped as i32,
            drop_reason_desc: 133,
            ip: Some(fpb::Ip {
                source: "10.0.0.2".into(),
                destination: "10.0.0.3".into(),
                ..Default::default()
            }),
            l4: Some(fpb::Layer4 {
                protocol: Some(fpb::layer4::Protocol::Tcp(fpb::Tcp {
                    source_port: 41234,
                    destination_port: 9090,
                    flags: Some(fpb::TcpFlags {
                        syn: true,
                        ..Default::default()
                    }),
                })),
            }),
            source: Some(fpb::Endpoint {
                identity: 256,
                namespace: "default".into(),
                pod_name: "fe".into(),
                ..Default::default()
            }),
            destination: Some(fpb::Endpoint {
                identity: 2,
                ..Default::default()
            }),
            event_type: Some(fpb::CiliumEventType {
                r#type: 1,
                sub_type: 133,
            }),
            node_name: "node-a".into(),
            ..Default::default()
        };
        opb::GetFlowsResponse {
            node_name: "node-a".into(),
            time: f.time,
            response_types: Some(ResponseTypes::Flow(f)),
        }
    }

    fn render(format: Format, node: bool) -> String {
        let mut p = Printer::new(format, node, false, Vec::new());
        p.write(&flow()).unwrap();
        p.write(&flow()).unwrap();
        p.finish().unwrap();
        String::from_utf8(p.out).unwrap()
    }

    #[test]
    fn compact_is_hubbles_line() {
        let out = render(Format::Compact, true);
        let first = out.lines().next().unwrap();
        assert_eq!(
            first,
            "Dec  5 11:22:23.123 [node-a]: default/fe:41234 (ID:256) -> 10.0.0.3:9090 (world) \
             Policy denied DROPPED (TCP Flags: SYN)"
        );
    }

    #[test]
    fn dict_and_table_have_hubbles_keys_and_columns() {
        let out = render(Format::Dict, false);
        assert!(
            out.starts_with(
                "  TIMESTAMP: Dec  5 11:22:23.123\n     SOURCE: default/fe:41234 (ID:256)\n"
            ),
            "{out}"
        );
        assert_eq!(out.matches("------------").count(), 1);
        assert!(out.contains("    VERDICT: DROPPED\n"));
        let out = render(Format::Table, false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIMESTAMP            SOURCE"), "{out}");
        // Columns aligned: DESTINATION starts at the same offset in every line.
        let col = lines[0].find("DESTINATION").unwrap();
        assert_eq!(&lines[1][col..col + 8], "10.0.0.3");
    }

    #[test]
    fn jsonpb_is_the_whole_response() {
        let out = render(Format::Jsonpb, false);
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(v["node_name"], "node-a");
        assert_eq!(v["flow"]["verdict"], "DROPPED");
        assert_eq!(v["flow"]["l4"]["TCP"]["destination_port"], 9090);
    }
}
