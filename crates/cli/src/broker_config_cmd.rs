//! `devtables broker-config mosquitto`: writes a Mosquitto configuration from a cloud's device
//! registry, so an external Mosquitto enforces what the embedded broker enforces.
//!
//! It exists because with an external broker the broker's own files are the access control: who
//! may connect (Mosquitto's password file) and which topics each client may use (its ACL file).
//! Both are derived here from the registry alone, so re-running the command after devices were
//! registered, rotated or revoked, and sending Mosquitto SIGHUP (`--reload-pid`), brings the
//! broker in line without a restart; on that reload Mosquitto 2.0 also closes the sessions of
//! clients whose credentials changed or went away.
//!
//! Why a password file and not Mosquitto's dynamic security plugin driven by the cloud: the
//! registry stays the one source of truth and the export is a pure function of it (re-running it
//! converges, whatever failed before), the cloud needs no admin rights on the broker, and no
//! secret ever crosses the network to the broker. The price is that the registry keeps a second
//! hash of each secret in Mosquitto's format (`devtables_cloud::broker_hash`), which exists only
//! for devices registered or rotated since the registry kept it: the others are listed, to be
//! rotated.
//!
//! What it writes into `--out`: `mosquitto.conf` (TLS listener, `allow_anonymous false`, no
//! clear-text listener unless `--plain-port`, `use_username_as_clientid` so that a client id is
//! always its username), `passwords` and `acl` (owner-only; handed to the user Mosquitto runs as
//! when this runs as root), `service-password` (the cloud's broker password, generated once and
//! kept), and, without `--tls-cert/--tls-key`, a CA (`ca.pem`, for agents and the cloud) with a
//! server certificate it signed (`server.pem`, `server.key`; the CA's key is not kept). Every
//! file is written to a temporary name and renamed, so Mosquitto never reads half a file.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use devtables_cloud::auth::{self, SERVICE_USERNAME};
use devtables_cloud::broker_hash;
use devtables_cloud::store::REVOKED_SECRET_HASH;
use devtables_sync::identity::{DeviceId, BROADCAST_DEVICE};

use crate::store_target::StoreTarget;
use devtables_sync::topics;

#[derive(Args)]
pub struct BrokerConfigArgs {
    #[command(subcommand)]
    broker: BrokerKind,
}

#[derive(Subcommand)]
enum BrokerKind {
    /// Mosquitto 2.0: password file, per-device ACL and a TLS listener, from the registry.
    Mosquitto(MosquittoArgs),
}

#[derive(Args)]
struct MosquittoArgs {
    #[command(flatten)]
    store: StoreTarget,
    /// Where to write the configuration (created if missing; files in it are replaced).
    #[arg(long)]
    out: PathBuf,
    /// The cloud's and the agents' `topic_prefix`.
    #[arg(long, default_value = topics::DEFAULT_PREFIX)]
    topic_prefix: String,
    /// The MQTT username the cloud connects with (its `broker_username`).
    #[arg(long, default_value = SERVICE_USERNAME)]
    service_user: String,
    /// A file holding the cloud's broker password (its `broker_password`). Default: OUT/service-password,
    /// generated on the first run and kept.
    #[arg(long)]
    service_password_file: Option<PathBuf>,
    /// The address the listeners bind to (default: every interface).
    #[arg(long)]
    bind: Option<IpAddr>,
    /// The TLS listener's port.
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// Also listen in clear text on this port (device secrets and items then cross the network
    /// readable: for a trusted network only).
    #[arg(long)]
    plain_port: Option<u16>,
    /// The server certificate (PEM) of the TLS listener. Default: generated into OUT with a CA.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A DNS name or IP address the generated server certificate is valid for (repeat it; default
    /// localhost, 127.0.0.1 and ::1). Agents and the cloud must reach the broker by one of them.
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// The account Mosquitto runs as (its `user` setting). When this command runs as root, the
    /// files Mosquitto reads are handed to it; otherwise it is not used.
    #[arg(long, default_value = "mosquitto")]
    user: String,
    /// Send SIGHUP to this Mosquitto process once the files are written, so it reloads the
    /// password and ACL files (and closes the sessions of revoked or rotated devices).
    #[arg(long)]
    reload_pid: Option<i32>,
}

