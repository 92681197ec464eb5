//! `sigil x509 mint` and `sigil jwt mint`: SVIDs minted by the server's CA on an admin's request.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};
use sigil_proto::admin::v1::svids_client::SvidsClient;
use sigil_proto::admin::v1::{MintJwtsvidRequest, MintX509svidRequest};
use tonic::transport::Channel;
use x509_parser::extensions::GeneralName;

use crate::client::{self, AdminSocket};
use crate::output::{self, Format, OutputArg};
use crate::parse;

/// `sigil x509 ...`
#[derive(Debug, clap::Subcommand)]
pub enum X509Command {
    /// Mint an X.509-SVID for a key generated here (the key never leaves this machine).
    Mint(X509MintArgs),
}

/// `sigil jwt ...`
#[derive(Debug, clap::Subcommand)]
pub enum JwtCommand {
    /// Mint a JWT-SVID.
    Mint(JwtMintArgs),
}

/// Flags of `sigil x509 mint`.
#[derive(Debug, clap::Args)]
pub struct X509MintArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// SPIFFE ID of the SVID.
    #[arg(long)]
    spiffe_id: String,
    /// DNS name to add to the certificate (repeatable).
    #[arg(long)]
    dns: Vec<String>,
    /// Lifetime, e.g. 1h (default: the server's).
    #[arg(long, value_name = "DURATION", value_parser = parse::ttl)]
    ttl: Option<i32>,
    /// Write svid.pem, key.pem and bundle.pem into this directory instead of printing them.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
}

/// Flags of `sigil jwt mint`.
#[derive(Debug, clap::Args)]
pub struct JwtMintArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// SPIFFE ID (the `sub` claim).
    #[arg(long)]
    spiffe_id: String,
    /// Audience (repeatable).
    #[arg(long, required = true)]
    audience: Vec<String>,
    /// Lifetime, e.g. 5m (default: the server's).
    #[arg(long, value_name = "DURATION", value_parser = parse::ttl)]
    ttl: Option<i32>,
}

/// An X.509-SVID as the server returned it, with its locally generated key.
#[derive(Debug)]
pub struct MintedX509 {
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// Leaf first, then intermediates, each DER.
    pub chain: Vec<Vec<u8>>,
    /// The trust domain's X.509 authorities, each DER.
    pub bundle: Vec<Vec<u8>>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Generates an EC P-256 key, sends a CSR for `spiffe_id` (its only URI SAN) and `dns` to the server.
pub async fn mint_x509(
    channel: Channel,
    spiffe_id: &str,
    dns: &[String],
    ttl: i32,
) -> anyhow::Result<MintedX509> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate an EC P-256 key")?;
    let mut params = CertificateParams::default();
    // The identity is the URI SAN; a subject would only be noise the server ignores.
    params.distinguished_name = DistinguishedName::new();
    let uri = Ia5String::try_from(spiffe_id)
        .with_context(|| format!("--spiffe-id: {spiffe_id:?} cannot go into a certificate"))?;
    params.subject_alt_names.push(SanType::URI(uri));
    for name in dns {
        let n = Ia5String::try_from(name.as_str())
            .with_context(|| format!("--dns: {name:?} cannot go into a certificate"))?;
        params.subject_alt_names.push(SanType::DnsName(n));
    }
    let csr = params
        .serialize_request(&key)
        .context("cannot make the certificate signing request")?;
    let resp = client::reply(
        SvidsClient::new(channel)
            .mint_x509svid(MintX509svidRequest {
                csr: csr.der().to_vec(),
                ttl,
            })
            .await,
    )?;
    if resp.cert_chain.is_empty() {
        anyhow::bail!("the server returned an empty certificate chain");
    }
    Ok(MintedX509 {
        key_pem: key.serialize_pem(),
        chain: resp.cert_chain,
        bundle: resp.bundle,
        expires_at: resp.expires_at,
    })
}

/// Paths written by [`write_files`].
#[derive(Debug, serde::Serialize)]
pub struct WrittenFiles {
    /// The certificate chain.
    pub svid: PathBuf,
    /// The private key (mode 0600).
    pub key: PathBuf,
    /// The trust bundle.
    pub bundle: PathBuf,
}

/// Writes `svid.pem`, `key.pem` (0600) and `bundle.pem` into `dir`, creating it if needed.
pub fn write_files(dir: &Path, m: &MintedX509) -> anyhow::Result<WrittenFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = WrittenFiles {
        svid: dir.join("svid.pem"),
        key: dir.join("key.pem"),
        bundle: dir.join("bundle.pem"),
    };
    write_file(&files.svid, &output::pem("CERTIFICATE", &m.chain), 0o644)?;
    write_file(&files.key, &m.key_pem, 0o600)?;
    write_file(&files.bundle, &output::pem("CERTIFICATE", &m.bundle), 0o644)?;
    Ok(files)
}

/// Writes `text` to `path` with `mode`, also when the file existed with another mode.
pub fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    // Created with its final mode so a key is never readable by others, not even briefly.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // An existing file keeps its old mode through open(), so set it explicitly too.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What a person checks in a certificate.
#[derive(Debug, serde::Serialize)]
pub struct CertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, hex bytes separated by ':'.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    /// RFC 3339 of `not_after`.
    pub not_after_rfc3339: Option<String>,
    /// URI SANs (a SPIFFE ID for an SVID).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
}

/// Parses one DER certificate; `index` only names it in the error.
pub fn cert_info(index: usize, der: &[u8]) -> anyhow::Result<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("certificate {index} of the chain does not parse: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_after,
        not_after_rfc3339: output::rfc3339(not_after),
        uris,
        dns,
    })
}

