//! Policy changes of the daemon: prepared on a copy of the engine, committed as transactions
//! (see [`crate::txn`]), and the files they come from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use sigil_identity::Allocator;
use sigil_policy::{Document, PolicyError, PolicyId, parse_documents};

use super::Daemon;
use crate::error::NetdError;
use crate::snapshot::{PolicySource, resolve_policy};
use crate::state::{ImportedFile, nid};
use crate::txn::{Compiled, PolicyJob, PolicyOp};

impl Daemon {
    /// Imports policy files (origin, YAML) through the API: all are parsed first; one
    /// invalid document rejects the import with nothing applied. Compiles in place; the API
    /// compiles off the writer with [`Daemon::prepare_policy`] and [`PolicyJob::compile`].
    pub fn import_policies(
        &mut self,
        files: Vec<(String, String)>,
    ) -> Result<(Vec<String>, usize), NetdError> {
        let op = parse_import(files)?;
        let c = self.prepare_policy(op).compile()?;
        self.commit_policy(c)
    }

    /// Deletes a policy by `name`, `namespace/name` or `Kind/namespace/name`.
    pub fn delete_policy(&mut self, name: &str) -> Result<(String, usize), NetdError> {
        let id = self.resolve_policy(name)?;
        let c = self.prepare_policy(PolicyOp::Delete(id)).compile()?;
        let (mut ids, n) = self.commit_policy(c)?;
        Ok((ids.pop().unwrap_or_default(), n))
    }

    /// A policy change ready to compile on a copy of the engine.
    pub fn prepare_policy(&self, op: PolicyOp) -> PolicyJob {
        PolicyJob {
            generation: self.generation,
            op,
            engine: self.engine.clone(),
            cidr_identities: self.state.cidr_identities.clone(),
            dir_ids: self
                .sources
                .iter()
                .filter(|(_, s)| **s == PolicySource::Dir)
                .map(|(id, _)| id.clone())
                .collect(),
            alloc: Arc::clone(&self.alloc),
        }
    }

    /// Applies a compiled change whole or not at all: the engine's key changes become one
    /// plan over every affected endpoint; if the policy map cannot take its new keys nothing
    /// is written and the error says how many are needed and free; a failed write rolls the
    /// kernel back. Only then do the engine, the state file and the snapshot change. Returns
    /// the ids of the policies changed and how many endpoints were updated.
    pub fn commit_policy(&mut self, c: Compiled) -> Result<(Vec<String>, usize), NetdError> {
        let mut c = c;
        loop {
            match self.try_commit_policy(c)? {
                Committed::Done(ids, n) => return Ok((ids, n)),
                Committed::Stale(job) => c = job.compile()?,
            }
        }
    }

    /// [`Daemon::commit_policy`] without compiling: a change compiled against an engine that
    /// has changed since (an endpoint came or went) comes back as a fresh job to compile again.
    pub fn try_commit_policy(&mut self, c: Compiled) -> Result<Committed, NetdError> {
        // A change not committed gives its CIDR identities back; publishing again drops them
        // from the snapshot, which may have shown them while the change compiled.
        if c.generation != self.generation {
            let op = c.into_op();
            self.publish();
            return Ok(Committed::Stale(Box::new(self.prepare_policy(op))));
        }
        match self.apply_compiled(&c) {
            Ok(n) => {
                let ids = self.finish_policy(c)?;
                Ok(Committed::Done(ids, n))
            }
            Err(e) => {
                c.abort();
                self.publish();
                Err(e)
            }
        }
    }

    /// Test seam at the kernel writer: see [`sigil_datapath::PolicyMap::fail_writes_after`].
    #[doc(hidden)]
    pub fn fail_policy_writes_after(&mut self, n: Option<usize>) {
        self.datapath.maps_mut().policy.fail_writes_after(n);
    }

    /// The kernel part of [`Daemon::commit_policy`]; on error the kernel is as before.
    fn apply_compiled(&mut self, c: &Compiled) -> Result<usize, NetdError> {
        let (plan, flags, n) = self.plan_deltas(&c.engine, &c.deltas, None)?;
        self.write_kernel(plan, &flags, &c.removed, c.added.list())?;
        Ok(n)
    }

