//! Trust: keys, signed documents, capability credentials, membership
//! certificates and per-request grants, all on ed25519.
//!
//! Every signature covers a domain tag and the canonical bincode encoding of
//! the signed body, so a signature over one kind of document never verifies
//! as another kind. Verification is total: it returns an [`AuthError`] that
//! names what is wrong and never panics on hostile input.
//!
//! The ledgers here ([`ReplayGuard`], [`UsageLedger`]) are bounded maps keyed
//! by ids and fed `now`; they hold the only mutable trust state of a node.

use crate::UnixMs;
use crate::ids::{NodeId, RequestId};
use crate::limits::{MAX_REMEMBERED_GRANTS, MAX_TRACKED_CREDENTIALS};
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

const DOMAIN_CREDENTIAL: &[u8] = b"zavod/credential/v1\0";
const DOMAIN_MEMBERSHIP: &[u8] = b"zavod/membership/v1\0";
const DOMAIN_GRANT: &[u8] = b"zavod/grant/v1\0";
const DOMAIN_CAPACITY: &[u8] = b"zavod/capacity/v1\0";
const DOMAIN_JOIN: &[u8] = b"zavod/join/v1\0";
const DOMAIN_RECEIPT: &[u8] = b"zavod/receipt/v1\0";
const DOMAIN_OPERATOR: &[u8] = b"zavod/operator/v1\0";

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
const MAX_CREDENTIAL_TEXT_BYTES: usize = 8 * 1024;

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

    fn sign_doc<T: Serialize + Clone>(&self, domain: &[u8], body: &T) -> Signed<T> {
        let msg = signing_bytes(domain, body);
        let sig = self.0.sign(&msg);
        Signed {
            body: body.clone(),
            signer: self.public(),
            signature: sig.to_bytes().to_vec(),
        }
    }
}

