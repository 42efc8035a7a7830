//! A fake Linkerd control plane on loopback, for running a real linkerd2-proxy in a test
//! namespace (`integration/linkerd.rs`).
//!
//! `etp-linkerd-control --dir DIR --name NAME [--listen ADDR] [--log FILE]`
//!
//! At start it makes a throw-away trust anchor (ECDSA P-256, `rcgen`) and the proxy's identity
//! documents, and writes them where the proxy reads them:
//! - `DIR/ca.pem`: the trust anchor (`LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS` takes its text)
//! - `DIR/id/key.p8` (PKCS#8) and `DIR/id/csr.der` (a CSR for DNS name NAME):
//!   `LINKERD2_PROXY_IDENTITY_DIR=DIR/id`
//! - `DIR/token`: `LINKERD2_PROXY_IDENTITY_TOKEN_FILE`
//!
//! then serves three gRPC services on ADDR (default 127.0.0.1:8090; a loopback address makes
//! the proxy talk plaintext to it):
//! - `Identity/Certify`: checks the token, the requested identity and the CSR's name, and
//!   answers with a leaf certificate for the CSR's key signed by the trust anchor (24 h).
//! - `OutboundPolicies/Get|Watch`: `NotFound` for every target, which makes the proxy
//!   synthesize a policy that forwards to the original destination (after protocol detection).
//! - `Destination/Get|GetProfile`: `InvalidArgument`, which the proxy takes as "this address
//!   has no profile and no endpoints" (it retries any other error, `NotFound` included, while
//!   the connection waits; it asks only for addresses in
//!   `LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS`).
//!
//! Every request is recorded as one line in FILE (opened for append; stdout without `--log`),
//! e.g. `policy target=10.96.0.10:8080 workload=etp answer=NotFound`.
//! It writes `DIR/ready` once it listens. The whole tool is test scaffolding: the CA key lives
//! only in this process's memory.

use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use linkerd2_proxy_api::destination::destination_server::{Destination, DestinationServer};
use linkerd2_proxy_api::destination::{DestinationProfile, GetDestination, Update};
use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use linkerd2_proxy_api::outbound::outbound_policies_server::{
    OutboundPolicies, OutboundPoliciesServer,
};
use linkerd2_proxy_api::outbound::{traffic_spec, OutboundPolicy, TrafficSpec};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use tonic::{Request, Response, Status};

type BoxError = Box<dyn Error + Send + Sync>;
type Log = Arc<Mutex<Box<dyn Write + Send>>>;

fn record(log: &Log, line: String) {
    let mut w = log.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(w, "{line}");
    let _ = w.flush();
}

struct Args {
    dir: PathBuf,
    name: String,
    listen: SocketAddr,
    log: Option<PathBuf>,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut dir = None;
    let mut name = None;
    let mut listen: SocketAddr = "127.0.0.1:8090".parse()?;
    let mut log = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--name" => name = Some(value()?),
            "--listen" => listen = value()?.parse()?,
            "--log" => log = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(Args {
        dir: dir.ok_or("--dir DIR is required")?,
        name: name.ok_or("--name NAME is required")?,
        listen,
        log,
    })
}

/// Writes `bytes` to `path`, readable by everyone (the proxy runs as another uid).
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), BoxError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// The trust anchor: a self-signed CA, and the issuer that signs leaves with its key.
fn make_ca() -> Result<(String, Issuer<'static, KeyPair>), BoxError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "etp test trust anchor");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(7);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// The proxy's documents: a P-256 key (PKCS#8 DER) and a CSR (DER) naming `name`.
fn make_identity_documents(name: &str) -> Result<(Vec<u8>, Vec<u8>), BoxError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

struct Control {
    name: String,
    token: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    log: Log,
}

impl Control {
    /// Signs the CSR if it asks for exactly our name; the leaf is valid for 24 hours.
    fn sign(&self, req: &CertifyRequest) -> Result<(Vec<u8>, i64), String> {
        if req.token != self.token {
            return Err("token does not match".into());
        }
        if req.identity != self.name {
            return Err(format!(
                "identity {:?} is not {:?}",
                req.identity, self.name
            ));
        }
        let der = req.certificate_signing_request.as_slice().into();
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| format!("CSR does not parse: {e}"))?;
        let names_ok = matches!(
            csr.params.subject_alt_names.as_slice(),
            [SanType::DnsName(n)] if n.as_str() == self.name
        );
        if !names_ok {
            return Err(format!(
                "CSR names {:?}, not {}",
                csr.params.subject_alt_names, self.name
            ));
        }
        let now = time::OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::hours(24);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let expiry = p.not_after.unix_timestamp();
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| format!("signing failed: {e}"))?;
        Ok((cert.der().to_vec(), expiry))
    }
}

