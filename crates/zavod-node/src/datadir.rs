//! The data directory: keys, trust and credentials on disk.
//!
//! Layout (all small text files, secrets mode 0600):
//! - `node.key`         this node's ed25519 secret (hex)
//! - `authorities`      trusted mesh authority public keys (hex, one a line)
//! - `authority.key`    the mesh authority's secret, only where it was created
//! - `membership.cert`  this node's membership, signed by the authority
//! - `client.key`, `client.cred`  the local user's key and capability credential
//! - `invites.used`     invites this node admitted a node with, until they
//!   expire (where it holds the authority key)
//! - `peers`            where the other members listened, to find the mesh
//!   again after a restart (`rejoin.rs`)
//! - `memory/`          the conversation database
//!
//! The first start with an empty directory creates a local authority, signs
//! the node's membership and issues the local user a credential, so a chat
//! on the same machine works with no further step.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use zavod_proto::NodeId;
use zavod_proto::UnixMs;
use zavod_proto::trust::{
    Authority, CAP_TEXT_PREFIX, CapabilityToken, Credential, CredentialBody, JoinTicket,
    JoinTicketBody, Keypair, Membership, MembershipBody, ModelPattern,
};

const NODE_KEY: &str = "node.key";
const AUTHORITY_KEY: &str = "authority.key";
const AUTHORITIES: &str = "authorities";
const MEMBERSHIP: &str = "membership.cert";
/// Where the node that signs this node's memberships listens.
const SIGNER_ADDRS: &str = "signer_addrs";
/// The mesh's actor-session secret (readable by the owner only).
const SESSION_SECRET: &str = "session.secret";
pub(crate) const CLIENT_KEY: &str = "client.key";
pub(crate) const CLIENT_CRED: &str = "client.cred";
/// The running node's dialable addresses, written when it is ready.
pub const LISTEN_ADDRS: &str = "listen_addrs";

const DAY_MS: u64 = 86_400_000;
/// Clock difference between machines tolerated by certificates issued here.
pub(crate) const CLOCK_SKEW_MS: u64 = 5 * 60_000;
/// A local membership lasts ten years; a local user's credential one year.
const LOCAL_MEMBERSHIP_MS: u64 = 3_650 * DAY_MS;
const LOCAL_CREDENTIAL_MS: u64 = 365 * DAY_MS;
/// A local user's budget: effectively unlimited on their own machine.
const LOCAL_TOKEN_BUDGET: u64 = 1_000_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("no client credential in {dir}: {hint}")]
    NoCredential { dir: String, hint: String },
    #[error("cannot draw random bytes from the OS: {0}")]
    Random(String),
    #[error("{0}")]
    Mesh(String),
    #[error(
        "another zavod node is running on the data directory {dir}{holder}; stop it, or give this one its own --data-dir"
    )]
    Locked { dir: String, holder: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn random_secret() -> Result<[u8; 32], DataDirError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| DataDirError::Random(e.to_string()))?;
    Ok(b)
}

pub fn random_u128() -> Result<u128, DataDirError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| DataDirError::Random(e.to_string()))?;
    Ok(u128::from_le_bytes(b))
}

/// Creates `dir` (and its parents) readable by its owner only, as every
/// data directory is: it holds keys, credentials and conversations.
pub fn create_private_dir(dir: &Path) -> Result<(), DataDirError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_err(dir))
}