fn signing_bytes<T: Serialize>(domain: &[u8], body: &T) -> Vec<u8> {
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
    fn verify_signature(&self, domain: &[u8]) -> Result<(), AuthError> {
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

fn check_window(
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

/// Which models a credential allows: a pattern where `*` matches any run of
/// characters (`*`, `gemma-*`, `*-270m-*`, or an exact name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPattern(pub String);

impl ModelPattern {
    pub fn matches(&self, model: &str) -> bool {
        wildcard_match(self.0.as_bytes(), model.as_bytes())
    }
}

/// Iterative `*`-only glob with backtracking to the last star: linear in
/// practice and never recursive, so hostile patterns cannot blow the stack.
fn wildcard_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pat.len() && pat[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// What a client may do: signed by a mesh authority, bound to the client's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialBody {
    /// Unique id, for usage accounting and revocation.
    pub id: [u8; 16],
    /// The key allowed to present this credential.
    pub holder: NodeId,
    pub models: ModelPattern,
    /// Total tokens this credential may have generated over its life.
    pub token_budget: u64,
    /// Requests per minute; 0 means no rate limit.
    pub rate_per_min: u32,
    pub not_before_ms: UnixMs,
    pub expires_at_ms: UnixMs,
}

pub type Credential = Signed<CredentialBody>;

/// Everything a mesh authority signs with its key.
#[derive(Debug, Clone)]
pub struct Authority {
    key: Keypair,
}

impl Authority {
    pub fn new(key: Keypair) -> Self {
        Authority { key }
    }

    pub fn id(&self) -> NodeId {
        self.key.public()
    }

    pub fn key(&self) -> &Keypair {
        &self.key
    }

    pub fn issue_credential(&self, body: CredentialBody) -> Credential {
        self.key.sign_doc(DOMAIN_CREDENTIAL, &body)
    }

    pub fn certify_member(&self, body: MembershipBody) -> Membership {
        self.key.sign_doc(DOMAIN_MEMBERSHIP, &body)
    }
}

impl Credential {
    /// Checks signature, issuer, validity window, holder binding and model
    /// scope. Budget and rate are checked by [`UsageLedger`].
    pub fn verify(
        &self,
        authorities: &BTreeSet<NodeId>,
        presenter: &NodeId,
        model: &str,
        now_ms: UnixMs,
    ) -> Result<&CredentialBody, AuthError> {
        let b = self.verify_holder(authorities, presenter, now_ms)?;
        if !b.models.matches(model) {
            return Err(AuthError::ModelNotAllowed {
                pattern: b.models.0.clone(),
                model: model.to_owned(),
            });
        }
        Ok(b)
    }

    /// Everything [`Credential::verify`] checks except the model scope (for
    /// requests that name no model, such as status).
    pub fn verify_holder(
        &self,
        authorities: &BTreeSet<NodeId>,
        presenter: &NodeId,
        now_ms: UnixMs,
    ) -> Result<&CredentialBody, AuthError> {
        self.verify_signature(DOMAIN_CREDENTIAL)?;
        if !authorities.contains(&self.signer) {
            return Err(AuthError::UntrustedIssuer {
                what: "credential",
                issuer: self.signer.short(),
            });
        }
        let b = &self.body;
        check_window("credential", b.not_before_ms, b.expires_at_ms, now_ms)?;
        if b.holder != *presenter {
            return Err(AuthError::WrongHolder {
                holder: b.holder.short(),
                presenter: presenter.short(),
            });
        }
        Ok(b)
    }

    /// One line of text: a prefix and the signed credential in URL-safe base64.
    pub fn to_text(&self) -> String {
        let bytes = crate::wire::encode_unversioned(self);
        format!(
            "{CREDENTIAL_TEXT_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    pub fn from_text(text: &str) -> Result<Self, AuthError> {
        let text = text.trim();
        if text.len() > MAX_CREDENTIAL_TEXT_BYTES {
            return Err(AuthError::MalformedText(format!(
                "longer than {MAX_CREDENTIAL_TEXT_BYTES} bytes"
            )));
        }
        let b64 = text.strip_prefix(CREDENTIAL_TEXT_PREFIX).ok_or_else(|| {
            AuthError::MalformedText(format!("does not start with {CREDENTIAL_TEXT_PREFIX:?}"))
        })?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|e| AuthError::MalformedText(format!("bad base64: {e}")))?;
        crate::wire::decode_unversioned(&bytes).map_err(|e| AuthError::MalformedText(e.to_string()))
    }
}

/// What an operator proof says: the key `client` acts for the node that
/// signed it, between the two times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorBody {
    pub client: NodeId,
    pub not_before_ms: UnixMs,
    pub expires_at_ms: UnixMs,
}

/// Proof that whoever opened a stream holds a node's own key, so the
/// operator of any node (a member that joined by invite has no credential
/// of its own) can read that node's status. It is bound to the key of the
/// connection that presents it and lives minutes, so a captured proof is
/// of no use to another key or later; a node accepts only proofs it signed
/// itself.
pub type OperatorProof = Signed<OperatorBody>;

impl OperatorProof {
    /// Signs, with the node's key, a proof for `client` valid from a minute
    /// ago (clocks differ) to five minutes from now.
    pub fn issue(node_key: &Keypair, client: NodeId, now_ms: UnixMs) -> Self {
        node_key.sign_doc(
            DOMAIN_OPERATOR,
            &OperatorBody {
                client,
                not_before_ms: now_ms.saturating_sub(60_000),
                expires_at_ms: now_ms.saturating_add(5 * 60_000),
            },
        )
    }

    /// Checks that `this` node signed the proof for the `presenter` key and
    /// that it is valid now and not for longer than allowed.
    pub fn verify(
        &self,
        this: &NodeId,
        presenter: &NodeId,
        now_ms: UnixMs,
    ) -> Result<(), AuthError> {
        self.verify_signature(DOMAIN_OPERATOR)?;
        if self.signer != *this {
            return Err(AuthError::NotThisNode {
                signer: self.signer.short(),
                this: this.short(),
            });
        }
        let b = &self.body;
        let span_ms = b.expires_at_ms.saturating_sub(b.not_before_ms);
        if span_ms > MAX_OPERATOR_PROOF_MS {
            return Err(AuthError::ProofTooLong {
                span_ms,
                max_ms: MAX_OPERATOR_PROOF_MS,
            });
        }
        check_window("operator proof", b.not_before_ms, b.expires_at_ms, now_ms)?;
        if b.client != *presenter {
            return Err(AuthError::WrongHolder {
                holder: b.client.short(),
                presenter: presenter.short(),
            });
        }
        Ok(())
    }
}

/// A node's membership of a mesh, signed by the mesh authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipBody {
    pub member: NodeId,
    pub issued_at_ms: UnixMs,
    pub expires_at_ms: UnixMs,
}

pub type Membership = Signed<MembershipBody>;

impl Membership {
    pub fn verify(
        &self,
        authorities: &BTreeSet<NodeId>,
        now_ms: UnixMs,
    ) -> Result<&MembershipBody, AuthError> {
        self.verify_signature(DOMAIN_MEMBERSHIP)?;
        if !authorities.contains(&self.signer) {
            return Err(AuthError::UntrustedIssuer {
                what: "membership certificate",
                issuer: self.signer.short(),
            });
        }
        check_window(
            "membership certificate",
            self.body.issued_at_ms,
            self.body.expires_at_ms,
            now_ms,
        )?;
        Ok(&self.body)
    }
}

/// Permission for one request to run on one node, signed by the entry node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantBody {
    pub request: RequestId,
    pub client: NodeId,
    pub target: NodeId,
    pub model: String,
    pub max_tokens: u32,
    pub expires_at_ms: UnixMs,
    /// sha256 of the assembled prompt, so the grant cannot be reused for
    /// another prompt.
    pub prompt_hash: [u8; 32],
    /// Whose prompt cache the request may reuse and extend: the id of the
    /// credential it is charged to. The target keeps each scope's cached
    /// prompts apart unless its operator lets identical prefixes be shared.
    pub cache_scope: [u8; 16],
}

