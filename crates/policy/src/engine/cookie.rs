//! Rule cookies: the `u32` a map entry carries to name the rule that decided it, and the
//! registry that turns a cookie back into a policy and rule path.
//!
//! A cookie is a hash of the policy id and the rule's path rather than an arrival counter, so
//! the same rules give the same cookies in any installation order and across restarts (a
//! restarted daemon rewrites no pinned entry just because its cookies were renumbered).

use std::collections::HashMap;

use crate::model::PolicyId;

use super::key::IntHashBuilder;

#[derive(Debug, Clone)]
struct Named {
    policy: PolicyId,
    path: String,
    refs: usize,
}

/// Cookie → rule, reference counted (a rule may be installed twice while a policy is being
/// replaced, and several entries of one rule may share a path).
#[derive(Debug, Clone, Default)]
pub(crate) struct CookieRegistry {
    by_cookie: HashMap<u32, Named, IntHashBuilder>,
}

/// FNV-1a: fixed across builds and Rust versions, unlike the std hasher.
fn fnv1a(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for b in *part {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        // Separates parts so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl CookieRegistry {
    /// The cookie of a rule, registered (or its count raised). Never 0, which means "no
    /// rule". A collision with another rule probes the next value; only then does the cookie
    /// depend on which of the two came first.
    pub(crate) fn acquire(&mut self, policy: &PolicyId, path: &str) -> u32 {
        let id = policy.to_string();
        let mut c = fnv1a(&[id.as_bytes(), path.as_bytes()]);
        loop {
            if c == 0 {
                c = 1;
            }
            match self.by_cookie.get_mut(&c) {
                Some(n) if n.policy == *policy && n.path == path => {
                    n.refs += 1;
                    return c;
                }
                Some(_) => c = c.wrapping_add(1),
                None => {
                    self.by_cookie.insert(
                        c,
                        Named {
                            policy: policy.clone(),
                            path: path.to_owned(),
                            refs: 1,
                        },
                    );
                    return c;
                }
            }
        }
    }

    /// Drops one reference; the cookie is forgotten with its last one.
    pub(crate) fn release(&mut self, cookie: u32) {
        if let Some(n) = self.by_cookie.get_mut(&cookie) {
            n.refs -= 1;
            if n.refs == 0 {
                self.by_cookie.remove(&cookie);
            }
        }
    }

    /// The rule a cookie names.
    pub(crate) fn get(&self, cookie: u32) -> Option<(&PolicyId, &str)> {
        self.by_cookie
            .get(&cookie)
            .map(|n| (&n.policy, n.path.as_str()))
    }

    /// Every registered cookie with its rule.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &PolicyId, &str)> + '_ {
        self.by_cookie
            .iter()
            .map(|(c, n)| (*c, &n.policy, n.path.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyKind;

    #[test]
    fn cookies_are_stable_counted_and_probe_on_collision() {
        let p = PolicyId::new(PolicyKind::CiliumNetworkPolicy, Some("default"), "a");
        let mut r = CookieRegistry::default();
        let c = r.acquire(&p, "spec.ingress[0]");
        assert_ne!(c, 0);
        assert_eq!(r.acquire(&p, "spec.ingress[0]"), c);
        assert_ne!(r.acquire(&p, "spec.ingress[1]"), c);
        r.release(c);
        assert_eq!(r.get(c), Some((&p, "spec.ingress[0]")));
        r.release(c);
        assert_eq!(r.get(c), None);

        // Force a collision: another rule already holds the hash.
        let q = PolicyId::new(PolicyKind::CiliumNetworkPolicy, Some("default"), "b");
        let h = fnv1a(&[p.to_string().as_bytes(), b"x"]);
        r.by_cookie.insert(
            h,
            Named {
                policy: q.clone(),
                path: "y".into(),
                refs: 1,
            },
        );
        let probed = r.acquire(&p, "x");
        assert_ne!(probed, h);
        assert_eq!(r.get(probed), Some((&p, "x")));
        assert_eq!(r.get(h), Some((&q, "y")));
    }
}