/// A file's text, or empty when there is no such file (a record not made
/// yet); any other read error names the file.
pub(crate) fn read_if_present(path: &Path) -> Result<String, DataDirError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(DataDirError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Writes a file atomically, private if `secret`: a temporary file of a
/// unique name beside it, synced, renamed over it, and the directory
/// synced, so a crash leaves the old file or the new one, never a torn or
/// lost one.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), DataDirError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    // Temporary files are created readable by their owner only.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(contents.as_bytes())
        .map_err(io_err(tmp.path()))?;
    #[cfg(unix)]
    if !secret {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// The lock a running node holds on its data directory (released when
/// dropped, or when the process ends however it ends).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Name of the lock file in a data directory.
const LOCK_FILE: &str = "node.lock";

/// Takes the data directory for one node process, before any key in it is
/// read or written: a second node on the same directory would share its
/// identity and corrupt its memory.
pub fn lock_dir(dir: &Path) -> Result<DirLock, DataDirError> {
    create_private_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = std::io::Read::read_to_string(&mut file, &mut pid);
            let pid = pid.trim();
            return Err(DataDirError::Locked {
                dir: dir.display().to_string(),
                holder: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (process {pid})")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
    }
    // Who holds it, for the message another start gives.
    file.set_len(0).map_err(io_err(&path))?;
    writeln!(file, "{}", std::process::id()).map_err(io_err(&path))?;
    Ok(DirLock { _file: file })
}

fn read_key(path: &Path) -> Result<Option<Keypair>, DataDirError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let corrupt = |reason: &str| DataDirError::Corrupt {
                path: path.display().to_string(),
                reason: reason.into(),
            };
            let bytes = hex::decode(text.trim()).map_err(|_| corrupt("expected 64 hex digits"))?;
            let secret: [u8; 32] = bytes
                .try_into()
                .map_err(|_| corrupt("expected 64 hex digits"))?;
            Ok(Some(Keypair::from_secret(secret)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn load_or_create_key(path: &Path, created: &mut bool) -> Result<Keypair, DataDirError> {
    if let Some(k) = read_key(path)? {
        return Ok(k);
    }
    let k = Keypair::from_secret(random_secret()?);
    write_file(path, &format!("{}\n", hex::encode(k.secret_bytes())), true)?;
    *created = true;
    Ok(k)
}

/// What the first start created, for the node to tell its user.
#[derive(Debug, Default, Clone)]
pub struct InitReport {
    pub created_node_key: bool,
    pub created_authority: bool,
    pub created_client_credential: Option<PathBuf>,
}

/// A node's view of its data directory.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub dir: PathBuf,
    pub key: Keypair,
    pub authorities: BTreeSet<NodeId>,
    pub authority: Option<Authority>,
    pub membership: Option<Membership>,
    /// The secret the mesh's actor-session cookie is derived from (see
    /// `crate::cluster::mesh_cookie`); `None` in a directory that joined
    /// before meshes had one.
    pub session_secret: Option<[u8; 32]>,
}

impl NodeIdentity {
    /// Opens (creating on first use) the node's data directory; a directory
    /// that belongs to no mesh founds a local one.
    pub fn open(dir: &Path, now_ms: UnixMs) -> Result<(Self, InitReport), DataDirError> {
        Self::open_with(dir, now_ms, true)
    }

    /// Opens the data directory of a node about to join a mesh: no local
    /// mesh is founded.
    pub fn open_for_join(dir: &Path, now_ms: UnixMs) -> Result<(Self, InitReport), DataDirError> {
        Self::open_with(dir, now_ms, false)
    }

    /// Whether this directory founded its own mesh (holds an authority key).
    pub fn is_authority(&self) -> bool {
        self.authority.is_some()
    }

    /// Stores a membership obtained by joining, trusts its authorities,
    /// and remembers where the node that signed it listens (`signer`, with
    /// its peer id), to have it renewed there.
    pub(crate) fn save_membership(
        &mut self,
        membership: Membership,
        authorities: &[NodeId],
        signer: &[String],
        session_secret: Option<[u8; 32]>,
    ) -> Result<(), DataDirError> {
        self.authorities.extend(authorities.iter().copied());
        write_authorities(&self.dir.join(AUTHORITIES), &self.authorities)?;
        if let Some(s) = session_secret {
            write_file(
                &self.dir.join(SESSION_SECRET),
                &format!("{}\n", hex::encode(s)),
                true,
            )?;
            self.session_secret = Some(s);
        }
        self.store_membership(&membership)?;
        if !signer.is_empty() {
            write_file(
                &self.dir.join(SIGNER_ADDRS),
                &format!("{}\n", signer.join("\n")),
                false,
            )?;
        }
        self.membership = Some(membership);
        Ok(())
    }

    /// Writes a membership (a renewed one) to the data directory.
    pub(crate) fn store_membership(&self, membership: &Membership) -> Result<(), DataDirError> {
        write_file(
            &self.dir.join(MEMBERSHIP),
            &format!(
                "{}\n",
                hex::encode(zavod_proto::wire::encode_unversioned(membership))
            ),
            false,
        )
    }

    /// Where the node that signs this node's memberships listens, as the
    /// invite named it (empty for the authority's own node, and for a data
    /// directory that joined before this was recorded).
    pub(crate) fn signer_addrs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(SIGNER_ADDRS))
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Signs a fresh membership for a member presenting the one it holds
    /// (still valid, and its own), lasting as long as that one did.
    pub(crate) fn renew(
        &self,
        current: &Membership,
        member: NodeId,
        now_ms: UnixMs,
    ) -> Result<Membership, String> {
        let a = self
            .authority
            .as_ref()
            .ok_or("this node cannot sign memberships; renew at the node that signed yours")?;
        let body = current.verify(&self.authorities, now_ms).map_err(|e| {
            format!("renewal refused: {e}; ask for a new invite (zavod mesh invite)")
        })?;
        if body.member != member {
            return Err("renewal refused: the membership presented is another node's".into());
        }
        let ttl_ms = body
            .expires_at_ms
            .saturating_sub(body.issued_at_ms)
            .saturating_sub(CLOCK_SKEW_MS)
            .clamp(1, LOCAL_MEMBERSHIP_MS);
        Ok(a.certify_member(MembershipBody {
            member,
            issued_at_ms: now_ms.saturating_sub(CLOCK_SKEW_MS),
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        }))
    }

    /// Signs an invite to this mesh (needs the authority key).
    pub fn invite(
        &self,
        now_ms: UnixMs,
        ttl_ms: u64,
        bootstrap: Vec<String>,
        uses: u32,
        membership_ttl_ms: u64,
    ) -> Result<JoinTicket, DataDirError> {
        let a = self.authority.as_ref().ok_or_else(|| {
            DataDirError::Mesh(format!(
                "{} holds no mesh authority key: invites are made where the mesh was created (zavod mesh init)",
                self.dir.display()
            ))
        })?;
        Ok(a.invite(JoinTicketBody {
            id: random_u128()?.to_le_bytes(),
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            bootstrap,
            membership_ttl_ms: membership_ttl_ms.clamp(1, LOCAL_MEMBERSHIP_MS),
            uses,
        }))
    }

    /// Signs a membership for a node that presents a valid invite of this
    /// mesh; `None` when this node holds no authority key.
    pub(crate) fn admit(
        &self,
        ticket: &JoinTicket,
        member: NodeId,
        now_ms: UnixMs,
    ) -> Result<Membership, String> {
        let a = self.authority.as_ref().ok_or(
            "this node cannot sign memberships; join through the node that made the invite",
        )?;
        let body = ticket
            .verify(now_ms)
            .map_err(|e| format!("invite refused: {e}"))?;
        if ticket.signer != a.id() {
            return Err("invite refused: it is for another mesh".into());
        }
        Ok(a.certify_member(MembershipBody {
            member,
            // Backdated so that machines whose clocks run a little behind
            // this one accept it at once.
            issued_at_ms: now_ms.saturating_sub(CLOCK_SKEW_MS),
            expires_at_ms: now_ms.saturating_add(body.membership_ttl_ms),
        }))
    }

    /// Issues a client credential. Without `holder`, a fresh key is made
    /// and returned inside a capability token (one line of text).
    pub fn issue_capability(
        &self,
        now_ms: UnixMs,
        models: &str,
        token_budget: u64,
        ttl_ms: u64,
        rate_per_min: u32,
        holder: Option<NodeId>,
    ) -> Result<String, DataDirError> {
        let a = self.authority.as_ref().ok_or_else(|| {
            DataDirError::Mesh(format!(
                "{} holds no mesh authority key: credentials are issued where the mesh was created",
                self.dir.display()
            ))
        })?;
        let (secret, holder) = match holder {
            Some(h) => (None, h),
            None => {
                let k = Keypair::from_secret(random_secret()?);
                (Some(k.secret_bytes()), k.public())
            }
        };
        let credential = a.issue_credential(CredentialBody {
            id: random_u128()?.to_le_bytes(),
            holder,
            models: ModelPattern(models.into()),
            token_budget,
            rate_per_min,
            not_before_ms: now_ms.saturating_sub(60_000),
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        });
        Ok(match secret {
            Some(secret) => CapabilityToken { secret, credential }.to_text(),
            None => credential.to_text(),
        })
    }

    fn open_with(
        dir: &Path,
        now_ms: UnixMs,
        found: bool,
    ) -> Result<(Self, InitReport), DataDirError> {
        create_private_dir(dir)?;
        let mut report = InitReport::default();
        let key = load_or_create_key(&dir.join(NODE_KEY), &mut report.created_node_key)?;

        let auth_path = dir.join(AUTHORITIES);
        let mut authorities = read_authorities(&auth_path)?;
        let mut authority = read_key(&dir.join(AUTHORITY_KEY))?.map(Authority::new);
        if found && authorities.is_empty() && authority.is_none() {
            // A fresh node with no mesh: found a local one.
            let a = Authority::new(Keypair::from_secret(random_secret()?));
            write_file(
                &dir.join(AUTHORITY_KEY),
                &format!("{}\n", hex::encode(a.key().secret_bytes())),
                true,
            )?;
            report.created_authority = true;
            authority = Some(a);
        }
        if let Some(a) = &authority
            && authorities.insert(a.id())
        {
            write_authorities(&auth_path, &authorities)?;
        }

        let mem_path = dir.join(MEMBERSHIP);
        let mut membership = read_membership(&mem_path)?
            .filter(|m| m.body.member == key.public() && m.verify(&authorities, now_ms).is_ok());
        if membership.is_none()
            && let Some(a) = &authority
        {
            let m = a.certify_member(MembershipBody {
                member: key.public(),
                issued_at_ms: now_ms.saturating_sub(CLOCK_SKEW_MS),
                expires_at_ms: now_ms + LOCAL_MEMBERSHIP_MS,
            });
            write_file(
                &mem_path,
                &format!(
                    "{}\n",
                    hex::encode(zavod_proto::wire::encode_unversioned(&m))
                ),
                false,
            )?;
            membership = Some(m);
        }

        // The mesh's actor-session secret: made by the authority's node,
        // handed to each node it admits.
        let secret_path = dir.join(SESSION_SECRET);
        let mut session_secret = read_key(&secret_path)?.map(|k| k.secret_bytes());
        if session_secret.is_none() && authority.is_some() {
            let s = random_secret()?;
            write_file(&secret_path, &format!("{}\n", hex::encode(s)), true)?;
            session_secret = Some(s);
        }

        if let Some(a) = &authority {
            let cred_path = dir.join(CLIENT_CRED);
            let has_cred = std::fs::metadata(&cred_path).is_ok();
            if !has_cred {
                let mut created = false;
                let client = load_or_create_key(&dir.join(CLIENT_KEY), &mut created)?;
                let cred = a.issue_credential(CredentialBody {
                    id: random_u128()?.to_le_bytes(),
                    holder: client.public(),
                    models: ModelPattern("*".into()),
                    token_budget: LOCAL_TOKEN_BUDGET,
                    rate_per_min: 0,
                    not_before_ms: now_ms.saturating_sub(60_000),
                    expires_at_ms: now_ms + LOCAL_CREDENTIAL_MS,
                });
                write_file(&cred_path, &format!("{}\n", cred.to_text()), true)?;
                report.created_client_credential = Some(cred_path);
            }
        }

        Ok((
            NodeIdentity {
                dir: dir.to_path_buf(),
                key,
                authorities,
                authority,
                membership,
                session_secret,
            },
            report,
        ))
    }

    pub fn id(&self) -> NodeId {
        self.key.public()
    }
}

fn read_authorities(path: &Path) -> Result<BTreeSet<NodeId>, DataDirError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            NodeId::from_hex(l).map_err(|e| DataDirError::Corrupt {
                path: path.display().to_string(),
                reason: format!("line {l:?}: {e}"),
            })
        })
        .collect()
}

