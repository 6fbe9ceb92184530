//! Grants: an entry's permission for one request to run on one node,
//! bound to its client, model, prompt and budget, and the replay guard
//! that lets each run once.

use super::*;

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