pub fn run(args: BrokerConfigArgs) -> anyhow::Result<()> {
    match args.broker {
        BrokerKind::Mosquitto(args) => mosquitto(args),
    }
}

/// Registry devices read per store call.
const PAGE: usize = 1000;

fn mosquitto(args: MosquittoArgs) -> anyhow::Result<()> {
    check_prefix(&args.topic_prefix)?;
    check_service_user(&args.service_user)?;
    // A wrong pid is refused before anything is written.
    if let Some(pid) = args.reload_pid {
        check_reload_target(pid)?;
    }
    // An export from a folder that holds no store would be an empty fleet: most likely a typo,
    // refused (`open(false)` creates nothing).
    let mut store = args.store.open(false)?;
    let out = create_out_dir(&args.out)?;
    let owner = FileOwner::for_mosquitto(&args.user)?;

    let (service_password_file, service_password) = service_password(&args, &out)?;
    let tls = tls_files(&args, &out, &owner)?;

    let mut passwords = AtomicFile::create(&out, "passwords", 0o600)?;
    let mut acl = AtomicFile::create(&out, "acl", 0o600)?;
    // The cloud's two connections (reading device messages, publishing to devices) need two
    // usernames, since a client id here is its username.
    let egress_user = egress_user(&args.service_user);
    for user in [&args.service_user, &egress_user] {
        writeln!(
            passwords.w,
            "{user}:{}",
            broker_hash::mosquitto_hash(&service_password)
        )?;
    }
    write_acl_header(
        &mut acl.w,
        &args.service_user,
        &egress_user,
        &args.topic_prefix,
    )?;
    let mut summary = Summary::default();
    let mut after: Option<DeviceId> = None;
    loop {
        let page = store.devices(None, after.as_ref(), PAGE)?;
        for record in &page {
            let Ok(id) = DeviceId::new(record.account.as_str(), record.device.as_str()) else {
                tracing::warn!(
                    account = %record.account, device = %record.device,
                    "skipping a registry row whose names are not valid device names"
                );
                summary.invalid += 1;
                continue;
            };
            if record.secret_hash == REVOKED_SECRET_HASH {
                summary.revoked += 1;
                continue;
            }
            match &record.broker_hash {
                Some(hash) if broker_hash::is_mosquitto_hash(hash) => {
                    writeln!(passwords.w, "{id}:{hash}")?;
                    write_device_acl(&mut acl.w, &id, &args.topic_prefix)?;
                    summary.devices += 1;
                }
                _ => {
                    summary.to_rotate += 1;
                    if summary.to_rotate_listed.len() < MAX_LISTED {
                        summary.to_rotate_listed.push(id.to_string());
                    }
                }
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE => {
                // Only a position in the listing (which may have stopped on a row skipped above
                // for its names), so it is not validated.
                after = Some(DeviceId {
                    account: last.account.clone(),
                    device: last.device.clone(),
                });
            }
            _ => break,
        }
    }
    let conf = mosquitto_conf(&args, &out, &tls, owner.user_line())?;
    let mut conf_file = AtomicFile::create(&out, "mosquitto.conf", 0o644)?;
    conf_file.w.write_all(conf.as_bytes())?;
    // Password and ACL files first, the configuration that names them last.
    passwords.commit(&owner)?;
    acl.commit(&owner)?;
    // World-readable (Mosquitto re-reads it on SIGHUP as the user it dropped to) and kept this
    // command's: Mosquitto has no business changing its own configuration.
    conf_file.commit(&FileOwner::Unchanged)?;
    sync_dir(&out)?;

    for name in &summary.to_rotate_listed {
        tracing::warn!(
            "device {name} is left out of the password file, so it cannot connect to Mosquitto: \
             the registry has no Mosquitto hash of its secret (registered before the cloud kept \
             one): rotate its secret (POST /v1/devices/{name}/secret, then give the agent the \
             new one) and run this command again"
        );
    }
    let unlisted = summary.to_rotate - summary.to_rotate_listed.len() as u64;
    if unlisted > 0 {
        tracing::warn!(
            "{unlisted} more devices cannot connect to Mosquitto until their secret is rotated"
        );
    }
    if let Some(pid) = args.reload_pid {
        reload(pid)?;
    }
    eprintln!(
        "wrote {} ({} devices, {} revoked left out, {} to rotate); the cloud connects as {} \
         (broker_username) and {} (broker_egress_username) with the password in {}{}",
        out.join("mosquitto.conf").display(),
        summary.devices,
        summary.revoked,
        summary.to_rotate,
        args.service_user,
        egress_user,
        service_password_file.display(),
        match args.reload_pid {
            Some(pid) => format!("; Mosquitto (pid {pid}) told to reload"),
            None => "; start Mosquitto with -c on it, or send it SIGHUP to reload".into(),
        }
    );
    let report = serde_json::json!({
        "config": out.join("mosquitto.conf"),
        "devices": summary.devices,
        "revoked": summary.revoked,
        "to_rotate": summary.to_rotate_listed,
        "to_rotate_count": summary.to_rotate,
        "invalid": summary.invalid,
        "service_user": args.service_user,
        "service_egress_user": egress_user,
        "service_password_file": service_password_file,
        "ca": tls.ca,
        "reloaded": args.reload_pid,
    });
    println!("{report}");
    Ok(())
}

/// Most devices to rotate named one by one (in the log and the report); the rest are counted.
const MAX_LISTED: usize = 1000;

#[derive(Default)]
struct Summary {
    devices: u64,
    revoked: u64,
    /// Devices left out for want of a Mosquitto hash.
    to_rotate: u64,
    /// The first [`MAX_LISTED`] of them.
    to_rotate_listed: Vec<String>,
    /// Registry rows skipped because their names are not valid device names.
    invalid: u64,
}

/// The topic prefix goes into ACL lines: no wildcard, no white space, no empty level.
fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    if prefix.is_empty()
        || prefix.split('/').any(str::is_empty)
        || prefix
            .chars()
            .any(|c| matches!(c, '+' | '#') || c.is_whitespace() || c.is_control())
    {
        bail!(
            "--topic-prefix {prefix:?} must be non-empty topic levels without wildcards or white \
             space (the cloud's and the agents' topic_prefix)"
        );
    }
    Ok(())
}

