//! The usage ledger: each credential's token budget and request rate at an
//! entry, reserved on admission and settled when the request ends; and the
//! other entries' spending of the same credentials, so that a budget holds
//! across the mesh.
//!
//! Each entry counts, per credential, two totals that only grow: tokens
//! `charged` (reserved on admission, plus charges past a reservation) and
//! tokens `released` (reserved but not generated). What the credential
//! has committed at that entry is their difference. Entries publish their
//! totals ([`UsageCount`], in capacity announcements) and keep the largest
//! totals heard from each other entry, so merging is idempotent and order
//! free, and a count heard twice or late changes nothing. An entry admits
//! a request only while its own committed tokens plus every other entry's
//! stay under the budget.
//!
//! The bound: an entry learns another's spending one announcement later
//! (the Router announces at its next gossip tick once a count changed).
//! With N entries, a credential can spend at most its budget plus what
//! the other N - 1 entries admit for it within that delay; a client that
//! waits for each answer before asking the next entry spends no more than
//! its budget.
//!
//! The request rate holds the same way: each entry also counts the
//! requests it admitted, and requests heard of from other entries are
//! taken out of this entry's bucket for the credential (once this entry
//! has seen the credential, and so knows its rate).

use super::*;
use crate::limits::{MAX_ENTRIES_PER_CREDENTIAL, MAX_TRACKED_CREDENTIALS};

/// Units of the rate bucket: one request costs `MS_PER_MIN` units and the
/// bucket gains `rate_per_min` units per millisecond, all in integers.
const MS_PER_MIN: u64 = 60_000;

/// Fills a credential's rate bucket for the time since it was last filled.
fn refill(u: &mut Usage, now_ms: UnixMs) {
    let rate = u64::from(u.rate_per_min);
    let elapsed = now_ms.saturating_sub(u.bucket_at_ms);
    u.bucket_units = u
        .bucket_units
        .saturating_add(elapsed.saturating_mul(rate))
        .min(rate * MS_PER_MIN);
    u.bucket_at_ms = now_ms.max(u.bucket_at_ms);
}

#[derive(Debug, Clone)]
struct Usage {
    tokens_used: u64,
    reserved: u64,
    /// Grows: tokens reserved, plus charges past a reservation.
    charged: u64,
    /// Grows: reserved tokens given back.
    released: u64,
    /// Grows: requests admitted here.
    requests: u64,
    /// The credential's rate (0: none), for spending other entries'
    /// requests from this entry's bucket.
    rate_per_min: u32,
    bucket_units: u64,
    bucket_at_ms: UnixMs,
    expires_at_ms: UnixMs,
}

/// One entry's totals for one credential, as it publishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCount {
    pub credential: [u8; 16],
    pub charged: u64,
    pub released: u64,
    /// Requests admitted at that entry.
    pub requests: u64,
    /// When the credential expires (its count is forgotten then).
    pub expires_at_ms: UnixMs,
}

impl UsageCount {
    fn committed(&self) -> u64 {
        self.charged.saturating_sub(self.released)
    }
}

/// What other entries said a credential spent there.
#[derive(Debug, Clone, Default)]
struct Remote {
    by_entry: BTreeMap<NodeId, UsageCount>,
}

impl Remote {
    fn committed(&self) -> u64 {
        self.by_entry
            .values()
            .fold(0u64, |s, c| s.saturating_add(c.committed()))
    }

    fn expires_at_ms(&self) -> UnixMs {
        self.by_entry
            .values()
            .map(|c| c.expires_at_ms)
            .max()
            .unwrap_or(0)
    }
}

