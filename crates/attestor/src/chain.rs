//! `ChainAttestor`: several attestors as one, the union of their selectors (the agent chains `unix` and
//! endpoint attestation).

use std::sync::Arc;

use crate::{AttestError, PeerIdentity, Selector, WorkloadAttestor};

/// Runs each attestor in turn and returns the union of their selectors, sorted. If any one fails, the
/// whole attestation fails: a caller is never attested on part of what describes it.
pub struct ChainAttestor {
    attestors: Vec<Arc<dyn WorkloadAttestor>>,
}

impl ChainAttestor {
    /// A chain of `attestors`, asked in order.
    pub fn new(attestors: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        ChainAttestor { attestors }
    }
}

impl WorkloadAttestor for ChainAttestor {
    fn attest(&self, peer: &PeerIdentity) -> Result<Vec<Selector>, AttestError> {
        let mut out = Vec::new();
        for a in &self.attestors {
            out.extend(a.attest(peer)?);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Fixed(Result<Vec<&'static str>, ()>);

    impl WorkloadAttestor for Fixed {
        fn attest(&self, peer: &PeerIdentity) -> Result<Vec<Selector>, AttestError> {
            match &self.0 {
                Ok(v) => Ok(v.iter().map(|s| Selector::parse(s).unwrap()).collect()),
                Err(()) => Err(AttestError::ProcessExited { pid: peer.pid }),
            }
        }
    }

    #[test]
    fn unions_selectors_and_fails_if_any_fails() {
        let me = PeerIdentity::from_pid(std::process::id() as i32).unwrap();
        let ok = ChainAttestor::new(vec![
            Arc::new(Fixed(Ok(vec!["unix:uid:1", "k8s:ns:a"]))),
            Arc::new(Fixed(Ok(vec!["k8s:ns:a", "k8s:sa:b"]))),
        ]);
        let got: Vec<String> = ok
            .attest(&me)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["k8s:ns:a", "k8s:sa:b", "unix:uid:1"]);
        let failing = ChainAttestor::new(vec![
            Arc::new(Fixed(Ok(vec!["unix:uid:1"]))),
            Arc::new(Fixed(Err(()))),
        ]);
        assert!(failing.attest(&me).is_err());
    }
}
