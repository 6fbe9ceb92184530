//! Trust: keys, signed documents, capability credentials, membership
//! certificates, per-request grants and receipts, all on ed25519, and the
//! ledgers an entry keeps.
//!
//! Every signature covers a domain tag and the canonical bincode encoding of
//! the signed body, so a signature over one kind of document never verifies
//! as another kind. Verification is total: it returns an [`AuthError`] that
//! names what is wrong and never panics on hostile input.
//!
//! The ledgers ([`ReplayGuard`], [`UsageLedger`]) are bounded maps keyed by
//! ids and fed `now`; they hold the only mutable trust state of a node.

use crate::UnixMs;
use crate::ids::{NodeId, RequestId};
use crate::limits::MAX_REMEMBERED_GRANTS;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

mod credential;
mod grant;
mod keys;
mod ledger;
mod membership;
mod receipt;
mod revocation;
#[cfg(test)]
mod tests;

pub use credential::*;
pub use grant::*;
pub use keys::*;
pub use ledger::*;
pub use membership::*;
pub use receipt::*;
pub use revocation::*;
