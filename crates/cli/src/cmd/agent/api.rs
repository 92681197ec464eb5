//! `sigil agent api fetch|validate`: the Workload API as a workload sees it (like `spire-agent api`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use sigil_proto::workload::X509svidResponse;

use crate::cmd::svid::{self, CertInfo};
use crate::output::{self, Format, OutputArg};
use crate::workload::{self, WorkloadSocket};

/// `sigil agent api ...`
#[derive(Debug, clap::Subcommand)]
pub enum ApiCommand {
    /// Fetch SVIDs or bundles from the Workload API, as the calling workload.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Ask the Workload API to validate an SVID.
    #[command(subcommand)]
    Validate(ValidateCommand),
}

/// `sigil agent api fetch ...`
#[derive(Debug, clap::Subcommand)]
pub enum FetchCommand {
    /// Fetch this workload's X.509-SVIDs (first message of FetchX509SVID).
    X509(FetchX509Args),
    /// Fetch JWT-SVIDs for an audience.
    Jwt(FetchJwtArgs),
    /// Fetch the X.509 bundles this workload trusts.
    X509Bundles(CallArgs),
    /// Fetch the JWT bundles (JWKS) this workload trusts.
    JwtBundles(CallArgs),
}

/// `sigil agent api validate ...`
#[derive(Debug, clap::Subcommand)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID for an audience.
    Jwt(ValidateJwtArgs),
}

