//! The policy engine's map entries as the datapath's, and the per-direction enforcement the
//! engine's map implies.

use sigil_datapath as dp;
use sigil_policy::{Direction, PolicyEntry, PolicyKey};

/// The datapath entry of one engine map entry.
pub fn to_datapath(key: &PolicyKey, entry: &PolicyEntry) -> dp::PolicyEntry {
    dp::PolicyEntry {
        remote_identity: key.identity,
        direction: direction(key.direction),
        protocol: key.protocol,
        port: key.port,
        port_prefix_len: key.port_prefix_len,
        deny: entry.deny,
        l7_redirect: entry.l7_redirect,
        auth_required: entry.auth_required,
        rule_cookie: entry.rule_cookie,
    }
}

/// The datapath's direction.
pub fn direction(d: Direction) -> dp::Direction {
    match d {
        Direction::Ingress => dp::Direction::Ingress,
        Direction::Egress => dp::Direction::Egress,
    }
}

/// Whether each direction (ingress, egress) is in default deny.
///
/// The engine does not report enforcement separately: a direction that is not in default deny
/// gets an allow entry for every identity, protocol and port (identity 0, protocol 0), and an
/// engine lookup that matches nothing denies. So a direction is enforced exactly when that
/// entry is absent; with it present the datapath flag makes no difference (every packet
/// matches the entry) but reports the engine's intent.
pub fn enforcement(map: &[(PolicyKey, PolicyEntry)]) -> (bool, bool) {
    let open = |d: Direction| {
        map.iter()
            .any(|(k, e)| k.direction == d && k.identity == 0 && k.protocol == 0 && !e.deny)
    };
    (!open(Direction::Ingress), !open(Direction::Egress))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(identity: u32, direction: Direction, protocol: u8, port: u16, len: u8) -> PolicyKey {
        PolicyKey {
            identity,
            direction,
            protocol,
            port,
            port_prefix_len: len,
        }
    }

    #[test]
    fn entries_keep_every_field() {
        let e = PolicyEntry {
            deny: false,
            l7_redirect: true,
            auth_required: true,
            rule_cookie: 77,
        };
        let d = to_datapath(&key(300, Direction::Egress, 6, 8080, 16), &e);
        assert_eq!(d.remote_identity, 300);
        assert_eq!(d.direction, dp::Direction::Egress);
        assert_eq!((d.protocol, d.port, d.port_prefix_len), (6, 8080, 16));
        assert!(!d.deny && d.l7_redirect && d.auth_required);
        assert_eq!(d.rule_cookie, 77);
        let deny = PolicyEntry {
            deny: true,
            ..PolicyEntry::default()
        };
        assert!(to_datapath(&key(0, Direction::Ingress, 0, 0, 0), &deny).deny);
    }

    #[test]
    fn a_wildcard_allow_means_not_enforced() {
        let allow = PolicyEntry::default();
        let deny = PolicyEntry {
            deny: true,
            ..allow
        };
        let map = vec![
            (key(0, Direction::Ingress, 0, 0, 0), allow),
            (key(0, Direction::Egress, 0, 0, 0), deny),
            (key(256, Direction::Egress, 6, 80, 16), allow),
        ];
        assert_eq!(enforcement(&map), (false, true));
        assert_eq!(enforcement(&[]), (true, true));
    }
}
