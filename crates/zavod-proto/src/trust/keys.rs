//! Keys and signed documents: ed25519 key pairs, the domain-tagged
//! signature every document carries, validity windows, and the one-line
//! text form of documents. Verification returns an [`AuthError`] naming
//! what is wrong; nothing here panics on hostile input.

use super::*;

pub(crate) const DOMAIN_CREDENTIAL: &[u8] = b"zavod/credential/v1\0";
pub(crate) const DOMAIN_MEMBERSHIP: &[u8] = b"zavod/membership/v1\0";
pub(crate) const DOMAIN_GRANT: &[u8] = b"zavod/grant/v1\0";
pub(crate) const DOMAIN_CAPACITY: &[u8] = b"zavod/capacity/v1\0";
pub(crate) const DOMAIN_JOIN: &[u8] = b"zavod/join/v1\0";
pub(crate) const DOMAIN_RECEIPT: &[u8] = b"zavod/receipt/v1\0";
pub(crate) const DOMAIN_OPERATOR: &[u8] = b"zavod/operator/v1\0";
pub(crate) const DOMAIN_REVOCATION: &[u8] = b"zavod/revocation/v1\0";

/// How long an operator proof may be valid at most, from its start to its
/// end: long enough for clock skew between the command and its node, short
/// enough that a captured proof is soon worthless.
pub const MAX_OPERATOR_PROOF_MS: u64 = 10 * 60 * 1000;

/// Prefix of an invite's one-line text form.
pub const JOIN_TEXT_PREFIX: &str = "zavod-join-1.";
/// Prefix of a capability token: a credential together with its holder's
/// secret key, so one line of text is all a client needs.
pub const CAP_TEXT_PREFIX: &str = "zavod-cap-1.";

/// Prefix of a credential's one-line text form.
pub const CREDENTIAL_TEXT_PREFIX: &str = "zavod-cred-1.";
/// Largest credential text accepted when parsing.
pub(crate) const MAX_CREDENTIAL_TEXT_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("signature does not verify")]
    BadSignature,
    #[error("signer key is not a valid ed25519 public key")]
    BadKey,
    #[error("{what} was issued by {issuer}, which is not a trusted authority of this mesh")]
    UntrustedIssuer { what: &'static str, issuer: String },
    #[error("{what} is not valid until {not_before_ms} (now {now_ms})")]
    NotYetValid {
        what: &'static str,
        not_before_ms: UnixMs,
        now_ms: UnixMs,
    },
    #[error("{what} expired at {expires_at_ms} (now {now_ms})")]
    Expired {
        what: &'static str,
        expires_at_ms: UnixMs,
        now_ms: UnixMs,
    },
    #[error("credential belongs to key {holder}, but the request came from {presenter}")]
    WrongHolder { holder: String, presenter: String },
    #[error("credential allows models matching {pattern:?}, not {model:?}")]
    ModelNotAllowed { pattern: String, model: String },
    #[error("grant is for node {target}, not this node {this}")]
    WrongTarget { target: String, this: String },
    #[error("grant was issued by {issuer}, which is not a member of this mesh")]
    IssuerNotMember { issuer: String },
    #[error("grant {0} was already used")]
    Replayed(RequestId),
    #[error("grant does not match the request ({0} differs)")]
    GrantMismatch(&'static str),
    #[error("credential token budget is spent ({used} of {budget} tokens used)")]
    BudgetExhausted { used: u64, budget: u64 },
    #[error(
        "credential rate limit of {rate_per_min} requests per minute reached; retry in {retry_after_ms} ms"
    )]
    RateLimited {
        rate_per_min: u32,
        retry_after_ms: u64,
    },
    #[error("malformed credential text: {0}")]
    MalformedText(String),
    #[error("operator proof is signed by node {signer}, not by this node {this}")]
    NotThisNode { signer: String, this: String },
    #[error("operator proof is valid for {span_ms} ms, more than the {max_ms} ms allowed")]
    ProofTooLong { span_ms: u64, max_ms: u64 },
}

/// An ed25519 signing key of a node, a client or an authority.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair({:?})", self.public())
    }
}

impl Keypair {
    /// Builds a key from 32 secret bytes. The caller draws them from the OS
    /// RNG (or a seeded one in simulation); this crate never does.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Keypair(SigningKey::from_bytes(&secret))
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    pub(crate) fn sign_doc<T: Serialize + Clone>(&self, domain: &[u8], body: &T) -> Signed<T> {
        let msg = signing_bytes(domain, body);
        let sig = self.0.sign(&msg);
        Signed {
            body: body.clone(),
            signer: self.public(),
            signature: sig.to_bytes().to_vec(),
        }
    }
}

pub(crate) fn signing_bytes<T: Serialize>(domain: &[u8], body: &T) -> Vec<u8> {
    let mut msg = domain.to_vec();
    // Invariant: the signed bodies are owned plain data (no maps, no custom
    // serializers) and the config has no size limit, so encoding into a Vec
    // cannot fail.
    #[allow(clippy::expect_used)]
    let bytes = bincode::serde::encode_to_vec(body, bincode::config::standard())
        .expect("plain-data bodies always encode");
    msg.extend_from_slice(&bytes);
    msg
}

/// A body with the key that signed it and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub body: T,
    pub signer: NodeId,
    pub signature: Vec<u8>,
}

impl<T: Serialize> Signed<T> {
    pub(crate) fn verify_signature(&self, domain: &[u8]) -> Result<(), AuthError> {
        let key = VerifyingKey::from_bytes(&self.signer.0).map_err(|_| AuthError::BadKey)?;
        let sig_bytes: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| AuthError::BadSignature)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig_bytes);
        key.verify_strict(&signing_bytes(domain, &self.body), &sig)
            .map_err(|_| AuthError::BadSignature)
    }
}

pub(crate) fn check_window(
    what: &'static str,
    not_before_ms: UnixMs,
    expires_at_ms: UnixMs,
    now_ms: UnixMs,
) -> Result<(), AuthError> {
    if now_ms < not_before_ms {
        return Err(AuthError::NotYetValid {
            what,
            not_before_ms,
            now_ms,
        });
    }
    if now_ms >= expires_at_ms {
        return Err(AuthError::Expired {
            what,
            expires_at_ms,
            now_ms,
        });
    }
    Ok(())
}

pub(crate) fn text_encode<T: Serialize>(prefix: &str, v: &T) -> String {
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::wire::encode_unversioned(v))
    )
}

pub(crate) fn text_decode<T: serde::de::DeserializeOwned>(
    prefix: &str,
    text: &str,
) -> Result<T, AuthError> {
    let text = text.trim();
    if text.len() > MAX_CREDENTIAL_TEXT_BYTES {
        return Err(AuthError::MalformedText(format!(
            "longer than {MAX_CREDENTIAL_TEXT_BYTES} bytes"
        )));
    }
    let b64 = text
        .strip_prefix(prefix)
        .ok_or_else(|| AuthError::MalformedText(format!("does not start with {prefix:?}")))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| AuthError::MalformedText(format!("bad base64: {e}")))?;
    crate::wire::decode_unversioned(&bytes).map_err(|e| AuthError::MalformedText(e.to_string()))
}