pub type Grant = Signed<GrantBody>;

/// The sha256 of a text (answers in receipts).
pub fn prompt_hash(prompt: &str) -> [u8; 32] {
    prompt_hash_bytes(prompt.as_bytes())
}

pub fn prompt_hash_bytes(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A capacity report signed by the node it describes.
pub type SignedReport = Signed<crate::capacity::CapacityReport>;

pub fn sign_report(key: &Keypair, report: crate::capacity::CapacityReport) -> SignedReport {
    key.sign_doc(DOMAIN_CAPACITY, &report)
}

impl SignedReport {
    /// Checks the signature and that the signer is the node described.
    pub fn verify(&self) -> Result<&crate::capacity::CapacityReport, AuthError> {
        self.verify_signature(DOMAIN_CAPACITY)?;
        if self.body.node != self.signer {
            return Err(AuthError::GrantMismatch("report signer"));
        }
        Ok(&self.body)
    }
}

/// An invite to a mesh, signed by its authority: where to connect and the
/// right to have a membership certificate signed there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTicketBody {
    pub id: [u8; 16],
    pub expires_at_ms: UnixMs,
    /// Multiaddrs of nodes that can sign memberships.
    pub bootstrap: Vec<String>,
    /// How long memberships signed for this ticket last.
    pub membership_ttl_ms: u64,
}

pub type JoinTicket = Signed<JoinTicketBody>;

impl Authority {
    pub fn invite(&self, body: JoinTicketBody) -> JoinTicket {
        self.key.sign_doc(DOMAIN_JOIN, &body)
    }
}

impl JoinTicket {
    /// Checks the ticket's own signature and expiry. Whether its signer is
    /// trusted is for the caller: the joining node trusts the mesh named by
    /// the invite it was given; the signing node checks its own authority.
    pub fn verify(&self, now_ms: UnixMs) -> Result<&JoinTicketBody, AuthError> {
        self.verify_signature(DOMAIN_JOIN)?;
        check_window("invite", 0, self.body.expires_at_ms, now_ms)?;
        Ok(&self.body)
    }

    pub fn to_text(&self) -> String {
        text_encode(JOIN_TEXT_PREFIX, self)
    }

    pub fn from_text(text: &str) -> Result<Self, AuthError> {
        text_decode(JOIN_TEXT_PREFIX, text)
    }
}

fn text_encode<T: Serialize>(prefix: &str, v: &T) -> String {
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::wire::encode_unversioned(v))
    )
}

