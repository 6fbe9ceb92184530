//! Membership of a mesh: certificates an authority signs for nodes, the
//! invites that let a node have one signed, and capacity reports signed
//! by the member they describe.

use super::*;

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

/// A capacity report signed by the node it describes.
pub type SignedReport = Signed<crate::mesh::capacity::CapacityReport>;

pub fn sign_report(key: &Keypair, report: crate::mesh::capacity::CapacityReport) -> SignedReport {
    key.sign_doc(DOMAIN_CAPACITY, &report)
}

impl SignedReport {
    /// Checks the signature and that the signer is the node described.
    pub fn verify(&self) -> Result<&crate::mesh::capacity::CapacityReport, AuthError> {
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
    /// How many nodes it admits (1 unless its maker said more; at most
    /// [`MAX_INVITE_USES`]).
    pub uses: u32,
}

/// The most nodes one invite may admit.
pub const MAX_INVITE_USES: u32 = 1_024;

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