/// The service user goes into the password and ACL files and must never be a device's name.
fn check_service_user(user: &str) -> anyhow::Result<()> {
    if user.is_empty()
        || user.len() > 64
        || !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        bail!(
            "--service-user {user:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-' \
             (no '/', which device names use)"
        );
    }
    Ok(())
}

fn create_out_dir(out: &Path) -> anyhow::Result<PathBuf> {
    if !out.exists() {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        // Mosquitto (possibly another user) must reach the files; the secret ones are 0600.
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the permissions of {}", out.display()))?;
    }
    out.canonicalize()
        .with_context(|| format!("cannot resolve {}", out.display()))
}

/// The cloud's broker password: from `--service-password-file`, else OUT/service-password,
/// generated on the first run (owner-only) and then kept, so that re-running the command does
/// not lock the running cloud out.
fn service_password(args: &MosquittoArgs, out: &Path) -> anyhow::Result<(PathBuf, String)> {
    let path = args
        .service_password_file
        .clone()
        .unwrap_or_else(|| out.join(SERVICE_PASSWORD_FILE));
    if args.service_password_file.is_none() && !path.exists() {
        let mut file = AtomicFile::create(out, SERVICE_PASSWORD_FILE, 0o600)?;
        writeln!(file.w, "{}", auth::generate_secret())?;
        // Read by the cloud's operator, not by Mosquitto: it keeps this command's owner.
        file.commit(&FileOwner::Unchanged)?;
        eprintln!(
            "generated the cloud's broker password in {}: set broker_username '{}' and \
             broker_password to it in the cloud's file",
            path.display(),
            args.service_user
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the service password file {}", path.display()))?;
    let password = text.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() || password.contains(['\n', '\r']) {
        bail!(
            "{} must hold the service password on one line",
            path.display()
        );
    }
    Ok((path, password))
}

const SERVICE_PASSWORD_FILE: &str = "service-password";

/// The TLS files the listener uses and the CA agents should trust (when generated).
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

fn tls_files(args: &MosquittoArgs, out: &Path, owner: &FileOwner) -> anyhow::Result<TlsFiles> {
    let (cert, key, ca) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let cert = cert
                .canonicalize()
                .with_context(|| format!("--tls-cert {}", cert.display()))?;
            let key = key
                .canonicalize()
                .with_context(|| format!("--tls-key {}", key.display()))?;
            (cert, key, None)
        }
        _ => {
            let (cert, key, ca) = (
                out.join("server.pem"),
                out.join("server.key"),
                out.join("ca.pem"),
            );
            if cert.exists() && key.exists() && ca.exists() {
                eprintln!(
                    "kept the certificate generated before ({}); delete it to make a new one",
                    cert.display()
                );
            } else {
                generate_certificates(out, &args.tls_names, owner)?;
            }
            (cert, key, Some(ca))
        }
    };
    // The same check the cloud makes of its own listener's files: they parse and match.
    devtables_cloud::tls::server_config(&devtables_cloud::tls::ServerTls {
        cert: cert.clone(),
        key: key.clone(),
    })
    .with_context(|| {
        format!(
            "the TLS listener's certificate {} and key {} are not usable",
            cert.display(),
            key.display()
        )
    })?;
    Ok(TlsFiles { cert, key, ca })
}