#[tonic::async_trait]
impl Identity for Control {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        match self.sign(&req) {
            Ok((leaf, expiry)) => {
                record(
                    &self.log,
                    format!("certify identity={} answer=Ok", req.identity),
                );
                Ok(Response::new(CertifyResponse {
                    leaf_certificate: leaf,
                    intermediate_certificates: vec![],
                    valid_until: Some(prost_types::Timestamp {
                        seconds: expiry,
                        nanos: 0,
                    }),
                }))
            }
            Err(why) => {
                record(
                    &self.log,
                    format!("certify identity={} answer=Refused {why}", req.identity),
                );
                Err(Status::invalid_argument(why))
            }
        }
    }
}

fn target_text(spec: &TrafficSpec) -> String {
    match &spec.target {
        Some(traffic_spec::Target::Addr(a)) => match SocketAddr::try_from(*a) {
            Ok(sa) => sa.to_string(),
            Err(e) => format!("invalid({e})"),
        },
        Some(traffic_spec::Target::Authority(name)) => name.clone(),
        None => "none".to_string(),
    }
}

type NoStream<T> = futures::stream::Empty<Result<T, Status>>;

#[tonic::async_trait]
impl OutboundPolicies for Control {
    async fn get(&self, request: Request<TrafficSpec>) -> Result<Response<OutboundPolicy>, Status> {
        let spec = request.into_inner();
        let target = target_text(&spec);
        record(
            &self.log,
            format!(
                "policy get target={target} workload={} answer=NotFound",
                spec.source_workload
            ),
        );
        Err(Status::not_found(format!("no policy for {target}")))
    }

    type WatchStream = NoStream<OutboundPolicy>;

    async fn watch(
        &self,
        request: Request<TrafficSpec>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let spec = request.into_inner();
        let target = target_text(&spec);
        record(
            &self.log,
            format!(
                "policy target={target} workload={} answer=NotFound",
                spec.source_workload
            ),
        );
        Err(Status::not_found(format!("no policy for {target}")))
    }
}

#[tonic::async_trait]
impl Destination for Control {
    type GetStream = NoStream<Update>;
    type GetProfileStream = NoStream<DestinationProfile>;

    async fn get(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let path = request.into_inner().path;
        record(
            &self.log,
            format!("destination get path={path} answer=InvalidArgument"),
        );
        Err(Status::invalid_argument(format!(
            "unknown destination {path}"
        )))
    }

    async fn get_profile(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetProfileStream>, Status> {
        let path = request.into_inner().path;
        record(
            &self.log,
            format!("profile path={path} answer=InvalidArgument"),
        );
        Err(Status::invalid_argument(format!("no profile for {path}")))
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let log: Box<dyn Write + Send> = match &args.log {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("open {}: {e}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let log: Log = Arc::new(Mutex::new(log));

    let (ca_pem, issuer) = make_ca()?;
    let (key_p8, csr_der) = make_identity_documents(&args.name)?;
    let token = b"etp-test-token\n".to_vec();
    let id_dir = args.dir.join("id");
    std::fs::create_dir_all(&id_dir).map_err(|e| format!("mkdir {}: {e}", id_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [&args.dir, &id_dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    write_public(&args.dir.join("ca.pem"), ca_pem.as_bytes())?;
    write_public(&id_dir.join("key.p8"), &key_p8)?;
    write_public(&id_dir.join("csr.der"), &csr_der)?;
    write_public(&args.dir.join("token"), &token)?;

    let control = Arc::new(Control {
        name: args.name.clone(),
        token,
        issuer,
        log: log.clone(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", args.listen))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    write_public(&args.dir.join("ready"), args.listen.to_string().as_bytes())?;
    record(&log, format!("listening addr={}", args.listen));

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::from_arc(control.clone()))
        .add_service(OutboundPoliciesServer::from_arc(control.clone()))
        .add_service(DestinationServer::from_arc(control))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("etp-linkerd-control: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etp-linkerd-control: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