fn text_decode<T: serde::de::DeserializeOwned>(prefix: &str, text: &str) -> Result<T, AuthError> {
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

/// A credential with its holder's secret key, as one line of text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityToken {
    pub secret: [u8; 32],
    pub credential: Credential,
}

impl CapabilityToken {
    pub fn to_text(&self) -> String {
        text_encode(CAP_TEXT_PREFIX, self)
    }

    /// Parses and checks that the key is the credential's holder.
    pub fn from_text(text: &str) -> Result<Self, AuthError> {
        let t: CapabilityToken = text_decode(CAP_TEXT_PREFIX, text)?;
        if Keypair::from_secret(t.secret).public() != t.credential.body.holder {
            return Err(AuthError::MalformedText(
                "the key in the token is not the credential's holder".into(),
            ));
        }
        Ok(t)
    }
}

/// What the serving node signs when a request ends: how many tokens it
/// generated and a hash of the text, so the entry node can record the turn
/// and charge the credential on the serving node's word, not the client's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBody {
    pub request: RequestId,
    pub client: NodeId,
    pub generated_tokens: u32,
    pub answer_hash: [u8; 32],
}

pub type Receipt = Signed<ReceiptBody>;

pub fn sign_receipt(key: &Keypair, body: ReceiptBody) -> Receipt {
    key.sign_doc(DOMAIN_RECEIPT, &body)
}

impl Receipt {
    /// Checks the signature, that `target` signed it, and that it is for
    /// `request` and `answer`.
    pub fn verify(
        &self,
        target: &NodeId,
        request: RequestId,
        answer: &str,
    ) -> Result<&ReceiptBody, AuthError> {
        self.verify_signature(DOMAIN_RECEIPT)?;
        if self.signer != *target {
            return Err(AuthError::GrantMismatch("receipt signer"));
        }
        if self.body.request != request {
            return Err(AuthError::GrantMismatch("receipt request"));
        }
        if self.body.answer_hash != prompt_hash(answer) {
            return Err(AuthError::GrantMismatch("receipt answer"));
        }
        Ok(&self.body)
    }
}

/// Mints grants with a node's key.
pub fn mint_grant(entry_key: &Keypair, body: GrantBody) -> Grant {
    entry_key.sign_doc(DOMAIN_GRANT, &body)
}

/// What the target checks a grant against.
#[derive(Debug, Clone)]
pub struct GrantCheck<'a> {
    pub this_node: &'a NodeId,
    pub client: &'a NodeId,
    pub model: &'a str,
    /// Hash of the prompt the request carries.
    pub prompt_hash: [u8; 32],
    pub max_tokens: u32,
}

impl Grant {
    /// Verifies signature, issuer membership, expiry and binding; the
    /// single-use rule is enforced by [`ReplayGuard::admit`].
    pub fn verify(
        &self,
        is_member: impl Fn(&NodeId) -> bool,
        check: &GrantCheck<'_>,
        now_ms: UnixMs,
    ) -> Result<&GrantBody, AuthError> {
        self.verify_signature(DOMAIN_GRANT)?;
        if !is_member(&self.signer) {
            return Err(AuthError::IssuerNotMember {
                issuer: self.signer.short(),
            });
        }
        let b = &self.body;
        check_window("grant", 0, b.expires_at_ms, now_ms)?;
        if b.target != *check.this_node {
            return Err(AuthError::WrongTarget {
                target: b.target.short(),
                this: check.this_node.short(),
            });
        }
        if b.client != *check.client {
            return Err(AuthError::GrantMismatch("client"));
        }
        if b.model != check.model {
            return Err(AuthError::GrantMismatch("model"));
        }
        if b.prompt_hash != check.prompt_hash {
            return Err(AuthError::GrantMismatch("prompt or generation parameters"));
        }
        if check.max_tokens > b.max_tokens {
            return Err(AuthError::GrantMismatch("max_tokens"));
        }
        Ok(b)
    }
}

/// Remembers used grant ids until they expire, so each grant runs once.
/// Bounded: when full, the entries closest to expiry are dropped first, and
/// grants whose expiry is older than the oldest dropped entry are refused, so
/// forgetting never re-opens a replay window.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    by_id: BTreeMap<RequestId, UnixMs>,
    by_expiry: BTreeSet<(UnixMs, RequestId)>,
    /// Grants expiring at or before this were forgotten; refuse them.
    floor_ms: UnixMs,
}