fn write_authorities(path: &Path, a: &BTreeSet<NodeId>) -> Result<(), DataDirError> {
    let mut s = String::from("# Trusted mesh authorities (ed25519 public keys)\n");
    for id in a {
        s.push_str(&id.to_hex());
        s.push('\n');
    }
    write_file(path, &s, false)
}

fn read_membership(path: &Path) -> Result<Option<Membership>, DataDirError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let corrupt = |reason: String| DataDirError::Corrupt {
        path: path.display().to_string(),
        reason,
    };
    let bytes = hex::decode(text.trim()).map_err(|e| corrupt(e.to_string()))?;
    zavod_proto::wire::decode_unversioned(&bytes)
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

/// A client's key and credential, as `zavod chat` finds them.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub key: Keypair,
    pub credential: Credential,
}

impl ClientIdentity {
    /// Loads the client key from `dir` (creating one if missing) and the
    /// credential from `credential` (a file path or the credential text) or
    /// else from `dir/client.cred`.
    pub fn load(dir: &Path, credential: Option<&str>) -> Result<Self, DataDirError> {
        let cred_text = match credential {
            Some(c)
                if c.trim_start()
                    .starts_with(zavod_proto::trust::CREDENTIAL_TEXT_PREFIX)
                    || c.trim_start().starts_with(CAP_TEXT_PREFIX) =>
            {
                c.to_string()
            }
            Some(path) => std::fs::read_to_string(path).map_err(io_err(Path::new(path)))?,
            None => {
                let p = dir.join(CLIENT_CRED);
                match std::fs::read_to_string(&p) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(no_credential(dir));
                    }
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
        };
        let source = credential.unwrap_or("client.cred").to_string();
        if cred_text.trim_start().starts_with(CAP_TEXT_PREFIX) {
            // A capability token carries its own key.
            let token =
                CapabilityToken::from_text(&cred_text).map_err(|e| DataDirError::Corrupt {
                    path: source,
                    reason: e.to_string(),
                })?;
            return Ok(ClientIdentity {
                key: Keypair::from_secret(token.secret),
                credential: token.credential,
            });
        }
        let credential = Credential::from_text(&cred_text).map_err(|e| DataDirError::Corrupt {
            path: source,
            reason: e.to_string(),
        })?;
        create_private_dir(dir)?;
        let mut created = false;
        let key = load_or_create_key(&dir.join(CLIENT_KEY), &mut created)?;
        Ok(ClientIdentity { key, credential })
    }
}