/// A CA and a server certificate it signs, for `names`; the CA's key is dropped (nothing else is
/// ever signed with it), so only the certificate agents trust is kept.
fn generate_certificates(out: &Path, names: &[String], owner: &FileOwner) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let names: Vec<String> = if names.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    } else {
        names.to_vec()
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "devtables Mosquitto CA");
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    for name in &names {
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .with_context(|| format!("--tls-name {name:?} is not a DNS name"))?,
            ),
        });
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    let mut file = AtomicFile::create(out, "server.key", 0o600)?;
    file.w.write_all(key.serialize_pem().as_bytes())?;
    file.commit(owner)?;
    for (name, pem) in [("server.pem", cert.pem()), ("ca.pem", ca.pem())] {
        let mut file = AtomicFile::create(out, name, 0o644)?;
        file.w.write_all(pem.as_bytes())?;
        file.commit(&FileOwner::Unchanged)?;
    }
    eprintln!(
        "generated a CA ({}) and a server certificate for {}: give agents and the cloud the CA",
        out.join("ca.pem").display(),
        names.join(", ")
    );
    Ok(())
}

fn mosquitto_conf(
    args: &MosquittoArgs,
    out: &Path,
    tls: &TlsFiles,
    user_line: Option<String>,
) -> anyhow::Result<String> {
    let bind = args.bind.map(|ip| format!(" {ip}")).unwrap_or_default();
    let mut conf = format!(
        "# Written by `devtables broker-config mosquitto` from the device registry in {data}.\n\
         # Do not edit: run the command again after devices are registered, rotated or revoked,\n\
         # with --reload-pid (or send Mosquitto SIGHUP), to reload the password and ACL files.\n\
         # Listener changes need a restart.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         password_file {passwords}\n\
         acl_file {acl}\n",
        data = args.store.describe(),
        passwords = conf_path(&out.join("passwords"))?,
        acl = conf_path(&out.join("acl"))?,
    );
    if let Some(line) = user_line {
        conf.push_str(&line);
    }
    // A client id is always its username: no client can take over, or be mistaken for, another
    // client's session (the embedded broker refuses a mismatch outright).
    conf.push_str(&format!(
        "\nlistener {port}{bind}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         use_username_as_clientid true\n",
        port = args.port,
        cert = conf_path(&tls.cert)?,
        key = conf_path(&tls.key)?,
    ));
    if let Some(plain) = args.plain_port {
        tracing::warn!(
            port = plain,
            "a clear-text listener was asked for: device secrets and items cross the network readable"
        );
        conf.push_str(&format!(
            "\n# Clear text (asked for with --plain-port): secrets and items cross the network readable.\n\
             listener {plain}{bind}\n\
             use_username_as_clientid true\n"
        ));
    }
    Ok(conf)
}