/// Flags every Workload API call takes.
#[derive(Debug, clap::Args)]
pub struct CallArgs {
    #[command(flatten)]
    socket: WorkloadSocket,
    #[command(flatten)]
    output: OutputArg,
    /// How long to wait for the agent's answer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Flags of `sigil agent api fetch x509`.
#[derive(Debug, clap::Args)]
pub struct FetchX509Args {
    #[command(flatten)]
    call: CallArgs,
    /// Write svid.N.pem, svid.N.key (mode 0600) and bundle.N.pem for each SVID into this directory.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
}

/// Flags of `sigil agent api fetch jwt`.
#[derive(Debug, clap::Args)]
pub struct FetchJwtArgs {
    #[command(flatten)]
    call: CallArgs,
    /// Audience of the tokens (repeatable).
    #[arg(long, required = true)]
    audience: Vec<String>,
    /// Only this identity's token (default: one per identity of the caller).
    #[arg(long)]
    spiffe_id: Option<String>,
}

/// Flags of `sigil agent api validate jwt`.
#[derive(Debug, clap::Args)]
pub struct ValidateJwtArgs {
    #[command(flatten)]
    call: CallArgs,
    /// The audience the token must carry.
    #[arg(long)]
    audience: String,
    /// The token (JWS compact serialization).
    #[arg(long, value_name = "TOKEN")]
    svid: String,
}

/// One X.509-SVID of a FetchX509SVID message, decoded for display and for writing out.
#[derive(serde::Serialize)]
pub struct SvidView {
    /// The SPIFFE ID the agent sent.
    pub spiffe_id: String,
    /// The entry's hint.
    pub hint: String,
    /// The leaf's not-after, Unix seconds.
    pub expires_at: i64,
    /// RFC 3339 of `expires_at`.
    pub expires_at_rfc3339: Option<String>,
    /// The certificates, leaf first.
    pub chain: Vec<CertInfo>,
    /// How many CA certificates the SVID's trust domain bundle holds.
    pub bundle_ca_count: usize,
    #[serde(skip)]
    chain_der: Vec<Vec<u8>>,
    #[serde(skip)]
    bundle_der: Vec<Vec<u8>>,
    // The private key never goes to standard output, only into a 0600 file with --write.
    #[serde(skip)]
    key_der: Vec<u8>,
}

/// A FetchX509SVID message, decoded.
#[derive(serde::Serialize)]
pub struct X509View {
    /// The SVIDs, the default one first.
    pub svids: Vec<SvidView>,
    /// Federated trust domain to its number of CA certificates.
    pub federated_bundles: BTreeMap<String, usize>,
    #[serde(skip)]
    federated_der: BTreeMap<String, Vec<Vec<u8>>>,
}

/// Decodes a FetchX509SVID message; a certificate that does not parse is an error naming the SVID.
pub fn x509_view(resp: &X509svidResponse) -> anyhow::Result<X509View> {
    let mut svids = Vec::new();
    for (n, s) in resp.svids.iter().enumerate() {
        let what = || format!("SVID #{n} ({})", s.spiffe_id);
        let chain_der = workload::split_der(&s.x509_svid)
            .map_err(anyhow::Error::msg)
            .with_context(what)?;
        let chain = chain_der
            .iter()
            .enumerate()
            .map(|(i, der)| svid::cert_info(i, der))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(what)?;
        let leaf = chain
            .first()
            .ok_or_else(|| anyhow::anyhow!("{}: empty certificate chain", what()))?;
        let bundle_der = workload::split_der(&s.bundle)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("the bundle of {}", what()))?;
        svids.push(SvidView {
            spiffe_id: s.spiffe_id.clone(),
            hint: s.hint.clone(),
            expires_at: leaf.not_after,
            expires_at_rfc3339: leaf.not_after_rfc3339.clone(),
            bundle_ca_count: bundle_der.len(),
            chain,
            chain_der,
            bundle_der,
            key_der: s.x509_svid_key.clone(),
        });
    }
    let mut federated_der = BTreeMap::new();
    for (td, bytes) in &resp.federated_bundles {
        let certs = workload::split_der(bytes)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("the federated bundle of {td}"))?;
        federated_der.insert(td.clone(), certs);
    }
    Ok(X509View {
        svids,
        federated_bundles: federated_der
            .iter()
            .map(|(td, c)| (td.clone(), c.len()))
            .collect(),
        federated_der,
    })
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// The SVIDs as text: SPIFFE ID, hint, expiry, chain, bundle size, then the federated bundles.
pub fn x509_text(v: &X509View) -> anyhow::Result<String> {
    let mut s = String::new();
    for svid in &v.svids {
        let _ = writeln!(s, "SPIFFE ID : {}", svid.spiffe_id);
        let hint = if svid.hint.is_empty() {
            "-"
        } else {
            &svid.hint
        };
        let _ = writeln!(s, "Hint      : {hint}");
        let _ = writeln!(
            s,
            "Expires   : {} ({})",
            svid.expires_at_rfc3339
                .clone()
                .unwrap_or_else(|| svid.expires_at.to_string()),
            output::remaining(svid.expires_at)
        );
        let _ = writeln!(s, "Chain (leaf first):");
        s.push_str(&svid::describe_chain(&svid.chain_der)?);
        let _ = writeln!(
            s,
            "Bundle    : {}",
            plural(svid.bundle_ca_count, "CA certificate")
        );
        s.push('\n');
    }
    if v.federated_bundles.is_empty() {
        let _ = writeln!(s, "Federated bundles: none");
    } else {
        let _ = writeln!(s, "Federated bundles:");
        for (td, n) in &v.federated_bundles {
            let _ = writeln!(s, "  {td} : {}", plural(*n, "CA certificate"));
        }
    }
    Ok(s)
}

/// Writes `svid.N.pem`, `svid.N.key` (0600), `bundle.N.pem` and `federated_bundle.N.M.pem` for each
/// SVID, the names spire-agent uses; returns the paths in the order written.
pub fn write_x509(dir: &Path, v: &X509View) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for (n, s) in v.svids.iter().enumerate() {
        let mut put = |name: String, text: String, mode: u32| -> anyhow::Result<()> {
            let path = dir.join(name);
            svid::write_file(&path, &text, mode)?;
            written.push(path);
            Ok(())
        };
        put(
            format!("svid.{n}.pem"),
            output::pem("CERTIFICATE", &s.chain_der),
            0o644,
        )?;
        put(
            format!("svid.{n}.key"),
            output::pem("PRIVATE KEY", &[&s.key_der]),
            0o600,
        )?;
        put(
            format!("bundle.{n}.pem"),
            output::pem("CERTIFICATE", &s.bundle_der),
            0o644,
        )?;
        for (m, certs) in v.federated_der.values().enumerate() {
            put(
                format!("federated_bundle.{n}.{m}.pem"),
                output::pem("CERTIFICATE", certs),
                0o644,
            )?;
        }
    }
    Ok(written)
}