/// What to do when `dir` holds no credential: a node that joined by invite
/// cannot issue one (only the authority can), so name the command to run
/// on the authority's machine, bound to this directory's client key.
fn no_credential(dir: &Path) -> DataDirError {
    let shown = dir.display().to_string();
    let member = dir.join(NODE_KEY).exists() && !dir.join(AUTHORITY_KEY).exists();
    let hint = if member {
        let mut created = false;
        let holder = create_private_dir(dir)
            .and_then(|()| load_or_create_key(&dir.join(CLIENT_KEY), &mut created))
            .map_or_else(|_| "<client key>".to_string(), |k| k.public().to_hex());
        format!(
            "this node joined its mesh by invite, and only the mesh's authority issues \
             credentials. On the authority's machine run `zavod cap issue --max-tokens 1000000 \
             --ttl 30d --holder {holder} --out client.cred`, copy that file to \
             {shown}/client.cred (or pass it with --credential). `zavod status` needs none \
             to read this node's own status: it signs with the node's key."
        )
    } else {
        "start `zavod node` with this data directory once (a new mesh's first node makes \
         its operator one), or pass --credential"
            .to_string()
    };
    DataDirError::NoCredential { dir: shown, hint }
}

/// The node's own key, when `dir` is a node's data directory: the operator's
/// proof for reading that node's status without a credential.
pub fn node_key(dir: &Path) -> Result<Option<Keypair>, DataDirError> {
    read_key(&dir.join(NODE_KEY))
}