/// Token budget and request rate per credential. The entry node reserves the
/// request's token ceiling on admission and settles the real count when the
/// request ends, so concurrent requests cannot overspend a budget; and it
/// counts what other entries report, so visiting several entries cannot
/// either (beyond the bound in the module's docs).
#[derive(Debug, Default)]
pub struct UsageLedger {
    by_credential: BTreeMap<[u8; 16], Usage>,
    remote: BTreeMap<[u8; 16], Remote>,
    /// Credentials whose totals changed since they were last published.
    changed: BTreeSet<[u8; 16]>,
    /// Where the round of republishing every count stands.
    cursor: Option<[u8; 16]>,
    /// Grows with every change to a count, so a saver knows when to save.
    version: u64,
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
        let elsewhere = self.remote.get(&cred.id).map_or(0, Remote::committed);
        let rate = u64::from(cred.rate_per_min);
        let u = self.by_credential.entry(cred.id).or_insert(Usage {
            tokens_used: 0,
            reserved: 0,
            charged: 0,
            released: 0,
            requests: 0,
            rate_per_min: cred.rate_per_min,
            bucket_units: rate * MS_PER_MIN,
            bucket_at_ms: now_ms,
            expires_at_ms: cred.expires_at_ms,
        });
        let committed = u
            .tokens_used
            .saturating_add(u.reserved)
            .saturating_add(elsewhere);
        if committed >= cred.token_budget {
            return Err(AuthError::BudgetExhausted {
                used: u.tokens_used.saturating_add(elsewhere),
                budget: cred.token_budget,
            });
        }
        u.rate_per_min = cred.rate_per_min;
        if rate > 0 {
            refill(u, now_ms);
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
        u.charged = u.charged.saturating_add(allowed);
        u.requests = u.requests.saturating_add(1);
        self.changed.insert(cred.id);
        self.version += 1;
        // `allowed` is at most `want_tokens`, a u32.
        Ok(u32::try_from(allowed).unwrap_or(want_tokens))
    }

    /// Ends a request admitted with `reserved` tokens that generated `used`.
    pub fn settle(&mut self, cred_id: &[u8; 16], reserved: u32, used: u32) {
        if let Some(u) = self.by_credential.get_mut(cred_id) {
            let used = u64::from(used.min(reserved));
            let back = u64::from(reserved) - used;
            u.reserved = u.reserved.saturating_sub(u64::from(reserved));
            u.tokens_used = u.tokens_used.saturating_add(used);
            u.released = u.released.saturating_add(back);
            if back > 0 {
                self.changed.insert(*cred_id);
            }
            self.version += 1;
        }
    }

    /// Charges tokens a request's reservation did not cover: what a target
    /// the client left mid-answer generated beyond what the client said it
    /// had (known only from that target's later report).
    pub fn charge(&mut self, cred_id: &[u8; 16], tokens: u32) {
        if let Some(u) = self.by_credential.get_mut(cred_id) {
            u.tokens_used = u.tokens_used.saturating_add(u64::from(tokens));
            u.charged = u.charged.saturating_add(u64::from(tokens));
            self.changed.insert(*cred_id);
            self.version += 1;
        }
    }

    /// Tokens this entry charged to a credential (generated, here).
    pub fn tokens_used(&self, cred_id: &[u8; 16]) -> u64 {
        self.by_credential.get(cred_id).map_or(0, |u| u.tokens_used)
    }

    /// Tokens other entries report committed for a credential.
    pub fn used_elsewhere(&self, cred_id: &[u8; 16]) -> u64 {
        self.remote.get(cred_id).map_or(0, Remote::committed)
    }

    /// Takes in another entry's published totals, keeping the largest heard.
    pub fn on_remote(&mut self, entry: NodeId, counts: &[UsageCount], now_ms: UnixMs) {
        for c in counts {
            if c.expires_at_ms <= now_ms || c.released > c.charged {
                continue;
            }
            if !self.remote.contains_key(&c.credential) {
                if self.remote.len() >= MAX_TRACKED_CREDENTIALS {
                    self.remote.retain(|_, r| r.expires_at_ms() > now_ms);
                }
                if self.remote.len() >= MAX_TRACKED_CREDENTIALS {
                    continue;
                }
            }
            let r = self.remote.entry(c.credential).or_default();
            let room = r.by_entry.len() < MAX_ENTRIES_PER_CREDENTIAL;
            let new_requests = match r.by_entry.get_mut(&entry) {
                Some(held)
                    if held.charged >= c.charged
                        && held.released >= c.released
                        && held.requests >= c.requests =>
                {
                    0
                }
                Some(held) => {
                    let more = c.requests.saturating_sub(held.requests);
                    held.charged = held.charged.max(c.charged);
                    held.released = held.released.max(c.released);
                    held.requests = held.requests.max(c.requests);
                    held.expires_at_ms = held.expires_at_ms.max(c.expires_at_ms);
                    self.version += 1;
                    more
                }
                None if room => {
                    r.by_entry.insert(entry, *c);
                    self.version += 1;
                    c.requests
                }
                None => 0,
            };
            // Requests made elsewhere come out of this entry's bucket too,
            // so the rate holds across entries (as soon as they are heard).
            if new_requests > 0
                && let Some(u) = self.by_credential.get_mut(&c.credential)
                && u.rate_per_min > 0
            {
                refill(u, now_ms);
                u.bucket_units = u
                    .bucket_units
                    .saturating_sub(new_requests.saturating_mul(MS_PER_MIN));
            }
        }
    }

