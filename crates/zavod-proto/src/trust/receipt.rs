//! Receipts: what the node that generated an answer signs about it, so an
//! entry charges and records on the generating node's word, not a
//! client's.

use super::*;

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
