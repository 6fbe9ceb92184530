//! Capability credentials (what a client may do, signed by a mesh
//! authority), the capability token a client keeps (credential and secret
//! in one line), and operator proofs (a node's own key reading its status).

use super::*;

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
pub(crate) fn wildcard_match(pat: &[u8], text: &[u8]) -> bool {
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
    pub(crate) key: Keypair,
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