/// A path as a Mosquitto configuration value: it runs to the end of the line, so a line break
/// in it would inject settings.
fn conf_path(path: &Path) -> anyhow::Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
    if text.contains(['\n', '\r']) {
        bail!("{text:?} holds a line break: choose another path");
    }
    Ok(text.to_string())
}

/// The username of the cloud's publishing connection (`broker_egress_username`).
fn egress_user(service: &str) -> String {
    format!("{service}-egress")
}

/// The service's reading connection may read every device's up topic; its publishing
/// connection may write every down topic (each device's and each account's broadcast) and the
/// cloud's own path probes, which come back through the reading connection's subscription
/// (`{prefix}/_devtables/{node}/up`: an account no device may belong to).
fn write_acl_header(
    w: &mut impl Write,
    service: &str,
    egress: &str,
    prefix: &str,
) -> std::io::Result<()> {
    writeln!(
        w,
        "# Written by `devtables broker-config mosquitto`: one block per registered device.\n\
         user {service}\n\
         topic read {up}\n\n\
         user {egress}\n\
         topic write {prefix}/+/+/down\n\
         topic write {probes}\n",
        up = topics::up_filter(prefix),
        probes = topics::probe_topic(prefix, "+"),
    )
}

/// A device may publish only on its own up topic (its last will too) and read only its own down
/// topic and its account's broadcast topic. A `user` block per device rather than `pattern`
/// lines: the broadcast topic needs the account alone, which no pattern can take from the
/// username; and a revoked device, absent here, keeps no right even in a session that outlived
/// the reload.
fn write_device_acl(w: &mut impl Write, id: &DeviceId, prefix: &str) -> std::io::Result<()> {
    debug_assert_ne!(id.device, BROADCAST_DEVICE);
    writeln!(
        w,
        "user {id}\n\
         topic write {up}\n\
         topic read {down}\n\
         topic read {broadcast}\n",
        up = topics::up_topic(prefix, id),
        down = topics::down_topic(prefix, id),
        broadcast = topics::broadcast_topic(prefix, &id.account),
    )
}

/// Who the files Mosquitto reads must belong to.
enum FileOwner {
    /// This command does not run as root: Mosquitto, started by the same user, does not change
    /// user, so the files stay this user's.
    Unchanged,
    /// This command runs as root: Mosquitto started as root drops to `name` before it reads the
    /// password and ACL files (and re-reads everything as it on SIGHUP).
    User { name: String, uid: u32, gid: u32 },
}

impl FileOwner {
    fn for_mosquitto(user: &str) -> anyhow::Result<FileOwner> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(FileOwner::Unchanged);
        }
        let (uid, gid) = lookup_user(user)?;
        Ok(FileOwner::User {
            name: user.to_string(),
            uid,
            gid,
        })
    }

    fn user_line(&self) -> Option<String> {
        match self {
            FileOwner::Unchanged => None,
            FileOwner::User { name, .. } => Some(format!("user {name}\n")),
        }
    }

    fn apply(&self, path: &Path) -> anyhow::Result<()> {
        if let FileOwner::User { name, uid, gid } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .with_context(|| format!("cannot hand {} to user {name}", path.display()))?;
        }
        Ok(())
    }
}

