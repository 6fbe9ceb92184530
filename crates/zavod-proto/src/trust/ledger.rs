//! The usage ledger: each credential's token budget and request rate at an
//! entry, reserved on admission and settled when the request ends.

use super::*;

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
