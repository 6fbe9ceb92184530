//! Revocations: the authority's signed word that a node is no longer a
//! member, or that a credential is no longer honoured, and the set of them
//! every node keeps.
//!
//! Invariants: a revocation in a [`Revocations`] set was signed by a
//! trusted authority; the set only grows (nothing un-revokes) up to
//! [`MAX_REVOCATIONS`]; two sets holding the same revocations have the same
//! [`RevocationDigest`], whatever order they learned them in, which is how
//! nodes tell, from each other's capacity reports, that they differ.

use super::*;
use crate::limits::MAX_REVOCATIONS;

/// Prefix of a revocation's one-line text form.
pub const REVOCATION_TEXT_PREFIX: &str = "zavod-revoke-1.";

/// What is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Revoked {
    /// A node: it is no longer routed to, its grants and announcements are
    /// refused and its connections closed, and no membership is signed
    /// for it again.
    Node(NodeId),
    /// A credential, by its id: every entry refuses it.
    Credential([u8; 16]),
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Revoked::Node(n) => write!(f, "node {}", n.short()),
            Revoked::Credential(id) => write!(f, "credential {}", hex16(id)),
        }
    }
}

/// A credential id as 32 hex digits, as `zavod cap issue` prints it.
pub fn hex16(id: &[u8; 16]) -> String {
    hex::encode(id)
}

/// A credential id from 32 hex digits.
pub fn parse_hex16(text: &str) -> Option<[u8; 16]> {
    hex::decode(text).ok()?.try_into().ok()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    pub subject: Revoked,
    pub issued_at_ms: UnixMs,
}

pub type Revocation = Signed<RevocationBody>;

impl Authority {
    pub fn revoke(&self, subject: Revoked, now_ms: UnixMs) -> Revocation {
        self.key.sign_doc(
            DOMAIN_REVOCATION,
            &RevocationBody {
                subject,
                issued_at_ms: now_ms,
            },
        )
    }
}

impl Revocation {
    /// Checks the signature and that a trusted authority signed it. A
    /// revocation has no expiry: what it revokes stays revoked.
    pub fn verify(&self, authorities: &BTreeSet<NodeId>) -> Result<&RevocationBody, AuthError> {
        self.verify_signature(DOMAIN_REVOCATION)?;
        if !authorities.contains(&self.signer) {
            return Err(AuthError::UntrustedIssuer {
                what: "revocation",
                issuer: self.signer.short(),
            });
        }
        Ok(&self.body)
    }

    pub fn to_text(&self) -> String {
        text_encode(REVOCATION_TEXT_PREFIX, self)
    }

    pub fn from_text(text: &str) -> Result<Self, AuthError> {
        text_decode(REVOCATION_TEXT_PREFIX, text)
    }
}

/// Which revocations a node holds, in a few bytes: it rides in every
/// capacity report, so a node that sees a member with a digest other than
/// its own asks that member for its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RevocationDigest {
    pub count: u32,
    /// The first 8 bytes of the sha256 of the sorted subjects; 0 when the
    /// set is empty.
    pub hash: u64,
}

impl RevocationDigest {
    /// Whether a node whose set has this digest should ask a member
    /// announcing `theirs` for its list: when theirs holds more, or as many
    /// but others (then each asks the other). A member holding fewer asks
    /// us instead, so each difference costs one request, not two.
    pub fn should_fetch_from(&self, theirs: &RevocationDigest) -> bool {
        theirs.count > self.count || (theirs.count == self.count && theirs.hash != self.hash)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation refused: {0}")]
    Auth(#[from] AuthError),
    #[error(
        "the mesh already holds {MAX_REVOCATIONS} revocations, the most it keeps; \
         revoke the authority's whole mesh by creating a new one"
    )]
    Full,
}

/// The revocations a node knows, by subject.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    by_subject: BTreeMap<Revoked, Revocation>,
    digest: RevocationDigest,
}

impl Revocations {
    /// Adds a revocation after checking it; `Ok(true)` when it was new.
    pub fn insert(
        &mut self,
        r: Revocation,
        authorities: &BTreeSet<NodeId>,
    ) -> Result<bool, RevocationError> {
        let subject = r.verify(authorities)?.subject;
        if self.by_subject.contains_key(&subject) {
            return Ok(false);
        }
        if self.by_subject.len() >= MAX_REVOCATIONS {
            return Err(RevocationError::Full);
        }
        self.by_subject.insert(subject, r);
        self.digest = self.compute_digest();
        Ok(true)
    }

    pub fn node_revoked(&self, node: &NodeId) -> bool {
        self.by_subject.contains_key(&Revoked::Node(*node))
    }

    pub fn credential_revoked(&self, id: &[u8; 16]) -> bool {
        self.by_subject.contains_key(&Revoked::Credential(*id))
    }

    pub fn digest(&self) -> RevocationDigest {
        self.digest
    }

    pub fn len(&self) -> usize {
        self.by_subject.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_subject.is_empty()
    }

    /// Every revocation, in subject order.
    pub fn iter(&self) -> impl Iterator<Item = &Revocation> {
        self.by_subject.values()
    }

    fn compute_digest(&self) -> RevocationDigest {
        if self.by_subject.is_empty() {
            return RevocationDigest::default();
        }
        let mut h = Sha256::new();
        for s in self.by_subject.keys() {
            match s {
                Revoked::Node(n) => {
                    h.update([0u8]);
                    h.update(n.0);
                }
                Revoked::Credential(id) => {
                    h.update([1u8]);
                    h.update(id);
                }
            }
        }
        let d: [u8; 32] = h.finalize().into();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        RevocationDigest {
            // At most MAX_REVOCATIONS, far below u32::MAX.
            count: u32::try_from(self.by_subject.len()).unwrap_or(u32::MAX),
            hash: u64::from_le_bytes(first),
        }
    }
}