/// The local user's client key in `dir`, created when missing.
pub fn client_key(dir: &Path) -> Result<Keypair, DataDirError> {
    create_private_dir(dir)?;
    let mut created = false;
    load_or_create_key(&dir.join(CLIENT_KEY), &mut created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_per_data_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("node");
        let held = lock_dir(&dir).expect("first lock");
        let e = lock_dir(&dir).expect_err("second lock").to_string();
        assert!(e.contains("another zavod node is running"), "{e}");
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "names the holder: {e}"
        );
        drop(held);
        lock_dir(&dir).expect("free again once released");
    }

    #[cfg(unix)]
    #[test]
    fn data_directories_are_private_and_files_are_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a/b");
        NodeIdentity::open(&dir, 0).expect("first start");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(NODE_KEY)), 0o600);
        let f = dir.join("listen-addrs-test");
        write_file(&f, "one\n", false).expect("write");
        write_file(&f, "two\n", false).expect("rewrite");
        assert_eq!(std::fs::read_to_string(&f).expect("read"), "two\n");
        assert_eq!(mode(&f), 0o644);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn first_start_creates_a_local_mesh_and_a_usable_credential() {
        let d = tempfile::tempdir().expect("tempdir");
        let (id, rep) = NodeIdentity::open(d.path(), 1_000_000).expect("open");
        assert!(rep.created_node_key && rep.created_authority);
        assert!(rep.created_client_credential.is_some());
        let m = id.membership.clone().expect("membership");
        assert!(m.verify(&id.authorities, 1_000_001).is_ok());

        let client = ClientIdentity::load(d.path(), None).expect("client");
        let body = client
            .credential
            .verify(
                &id.authorities,
                &client.key.public(),
                "any-model",
                1_000_001,
            )
            .expect("credential verifies");
        assert_eq!(body.models.0, "*");

        // A second start keeps everything.
        let (again, rep2) = NodeIdentity::open(d.path(), 2_000_000).expect("reopen");
        assert!(!rep2.created_node_key && !rep2.created_authority);
        assert!(rep2.created_client_credential.is_none());
        assert_eq!(again.id(), id.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.path().join(NODE_KEY))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "secrets are private");
        }
    }

    #[test]
    fn corrupt_files_and_missing_credentials_are_named() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join(NODE_KEY), "nothex").expect("write");
        let e = NodeIdentity::open(d.path(), 0).expect_err("corrupt");
        assert!(e.to_string().contains("node.key"), "{e}");

        let empty = tempfile::tempdir().expect("tempdir");
        let e = ClientIdentity::load(empty.path(), None).expect_err("none");
        assert!(e.to_string().contains("--credential"), "{e}");
        let e = ClientIdentity::load(empty.path(), Some("zavod-cred-1.garbage")).expect_err("bad");
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