    /// After the kernel took a change: the engine, sources, files, state file, snapshot.
    fn finish_policy(&mut self, c: Compiled) -> Result<Vec<String>, NetdError> {
        c.added.keep();
        for (_, id) in &c.removed {
            self.alloc.release(nid(*id))?;
        }
        self.engine = c.engine;
        self.state.cidr_identities = c.cidr_identities;
        let ids = match c.op {
            PolicyOp::Import { docs, files } => {
                let ids: Vec<String> = docs.iter().map(|d| d.id.to_string()).collect();
                for f in &mut self.state.imported {
                    f.policies.retain(|p| !ids.contains(p));
                }
                self.state.imported.retain(|f| !f.policies.is_empty());
                for (origin, yaml) in files {
                    let policies: Vec<String> = docs
                        .iter()
                        .filter(|d| d.origin == origin)
                        .map(|d| d.id.to_string())
                        .collect();
                    if !policies.is_empty() {
                        self.state.imported.push(ImportedFile {
                            origin,
                            yaml,
                            policies,
                        });
                    }
                }
                for d in &docs {
                    self.sources.insert(d.id.clone(), PolicySource::Api);
                }
                ids
            }
            PolicyOp::Delete(id) => {
                let text = id.to_string();
                for f in &mut self.state.imported {
                    f.policies.retain(|p| *p != text);
                }
                self.state.imported.retain(|f| !f.policies.is_empty());
                self.sources.remove(&id);
                vec![text]
            }
            PolicyOp::Dir { docs, files } => {
                let new_ids: BTreeSet<PolicyId> = docs.iter().map(|d| d.id.clone()).collect();
                self.sources
                    .retain(|id, s| *s != PolicySource::Dir || new_ids.contains(id));
                for id in &new_ids {
                    self.sources.insert(id.clone(), PolicySource::Dir);
                }
                self.dir_files = files.into_iter().collect();
                new_ids.iter().map(ToString::to_string).collect()
            }
        };
        self.save()?;
        self.publish();
        Ok(ids)
    }

    pub(super) fn resolve_policy(&self, name: &str) -> Result<PolicyId, NetdError> {
        resolve_policy(self.engine.documents().map(|d| &d.id), name)
    }

    /// Re-imports the watched directory as a whole: its policies replace the ones it gave
    /// before (removed files' policies are deleted). An invalid file changes nothing.
    pub fn sync_policy_dir(&mut self) -> Result<usize, NetdError> {
        let Some(op) = self.policy_dir_op()? else {
            return Ok(0);
        };
        let c = self.prepare_policy(op).compile()?;
        Ok(self.commit_policy(c)?.1)
    }

    /// The watched directory read and parsed as a change (`None` without a directory).
    pub fn policy_dir_op(&self) -> Result<Option<PolicyOp>, NetdError> {
        Ok(self
            .read_policy_dir()?
            .map(|(docs, files)| PolicyOp::Dir { docs, files }))
    }

    pub(super) fn read_policy_dir(&self) -> Result<Option<ParsedFiles>, NetdError> {
        self.config
            .policy_dir
            .as_deref()
            .map(read_policy_dir)
            .transpose()
    }
}

/// What [`Daemon::try_commit_policy`] did.
pub enum Committed {
    /// Applied: the ids of the policies changed and the number of endpoints updated.
    Done(Vec<String>, usize),
    /// Not applied; compile this job again.
    Stale(Box<PolicyJob>),
}

fn parse_all(files: &[(String, String)]) -> Result<Vec<Document>, NetdError> {
    let mut docs: Vec<Document> = Vec::new();
    let mut errors = Vec::new();
    for (origin, yaml) in files {
        match parse_documents(yaml, origin) {
            Ok(d) => docs.extend(d),
            Err(PolicyError::Invalid { errors: e }) => errors.extend(e),
            Err(other) => return Err(other.into()),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyError::Invalid { errors }.into());
    }
    let mut seen: BTreeMap<PolicyId, String> = BTreeMap::new();
    for d in &docs {
        if let Some(first) = seen.insert(d.id.clone(), d.origin.clone()) {
            return Err(PolicyError::Duplicate {
                id: d.id.to_string(),
                first,
                second: d.origin.clone(),
            }
            .into());
        }
    }
    Ok(docs)
}

/// The `*.yaml` / `*.yml` files directly in `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml")
        })
        .collect();
    out.sort();
    out
}

/// Parsed documents and the (origin, YAML) files they came from.
pub type ParsedFiles = (Vec<Document>, Vec<(String, String)>);

/// Reads and parses the `*.yaml` files of a policy directory (a missing directory has none).
pub fn read_policy_dir(dir: &Path) -> Result<ParsedFiles, NetdError> {
    let mut files = Vec::new();
    if dir.is_dir() {
        for p in yaml_files(dir) {
            let text = std::fs::read_to_string(&p).map_err(|e| NetdError::io(&p, e))?;
            files.push((p.display().to_string(), text));
        }
    }
    let docs = parse_all(&files)?;
    Ok((docs, files))
}

/// Parses an API import: every file first; no documents is an error naming the files.
pub fn parse_import(files: Vec<(String, String)>) -> Result<PolicyOp, NetdError> {
    let docs = parse_all(&files)?;
    if docs.is_empty() {
        return Err(NetdError::invalid(
            "files",
            files
                .iter()
                .map(|(o, _)| o.as_str())
                .collect::<Vec<_>>()
                .join(","),
            "no policy document found",
        ));
    }
    Ok(PolicyOp::Import { docs, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_policies_across_files_are_refused() {
        let doc = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: a\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints:\n    - {}\n";
        let files = vec![
            ("one.yaml".to_owned(), doc.to_owned()),
            ("two.yaml".to_owned(), doc.to_owned()),
        ];
        let e = parse_all(&files).expect_err("duplicate");
        assert!(e.to_string().contains("defined twice"), "{e}");
        assert_eq!(parse_all(&files[..1]).expect("one").len(), 1);
    }
}