impl ReplayGuard {
    pub fn admit(&mut self, grant: &GrantBody, now_ms: UnixMs) -> Result<(), AuthError> {
        self.prune(now_ms);
        if self.by_id.contains_key(&grant.request) || grant.expires_at_ms <= self.floor_ms {
            return Err(AuthError::Replayed(grant.request));
        }
        if self.by_id.len() >= MAX_REMEMBERED_GRANTS
            && let Some(first) = self.by_expiry.pop_first()
        {
            self.by_id.remove(&first.1);
            self.floor_ms = self.floor_ms.max(first.0);
        }
        self.by_id.insert(grant.request, grant.expires_at_ms);
        self.by_expiry.insert((grant.expires_at_ms, grant.request));
        Ok(())
    }

    fn prune(&mut self, now_ms: UnixMs) {
        while let Some(&(exp, id)) = self.by_expiry.first() {
            if exp > now_ms {
                break;
            }
            self.by_expiry.pop_first();
            self.by_id.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Units of the rate bucket: one request costs `MS_PER_MIN` units and the
/// bucket gains `rate_per_min` units per millisecond, all in integers.
const MS_PER_MIN: u64 = 60_000;

#[derive(Debug, Clone)]
struct Usage {
    tokens_used: u64,
    reserved: u64,
    bucket_units: u64,
    bucket_at_ms: UnixMs,
    expires_at_ms: UnixMs,
}

/// Token budget and request rate per credential. The entry node reserves the
/// request's token ceiling on admission and settles the real count when the
/// request ends, so concurrent requests cannot overspend a budget.
#[derive(Debug, Default)]
pub struct UsageLedger {
    by_credential: BTreeMap<[u8; 16], Usage>,
}

impl UsageLedger {
    /// Admits one request asking for up to `want_tokens`; returns how many
    /// tokens it may generate (clamped to what is left of the budget).
    pub fn admit(
        &mut self,
        cred: &CredentialBody,
        want_tokens: u32,
        now_ms: UnixMs,
    ) -> Result<u32, AuthError> {
        if !self.by_credential.contains_key(&cred.id)
            && self.by_credential.len() >= MAX_TRACKED_CREDENTIALS
        {
            self.evict(now_ms);
        }
        let rate = u64::from(cred.rate_per_min);
        let u = self.by_credential.entry(cred.id).or_insert(Usage {
            tokens_used: 0,
            reserved: 0,
            bucket_units: rate * MS_PER_MIN,
            bucket_at_ms: now_ms,
            expires_at_ms: cred.expires_at_ms,
        });
        let committed = u.tokens_used + u.reserved;
        if committed >= cred.token_budget {
            return Err(AuthError::BudgetExhausted {
                used: u.tokens_used,
                budget: cred.token_budget,
            });
        }
        if rate > 0 {
            let elapsed = now_ms.saturating_sub(u.bucket_at_ms);
            u.bucket_units = (u.bucket_units + elapsed.saturating_mul(rate)).min(rate * MS_PER_MIN);
            u.bucket_at_ms = now_ms.max(u.bucket_at_ms);
            if u.bucket_units < MS_PER_MIN {
                let retry_after_ms = (MS_PER_MIN - u.bucket_units).div_ceil(rate);
                return Err(AuthError::RateLimited {
                    rate_per_min: cred.rate_per_min,
                    retry_after_ms,
                });
            }
            u.bucket_units -= MS_PER_MIN;
        }
        let left = cred.token_budget - committed;
        let allowed = u64::from(want_tokens).min(left);
        u.reserved += allowed;
        // `allowed` is at most `want_tokens`, a u32.
        Ok(u32::try_from(allowed).unwrap_or(want_tokens))
    }

    /// Ends a request admitted with `reserved` tokens that generated `used`.
    pub fn settle(&mut self, cred_id: &[u8; 16], reserved: u32, used: u32) {
        if let Some(u) = self.by_credential.get_mut(cred_id) {
            u.reserved = u.reserved.saturating_sub(u64::from(reserved));
            u.tokens_used = u.tokens_used.saturating_add(u64::from(used.min(reserved)));
        }
    }

    /// Charges tokens a request's reservation did not cover: what a target
    /// the client left mid-answer generated beyond what the client said it
    /// had (known only from that target's later report).
    pub fn charge(&mut self, cred_id: &[u8; 16], tokens: u32) {
        if let Some(u) = self.by_credential.get_mut(cred_id) {
            u.tokens_used = u.tokens_used.saturating_add(u64::from(tokens));
        }
    }

    pub fn tokens_used(&self, cred_id: &[u8; 16]) -> u64 {
        self.by_credential.get(cred_id).map_or(0, |u| u.tokens_used)
    }

    fn evict(&mut self, now_ms: UnixMs) {
        self.by_credential
            .retain(|_, u| u.expires_at_ms > now_ms || u.reserved > 0);
        if self.by_credential.len() >= MAX_TRACKED_CREDENTIALS {
            // Drop the idle entry that expires first; a credential forgotten
            // this way restarts its budget, which is the price of the bound.
            let victim = self
                .by_credential
                .iter()
                .filter(|(_, u)| u.reserved == 0)
                .min_by_key(|(_, u)| u.expires_at_ms)
                .map(|(k, _)| *k);
            if let Some(k) = victim {
                self.by_credential.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Keypair {
        Keypair::from_secret([n; 32])
    }

    fn cred_body(holder: NodeId) -> CredentialBody {
        CredentialBody {
            id: [9; 16],
            holder,
            models: ModelPattern("gemma-*".into()),
            token_budget: 1000,
            rate_per_min: 0,
            not_before_ms: 100,
            expires_at_ms: 10_000,
        }
    }

    fn authorities(a: &Authority) -> BTreeSet<NodeId> {
        [a.id()].into_iter().collect()
    }

    #[test]
    fn operator_proofs_bind_the_node_the_client_and_the_time() {
        let (node, other_node, client, thief) = (key(1), key(2), key(3), key(4));
        let now = 1_000_000;
        let p = OperatorProof::issue(&node, client.public(), now);
        assert!(p.verify(&node.public(), &client.public(), now).is_ok());
        // Another node's operator cannot read this node's status.
        assert!(matches!(
            p.verify(&other_node.public(), &client.public(), now),
            Err(AuthError::NotThisNode { .. })
        ));
        // A proof seen on the wire is no use to another key.
        assert!(matches!(
            p.verify(&node.public(), &thief.public(), now),
            Err(AuthError::WrongHolder { .. })
        ));
        assert!(matches!(
            p.verify(&node.public(), &client.public(), now + 6 * 60_000),
            Err(AuthError::Expired { .. })
        ));
        // A proof made to last longer than allowed is refused, even signed.
        let long = node.sign_doc(
            DOMAIN_OPERATOR,
            &OperatorBody {
                client: client.public(),
                not_before_ms: 0,
                expires_at_ms: u64::MAX,
            },
        );
        assert!(matches!(
            long.verify(&node.public(), &client.public(), now),
            Err(AuthError::ProofTooLong { .. })
        ));
        // Tampering breaks the signature.
        let mut bent = p.clone();
        bent.body.client = thief.public();
        assert!(matches!(
            bent.verify(&node.public(), &thief.public(), now),
            Err(AuthError::BadSignature)
        ));
    }

    #[test]
    fn credential_verifies_and_round_trips_as_text() {
        let auth = Authority::new(key(1));
        let client = key(2).public();
        let cred = auth.issue_credential(cred_body(client));
        let text = cred.to_text();
        assert!(text.starts_with(CREDENTIAL_TEXT_PREFIX));
        assert!(!text.contains(char::is_whitespace));
        let back = Credential::from_text(&text).expect("parses");
        assert_eq!(back, cred);
        let body = back
            .verify(&authorities(&auth), &client, "gemma-3-270m", 500)
            .expect("valid");
        assert_eq!(body.token_budget, 1000);
    }

    #[test]
    fn credential_refusals_name_the_reason() {
        let auth = Authority::new(key(1));
        let client = key(2).public();
        let cred = auth.issue_credential(cred_body(client));
        let auths = authorities(&auth);
        assert!(matches!(
            cred.verify(&auths, &client, "gemma-3", 50),
            Err(AuthError::NotYetValid { .. })
        ));
        assert!(matches!(
            cred.verify(&auths, &client, "gemma-3", 10_000),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            cred.verify(&auths, &key(3).public(), "gemma-3", 500),
            Err(AuthError::WrongHolder { .. })
        ));
        assert!(matches!(
            cred.verify(&auths, &client, "llama-3", 500),
            Err(AuthError::ModelNotAllowed { .. })
        ));
        let other: BTreeSet<NodeId> = [key(4).public()].into_iter().collect();
        assert!(matches!(
            cred.verify(&other, &client, "gemma-3", 500),
            Err(AuthError::UntrustedIssuer { .. })
        ));
        let mut forged = cred.clone();
        forged.body.token_budget = u64::MAX;
        assert_eq!(
            forged.verify(&auths, &client, "gemma-3", 500),
            Err(AuthError::BadSignature)
        );
        let mut short_sig = cred.clone();
        short_sig.signature.truncate(10);
        assert_eq!(
            short_sig.verify(&auths, &client, "gemma-3", 500),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn malformed_credential_text_is_refused() {
        for bad in [
            "",
            "hello",
            "zavod-cred-1.!!!",
            "zavod-cred-1.AAAA",
            &format!("zavod-cred-1.{}", "A".repeat(9000)),
        ] {
            assert!(
                matches!(Credential::from_text(bad), Err(AuthError::MalformedText(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_credential_signature_does_not_verify_as_a_grant() {
        let k = key(1);
        let cred = Authority::new(k.clone()).issue_credential(cred_body(key(2).public()));
        // Re-label the signed bytes: same signer and signature over another domain.
        assert_eq!(
            cred.verify_signature(DOMAIN_GRANT),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn invites_tokens_and_receipts() {
        let auth = Authority::new(key(1));
        let t = auth.invite(JoinTicketBody {
            id: [1; 16],
            expires_at_ms: 100,
            bootstrap: vec!["/ip4/127.0.0.1/tcp/7070".into()],
            membership_ttl_ms: 1_000,
        });
        let back = JoinTicket::from_text(&t.to_text()).expect("parses");
        assert_eq!(back.verify(50).map(|b| b.membership_ttl_ms), Ok(1_000));
        assert_eq!(back.signer, auth.id());
        assert!(matches!(back.verify(100), Err(AuthError::Expired { .. })));
        let mut forged = back.clone();
        forged.body.expires_at_ms = u64::MAX;
        assert_eq!(forged.verify(50), Err(AuthError::BadSignature));

        let client = key(2);
        let token = CapabilityToken {
            secret: client.secret_bytes(),
            credential: auth.issue_credential(cred_body(client.public())),
        };
        assert_eq!(
            CapabilityToken::from_text(&token.to_text()),
            Ok(token.clone())
        );
        let wrong = CapabilityToken {
            secret: key(3).secret_bytes(),
            ..token
        };
        assert!(CapabilityToken::from_text(&wrong.to_text()).is_err());

        let target = key(4);
        let r = sign_receipt(
            &target,
            ReceiptBody {
                request: RequestId(5),
                client: client.public(),
                generated_tokens: 7,
                answer_hash: prompt_hash("hi"),
            },
        );
        assert!(r.verify(&target.public(), RequestId(5), "hi").is_ok());
        assert!(r.verify(&target.public(), RequestId(5), "ho").is_err());
        assert!(r.verify(&key(5).public(), RequestId(5), "hi").is_err());
        assert!(r.verify(&target.public(), RequestId(6), "hi").is_err());
    }

    #[test]
    fn wildcard_patterns() {
        let p = |s: &str| ModelPattern(s.into());
        assert!(p("*").matches("anything"));
        assert!(p("*").matches(""));
        assert!(p("gemma-*").matches("gemma-3-270m"));
        assert!(!p("gemma-*").matches("llama"));
        assert!(p("*-270m-*").matches("gemma-3-270m-q4"));
        assert!(p("a*b*c").matches("aXXbYYc"));
        assert!(!p("a*b*c").matches("aXXbYY"));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exactly"));
        assert!(!p(&"*a".repeat(50)).matches(&"b".repeat(200)));
    }

    fn grant_fixture() -> (Keypair, GrantBody) {
        let entry = key(5);
        let body = GrantBody {
            request: RequestId(42),
            client: key(2).public(),
            target: key(6).public(),
            model: "gemma".into(),
            max_tokens: 64,
            expires_at_ms: 5_000,
            prompt_hash: prompt_hash("hello"),
            cache_scope: [3; 16],
        };
        (entry, body)
    }

    #[test]
    fn grants_bind_target_client_model_and_prompt() {
        let (entry, body) = grant_fixture();
        let grant = mint_grant(&entry, body.clone());
        let member = |n: &NodeId| *n == entry.public();
        let target = key(6).public();
        let client = key(2).public();
        let ok = GrantCheck {
            this_node: &target,
            client: &client,
            model: "gemma",
            prompt_hash: prompt_hash("hello"),
            max_tokens: 64,
        };
        assert!(grant.verify(member, &ok, 1_000).is_ok());
        let other = key(7).public();
        assert!(matches!(
            grant.verify(
                member,
                &GrantCheck {
                    this_node: &other,
                    ..ok.clone()
                },
                1_000
            ),
            Err(AuthError::WrongTarget { .. })
        ));
        assert_eq!(
            grant.verify(
                member,
                &GrantCheck {
                    client: &other,
                    ..ok.clone()
                },
                1_000
            ),
            Err(AuthError::GrantMismatch("client"))
        );
        assert_eq!(
            grant.verify(
                member,
                &GrantCheck {
                    prompt_hash: prompt_hash("bye"),
                    ..ok.clone()
                },
                1_000
            ),
            Err(AuthError::GrantMismatch("prompt or generation parameters"))
        );
        assert_eq!(
            grant.verify(
                member,
                &GrantCheck {
                    max_tokens: 65,
                    ..ok.clone()
                },
                1_000
            ),
            Err(AuthError::GrantMismatch("max_tokens"))
        );
        assert!(matches!(
            grant.verify(member, &ok, 5_000),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            grant.verify(|_| false, &ok, 1_000),
            Err(AuthError::IssuerNotMember { .. })
        ));
        // A grant forged by a non-member key claiming to be the entry.
        let mut forged = mint_grant(&key(8), body);
        forged.signer = entry.public();
        assert_eq!(
            forged.verify(member, &ok, 1_000),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn replay_guard_admits_each_grant_once() {
        let (_, body) = grant_fixture();
        let mut g = ReplayGuard::default();
        assert!(g.admit(&body, 1_000).is_ok());
        assert_eq!(
            g.admit(&body, 1_001),
            Err(AuthError::Replayed(RequestId(42)))
        );
        // After expiry the id is forgotten; the grant itself is refused as
        // expired by `verify`, so forgetting is safe.
        assert!(g.admit(&body, 1_002).is_err());
        let mut later = body.clone();
        later.request = RequestId(43);
        later.expires_at_ms = 9_000;
        assert!(g.admit(&later, 6_000).is_ok());
        assert_eq!(g.len(), 1, "expired entries are pruned");
    }

    #[test]
    fn usage_ledger_enforces_budget_and_rate() {
        let mut body = cred_body(key(2).public());
        body.token_budget = 100;
        body.rate_per_min = 2;
        let mut l = UsageLedger::default();
        assert_eq!(l.admit(&body, 60, 0), Ok(60));
        // 40 left of the budget while 60 are reserved.
        assert_eq!(l.admit(&body, 60, 0), Ok(40));
        assert!(matches!(
            l.admit(&body, 10, 0),
            Err(AuthError::BudgetExhausted { .. })
        ));
        l.settle(&body.id, 60, 10);
        l.settle(&body.id, 40, 40);
        assert_eq!(l.tokens_used(&body.id), 50);
        // Two requests were taken from the rate bucket of 2 per minute.
        match l.admit(&body, 10, 1) {
            Err(AuthError::RateLimited { retry_after_ms, .. }) => {
                assert!(retry_after_ms > 29_000 && retry_after_ms <= 30_000)
            }
            other => panic!("expected rate limit, got {other:?}"),
        }
        assert_eq!(l.admit(&body, 10, 30_001), Ok(10));
    }
}