/// A JWT-SVID with the expiry read from its claims.
#[derive(Debug, serde::Serialize)]
struct JwtJson {
    spiffe_id: String,
    hint: String,
    token: String,
    expires_at: Option<i64>,
    expires_at_rfc3339: Option<String>,
}

/// The `exp` claim of a token, without verifying it (the agent just minted it).
pub fn jwt_expiry(token: &str) -> Option<i64> {
    svid::jwt_parts(token).ok()?.1.get("exp")?.as_i64()
}

/// Runs an `agent api` subcommand.
pub async fn run(cmd: ApiCommand) -> anyhow::Result<()> {
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509(a)) => fetch_x509(a).await,
        ApiCommand::Fetch(FetchCommand::Jwt(a)) => fetch_jwt(a).await,
        ApiCommand::Fetch(FetchCommand::X509Bundles(a)) => fetch_x509_bundles(a).await,
        ApiCommand::Fetch(FetchCommand::JwtBundles(a)) => fetch_jwt_bundles(a).await,
        ApiCommand::Validate(ValidateCommand::Jwt(a)) => validate_jwt(a).await,
    }
}

async fn fetch_x509(a: FetchX509Args) -> anyhow::Result<()> {
    let socket = a.call.socket.resolve()?;
    let start = Instant::now();
    let resp = workload::within(a.call.timeout, &socket, async {
        workload::fetch_x509(&mut workload::connect(&socket).await?).await
    })
    .await?;
    let took = start.elapsed();
    let view = x509_view(&resp)?;
    let written = a
        .write
        .as_deref()
        .map(|dir| write_x509(dir, &view))
        .transpose()?;
    match a.call.output.output {
        Format::Text => {
            println!(
                "Received {} after {}\n",
                plural(view.svids.len(), "svid"),
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(took.as_millis()).unwrap_or(u64::MAX)
                ))
            );
            print!("{}", x509_text(&view)?);
            for path in written.iter().flatten() {
                println!("Written {}", path.display());
            }
        }
        Format::Json => {
            let mut value = serde_json::to_value(&view)?;
            if let (Some(files), Some(obj)) = (written, value.as_object_mut()) {
                obj.insert("files".into(), serde_json::to_value(files)?);
            }
            output::print_json(&value)?;
        }
    }
    Ok(())
}

async fn fetch_jwt(a: FetchJwtArgs) -> anyhow::Result<()> {
    let socket = a.call.socket.resolve()?;
    let svids = workload::within(a.call.timeout, &socket, async {
        let mut client = workload::connect(&socket).await?;
        workload::fetch_jwt(&mut client, &a.audience, a.spiffe_id.as_deref()).await
    })
    .await?;
    match a.call.output.output {
        Format::Text => {
            for s in &svids {
                println!("token({}):\n\t{}", s.spiffe_id, s.svid);
                if !s.hint.is_empty() {
                    println!("hint: {}", s.hint);
                }
            }
        }
        Format::Json => {
            let list: Vec<JwtJson> = svids
                .into_iter()
                .map(|s| {
                    let exp = jwt_expiry(&s.svid);
                    JwtJson {
                        spiffe_id: s.spiffe_id,
                        hint: s.hint,
                        expires_at_rfc3339: exp.and_then(output::rfc3339),
                        expires_at: exp,
                        token: s.svid,
                    }
                })
                .collect();
            output::print_json(&serde_json::json!({ "svids": list }))?;
        }
    }
    Ok(())
}

async fn validate_jwt(a: ValidateJwtArgs) -> anyhow::Result<()> {
    let socket = a.call.socket.resolve()?;
    let (spiffe_id, claims) = workload::within(a.call.timeout, &socket, async {
        let mut client = workload::connect(&socket).await?;
        workload::validate_jwt(&mut client, &a.audience, &a.svid).await
    })
    .await?;
    match a.call.output.output {
        Format::Text => {
            println!("SVID is valid.");
            println!("SPIFFE ID : {spiffe_id}");
            println!("Claims    : {claims}");
        }
        Format::Json => output::print_json(&serde_json::json!({
            "spiffe_id": spiffe_id,
            "claims": claims,
        }))?,
    }
    Ok(())
}