/// Subject, issuer, serial, not-after and URI SANs of every certificate in a chain.
pub fn describe_chain(chain: &[Vec<u8>]) -> anyhow::Result<String> {
    let mut s = String::new();
    for (i, der) in chain.iter().enumerate() {
        let c = cert_info(i, der)?;
        let _ = writeln!(s, "  [{i}] Subject   : {}", c.subject);
        let _ = writeln!(s, "      Issuer    : {}", c.issuer);
        let _ = writeln!(s, "      Serial    : {}", c.serial);
        let _ = writeln!(
            s,
            "      Not after : {}",
            c.not_after_rfc3339
                .clone()
                .unwrap_or_else(|| c.not_after.to_string())
        );
        let uri_text = if c.uris.is_empty() {
            "-".to_string()
        } else {
            c.uris.join(", ")
        };
        let _ = writeln!(s, "      URI SAN   : {uri_text}");
        if !c.dns.is_empty() {
            let _ = writeln!(s, "      DNS SAN   : {}", c.dns.join(", "));
        }
    }
    Ok(s)
}

/// Decodes (without verifying) a JWT's header and claims.
pub fn jwt_parts(token: &str) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        anyhow::bail!("the JWT does not have three dot-separated parts");
    };
    let decode = |part: &str, what: &str| -> anyhow::Result<serde_json::Value> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .with_context(|| format!("the JWT {what} is not base64url"))?;
        serde_json::from_slice(&raw).with_context(|| format!("the JWT {what} is not JSON"))
    };
    Ok((decode(h, "header")?, decode(c, "claims")?))
}

#[derive(serde::Serialize)]
struct X509Json {
    spiffe_id: String,
    expires_at: i64,
    expires_at_rfc3339: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    svid_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<WrittenFiles>,
}

/// Runs an `x509` subcommand.
pub async fn run_x509(cmd: X509Command) -> anyhow::Result<()> {
    let X509Command::Mint(a) = cmd;
    let channel = a.admin.connect().await?;
    let m = mint_x509(channel, &a.spiffe_id, &a.dns, a.ttl.unwrap_or(0)).await?;
    let files = a
        .write
        .as_deref()
        .map(|dir| write_files(dir, &m))
        .transpose()?;
    match (a.output.output, files) {
        (Format::Text, Some(f)) => {
            println!("X509-SVID written to {}", f.svid.display());
            println!("Private key written to {}", f.key.display());
            println!("Root CAs written to {}", f.bundle.display());
        }
        (Format::Text, None) => {
            println!("X509-SVID:\n{}", output::pem("CERTIFICATE", &m.chain));
            println!("Private key:\n{}", m.key_pem);
            print!("Root CAs:\n{}", output::pem("CERTIFICATE", &m.bundle));
        }
        (Format::Json, files) => {
            let inline = files.is_none();
            output::print_json(&X509Json {
                spiffe_id: a.spiffe_id,
                expires_at: m.expires_at,
                expires_at_rfc3339: output::rfc3339(m.expires_at),
                svid_pem: inline.then(|| output::pem("CERTIFICATE", &m.chain)),
                key_pem: inline.then(|| m.key_pem.clone()),
                bundle_pem: inline.then(|| output::pem("CERTIFICATE", &m.bundle)),
                files,
            })?;
        }
    }
    Ok(())
}

/// Asks the server for a JWT-SVID; returns the token and its expiry (unix seconds).
pub async fn mint_jwt(
    channel: Channel,
    spiffe_id: &str,
    audience: &[String],
    ttl: i32,
) -> anyhow::Result<(String, i64)> {
    let resp = client::reply(
        SvidsClient::new(channel)
            .mint_jwtsvid(MintJwtsvidRequest {
                spiffe_id: spiffe_id.to_string(),
                audience: audience.to_vec(),
                ttl,
            })
            .await,
    )?;
    Ok((resp.token, resp.expires_at))
}

/// Runs a `jwt` subcommand.
pub async fn run_jwt(cmd: JwtCommand) -> anyhow::Result<()> {
    let JwtCommand::Mint(a) = cmd;
    let channel = a.admin.connect().await?;
    let (token, expires_at) =
        mint_jwt(channel, &a.spiffe_id, &a.audience, a.ttl.unwrap_or(0)).await?;
    match a.output.output {
        Format::Text => println!("{token}"),
        Format::Json => output::print_json(&serde_json::json!({
            "token": token,
            "expires_at": expires_at,
            "expires_at_rfc3339": output::rfc3339(expires_at),
        }))?,
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn jwt_parts_decodes_header_and_claims() {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"ES256"}"#),
            enc(r#"{"sub":"spiffe://td/w"}"#)
        );
        let (h, c) = jwt_parts(&token).unwrap();
        assert_eq!(h["alg"], "ES256");
        assert_eq!(c["sub"], "spiffe://td/w");
        assert!(jwt_parts("a.b").is_err());
        assert!(jwt_parts("a.b.c.d").is_err());
        assert!(
            jwt_parts("!!.e30.x")
                .unwrap_err()
                .to_string()
                .contains("header")
        );
    }

    #[test]
    fn key_file_is_private_even_when_it_existed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let m = MintedX509 {
            key_pem: "KEY".into(),
            chain: vec![vec![1, 2, 3]],
            bundle: vec![vec![4]],
            expires_at: 0,
        };
        let files = write_files(dir.path(), &m).unwrap();
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), "KEY");
        assert!(
            std::fs::read_to_string(&files.svid)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
    }
}
