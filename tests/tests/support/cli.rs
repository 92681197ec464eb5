//! Helpers for driving the real `sigil` CLI against a [`ServerProcess`]: run a command, read its JSON,
//! parse the PEM it prints, and build bundles from what it shows.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use sigil_spiffe::{Bundle, BundleSet, TrustDomain};
use sigil_test_util::ServerProcess;

/// The default trust domain of `sigil server run`.
pub const TD: &str = "identity.example.com";

/// What a CLI run produced.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub args: Vec<String>,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from_output(args: &[&str], out: Output) -> Self {
        Run {
            args: args.iter().map(|s| s.to_string()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Whether the command exited with 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Standard output and standard error together, for message checks.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sigil {:?} exited with {:?}\n--- stdout:\n{}--- stderr:\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `sigil <args>` against the server, whatever its outcome.
pub fn run(server: &ServerProcess, args: &[&str]) -> anyhow::Result<Run> {
    Ok(Run::from_output(args, server.cli(args)?))
}

/// Runs `sigil <args>` and returns its standard output, failing unless it exited with 0.
pub fn ok(server: &ServerProcess, args: &[&str]) -> anyhow::Result<String> {
    let r = run(server, args)?;
    if !r.success() {
        bail!("{r}");
    }
    Ok(r.stdout)
}

/// Runs `sigil <args> --output json` and parses its standard output.
pub fn json(server: &ServerProcess, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = ok(server, &all)?;
    serde_json::from_str(&out).with_context(|| format!("sigil {all:?} printed no JSON: {out}"))
}

/// Runs `sigil <args>` expecting failure; returns the run so its messages can be checked.
pub fn fails(server: &ServerProcess, args: &[&str]) -> anyhow::Result<Run> {
    let r = run(server, args)?;
    if r.success() {
        bail!("expected failure, but {r}");
    }
    Ok(r)
}

/// The number of registration entries the server holds.
pub fn entry_count(server: &ServerProcess) -> anyhow::Result<i64> {
    let v = json(server, &["entry", "count"])?;
    v["count"]
        .as_i64()
        .with_context(|| format!("entry count printed {v}"))
}

/// The entries matching the `entry show` filter flags in `filter`.
pub fn entries(server: &ServerProcess, filter: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut args = vec!["entry", "show"];
    args.extend_from_slice(filter);
    let v = json(server, &args)?;
    v["entries"]
        .as_array()
        .cloned()
        .with_context(|| format!("entry show printed {v}"))
}

/// A string field of a JSON object.
pub fn field<'a>(v: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    v[name]
        .as_str()
        .with_context(|| format!("{name} is not a string in {v}"))
}

/// Writes `{"entries": entries}` to `dir/name` for `entry create --data`.
pub fn write_data(dir: &Path, name: &str, entries: &[Value]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::json!({ "entries": entries }).to_string())?;
    Ok(path)
}

/// One entry of a `--data` file with a single unix selector.
pub fn data_entry(spiffe_id: &str, parent_id: &str, selector: &str) -> Value {
    serde_json::json!({
        "spiffe_id": spiffe_id,
        "parent_id": parent_id,
        "selectors": [{ "type": "unix", "value": selector }],
    })
}

/// Every CERTIFICATE block of a PEM text, failing if there is none.
pub fn pem_certs(text: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("bad PEM: {e}\n{text}"))?;
    if certs.is_empty() {
        bail!("no CERTIFICATE in:\n{text}");
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| anyhow::anyhow!("certificate {i} does not parse: {e}"))?;
    }
    Ok(certs)
}

/// The certificates of a PEM file.
pub fn pem_file(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    pem_certs(&text)
}

/// A bundle as `bundle show|list --output json` prints it (`trust_domain` and `spiffe_bundle`).
pub fn bundle_from_json(v: &Value) -> anyhow::Result<Bundle> {
    let td = TrustDomain::parse(field(v, "trust_domain")?)?;
    let doc = serde_json::to_vec(&v["spiffe_bundle"])?;
    Ok(Bundle::from_json(td, &doc)?)
}

/// The server's own bundle followed by its federated bundles, all in one set.
pub fn all_bundles(server: &ServerProcess) -> anyhow::Result<BundleSet> {
    let mut set = BundleSet::new();
    set.insert(bundle_from_json(&json(server, &["bundle", "show"])?)?);
    let list = json(server, &["bundle", "list"])?;
    for b in list["bundles"]
        .as_array()
        .with_context(|| format!("bundle list printed {list}"))?
    {
        set.insert(bundle_from_json(b)?);
    }
    Ok(set)
}

/// Runs `x509 mint --spiffe-id id --write dir` and returns the chain written to `dir/svid.pem`.
pub fn mint_x509(
    server: &ServerProcess,
    id: &str,
    dir: &Path,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let dir_s = dir.to_str().context("non-UTF-8 temp path")?;
    ok(
        server,
        &["x509", "mint", "--spiffe-id", id, "--write", dir_s],
    )?;
    pem_file(&dir.join("svid.pem"))
}

/// Asserts that `text` mentions every one of `needles`.
pub fn assert_mentions(r: &Run, needles: &[&str]) {
    let text = r.text();
    for n in needles {
        assert!(text.contains(n), "message should name {n:?}; {r}");
    }
}