async fn fetch_x509_bundles(a: CallArgs) -> anyhow::Result<()> {
    let socket = a.socket.resolve()?;
    let resp = workload::within(a.timeout, &socket, async {
        workload::fetch_x509_bundles(&mut workload::connect(&socket).await?).await
    })
    .await?;
    let mut pems = BTreeMap::new();
    for (td, bytes) in &resp.bundles {
        let certs = workload::split_der(bytes)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("the bundle of {td}"))?;
        pems.insert(td.clone(), output::pem("CERTIFICATE", &certs));
    }
    match a.output.output {
        Format::Text => {
            for (td, pem) in &pems {
                println!("bundle({td}):\n{pem}");
            }
        }
        Format::Json => output::print_json(&serde_json::json!({ "bundles": pems }))?,
    }
    Ok(())
}

async fn fetch_jwt_bundles(a: CallArgs) -> anyhow::Result<()> {
    let socket = a.socket.resolve()?;
    let resp = workload::within(a.timeout, &socket, async {
        workload::fetch_jwt_bundles(&mut workload::connect(&socket).await?).await
    })
    .await?;
    let bundles: BTreeMap<String, serde_json::Value> = resp
        .bundles
        .iter()
        .map(|(td, jwks)| {
            // Kept as text if the agent ever sends something that is not JSON.
            let v = serde_json::from_slice(jwks).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(jwks).into_owned())
            });
            (td.clone(), v)
        })
        .collect();
    match a.output.output {
        Format::Text => {
            for (td, jwks) in &bundles {
                println!("bundle({td}):\n{jwks}\n");
            }
        }
        Format::Json => output::print_json(&serde_json::json!({ "bundles": bundles }))?,
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sigil_proto::workload::X509svid;
    use std::os::unix::fs::PermissionsExt as _;

    fn cert(cn: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn view_decodes_chain_bundle_and_writes_spire_file_names() {
        let (leaf, ca) = (cert("leaf"), cert("ca"));
        let resp = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://td/w".into(),
                x509_svid: [leaf.clone(), ca.clone()].concat(),
                x509_svid_key: b"KEY".to_vec(),
                bundle: ca.clone(),
                hint: "internal".into(),
            }],
            crl: vec![],
            federated_bundles: [("other.td".to_string(), [ca.clone(), ca.clone()].concat())]
                .into_iter()
                .collect(),
        };
        let v = x509_view(&resp).unwrap();
        assert_eq!(v.svids[0].chain.len(), 2);
        assert_eq!(v.svids[0].chain[0].subject, "CN=leaf");
        assert_eq!(v.svids[0].bundle_ca_count, 1);
        assert_eq!(v.federated_bundles.get("other.td"), Some(&2));
        let text = x509_text(&v).unwrap();
        assert!(text.contains("SPIFFE ID : spiffe://td/w\n"), "{text}");
        assert!(text.contains("Hint      : internal\n"), "{text}");
        assert!(text.contains("other.td : 2 CA certificates"), "{text}");
        // Neither text nor JSON carries the key.
        let json = serde_json::to_string(&v).unwrap();
        assert!(!json.contains("KEY") && !text.contains("KEY"), "{json}");

        let dir = tempfile::tempdir().unwrap();
        let files = write_x509(dir.path(), &v).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "svid.0.pem",
                "svid.0.key",
                "bundle.0.pem",
                "federated_bundle.0.0.pem"
            ]
        );
        let key = dir.path().join("svid.0.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            std::fs::read_to_string(&key)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let chain = std::fs::read_to_string(dir.path().join("svid.0.pem")).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    }

    #[test]
    fn bad_chain_names_the_svid() {
        let resp = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://td/w".into(),
                x509_svid: vec![0x30, 0x05, 1],
                ..X509svid::default()
            }],
            ..X509svidResponse::default()
        };
        let err = format!("{:#}", x509_view(&resp).err().unwrap());
        assert!(err.contains("SVID #0 (spiffe://td/w)"), "{err}");
    }
}