    /// Grows with every change to a count.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether some total changed since it was last published.
    pub fn has_news(&self) -> bool {
        !self.changed.is_empty()
    }

    /// Up to `max` of this entry's totals to publish: those that changed
    /// first, then the next ones in a round over all of them, so that an
    /// entry that started late, or missed an announcement, hears every
    /// count in time.
    pub fn poll_counts(&mut self, max: usize) -> Vec<UsageCount> {
        let mut out: Vec<UsageCount> = Vec::new();
        while out.len() < max {
            let Some(id) = self.changed.pop_first() else {
                break;
            };
            if let Some(c) = self.count(&id) {
                out.push(c);
            }
        }
        let start = self.cursor;
        let mut range: Vec<[u8; 16]> = match start {
            Some(after) => self
                .by_credential
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .map(|(k, _)| *k)
                .take(max.saturating_sub(out.len()))
                .collect(),
            None => Vec::new(),
        };
        if range.len() < max.saturating_sub(out.len()) {
            // Wrap around to the start of the round.
            let more = max.saturating_sub(out.len()) - range.len();
            range.extend(
                self.by_credential
                    .keys()
                    .take_while(|k| start.is_none_or(|s| **k <= s))
                    .take(more)
                    .copied(),
            );
        }
        for id in range {
            self.cursor = Some(id);
            if out.iter().any(|c| c.credential == id) {
                continue;
            }
            if let Some(c) = self.count(&id) {
                out.push(c);
            }
        }
        out
    }

    fn count(&self, id: &[u8; 16]) -> Option<UsageCount> {
        self.by_credential.get(id).map(|u| UsageCount {
            credential: *id,
            charged: u.charged,
            released: u.released,
            requests: u.requests,
            expires_at_ms: u.expires_at_ms,
        })
    }

    /// Every count this ledger holds, this entry's own under `me`, for
    /// saving; reservations in flight count as spent.
    pub fn export(&self, me: NodeId) -> Vec<(NodeId, UsageCount)> {
        let mut out: Vec<(NodeId, UsageCount)> = self
            .by_credential
            .keys()
            .filter_map(|id| self.count(id).map(|c| (me, c)))
            .collect();
        for r in self.remote.values() {
            out.extend(r.by_entry.iter().map(|(e, c)| (*e, *c)));
        }
        out
    }

    /// Restores saved counts (a restarted node): its own become its totals,
    /// the others' are merged as if just heard.
    pub fn import(&mut self, me: NodeId, counts: &[(NodeId, UsageCount)], now_ms: UnixMs) {
        for (entry, c) in counts {
            if *entry != me {
                self.on_remote(*entry, std::slice::from_ref(c), now_ms);
                continue;
            }
            if c.expires_at_ms <= now_ms || self.by_credential.len() >= MAX_TRACKED_CREDENTIALS {
                continue;
            }
            self.by_credential.insert(
                c.credential,
                Usage {
                    tokens_used: c.committed(),
                    reserved: 0,
                    charged: c.charged,
                    released: c.released,
                    requests: c.requests,
                    rate_per_min: 0,
                    // A full bucket at the next admission (its rate is not
                    // known until then).
                    bucket_units: 0,
                    bucket_at_ms: 0,
                    expires_at_ms: c.expires_at_ms,
                },
            );
            self.changed.insert(c.credential);
        }
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
                self.changed.remove(&k);
            }
        }
    }
}