/// The uid and gid of a user name, from the system's user database.
fn lookup_user(name: &str) -> anyhow::Result<(u32, u32)> {
    let cname = CString::new(name).with_context(|| format!("--user {name:?}"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwnam_r fills it with pointers into `buf`, which
    // outlives every read below (only the two integers are read).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and buf.len() is the length of buf.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        bail!(
            "cannot look up user {name:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    if result.is_null() {
        bail!(
            "user {name:?} does not exist: pass --user with the account Mosquitto runs as (its \
             `user` setting), so the files it reads are handed to it"
        );
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// A file written under a temporary name in its folder and renamed over the real one once
/// complete and on disk, so a reader (Mosquitto on SIGHUP) sees the old file or the new one.
struct AtomicFile {
    w: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl AtomicFile {
    fn create(dir: &Path, name: &str, mode: u32) -> anyhow::Result<AtomicFile> {
        let tmp = dir.join(format!(".{name}.tmp"));
        // A leftover of an interrupted run: its mode may be wider than ours.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", tmp.display()))
            }
            _ => {}
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        // The umask may have narrowed the mode; public files must stay readable.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the permissions of {}", tmp.display()))?;
        Ok(AtomicFile {
            w: BufWriter::new(file),
            tmp,
            path: dir.join(name),
        })
    }

    fn commit(self, owner: &FileOwner) -> anyhow::Result<()> {
        let file = self
            .w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        owner.apply(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.tmp.display(),
                self.path.display()
            )
        })
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush {}", dir.display()))
}

/// Checks that `pid` is a Mosquitto process (a wrong pid must not hang up an unrelated
/// process).
fn check_reload_target(pid: i32) -> anyhow::Result<()> {
    if pid <= 1 {
        bail!("--reload-pid {pid} is not a Mosquitto process id");
    }
    let comm = Path::new("/proc").join(pid.to_string()).join("comm");
    if let Ok(name) = std::fs::read_to_string(&comm) {
        if name.trim() != "mosquitto" {
            bail!(
                "--reload-pid: process {pid} is {:?}, not mosquitto: nothing was written or \
                 signalled",
                name.trim()
            );
        }
    }
    Ok(())
}

/// Sends SIGHUP to Mosquitto (checked by [`check_reload_target`]), which reloads its password
/// and ACL files.
fn reload(pid: i32) -> anyhow::Result<()> {
    // SAFETY: kill has no memory preconditions; pid is a single process (> 1).
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        bail!(
            "cannot signal Mosquitto (pid {pid}) to reload: {} (the files are written; send it \
             SIGHUP yourself)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_acl_blocks_name_only_that_devices_topics() {
        let id = DeviceId::new("acme", "d1").unwrap();
        let mut out = Vec::new();
        write_device_acl(&mut out, &id, "dt").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "user acme/d1\ntopic write dt/acme/d1/up\ntopic read dt/acme/d1/down\n\
             topic read dt/acme/_all/down\n\n"
        );
        let mut out = Vec::new();
        write_acl_header(&mut out, "svc", &egress_user("svc"), "dt").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(
            "user svc\ntopic read dt/+/+/up\n\nuser svc-egress\ntopic write dt/+/+/down\n\
             topic write dt/_devtables/+/up\n"
        ));
    }

    #[test]
    fn names_that_could_inject_acl_or_password_lines_are_refused() {
        for bad in ["", "a b", "a/+", "#", "a//b", "/a", "a\nuser x"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        for good in ["devtables", "org/fleet", "dt1x2"] {
            assert!(check_prefix(good).is_ok(), "{good:?}");
        }
        for bad in ["", "acme/d1", "svc:x", "svc\nuser", "a b"] {
            assert!(check_service_user(bad).is_err(), "{bad:?}");
        }
        assert!(check_service_user(SERVICE_USERNAME).is_ok());
        assert!(conf_path(Path::new("/tmp/a\nuser root")).is_err());
    }
}
