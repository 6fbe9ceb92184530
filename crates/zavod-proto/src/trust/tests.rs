//! Tests of the trust documents and ledgers.

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
        uses: 1,
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

#[test]
fn revocations_verify_grow_once_and_digest_in_any_order() {
    let a = Authority::new(key(1));
    let auths = authorities(&a);
    let node = key(2).public();
    let cred = [7u8; 16];
    let r_node = a.revoke(Revoked::Node(node), 5);
    let r_cred = a.revoke(Revoked::Credential(cred), 6);

    let mut one = Revocations::default();
    assert_eq!(one.digest(), RevocationDigest::default());
    assert_eq!(one.insert(r_node.clone(), &auths), Ok(true));
    assert_eq!(
        one.insert(r_node.clone(), &auths),
        Ok(false),
        "applied once"
    );
    assert_eq!(one.insert(r_cred.clone(), &auths), Ok(true));
    assert!(one.node_revoked(&node) && one.credential_revoked(&cred));
    assert!(!one.node_revoked(&key(3).public()));

    // Learned in the other order, the same set has the same digest.
    let mut two = Revocations::default();
    two.insert(r_cred.clone(), &auths).expect("cred");
    assert!(two.digest().should_fetch_from(&one.digest()));
    assert!(!one.digest().should_fetch_from(&two.digest()));
    two.insert(r_node.clone(), &auths).expect("node");
    assert_eq!(one.digest(), two.digest());
    assert!(!two.digest().should_fetch_from(&one.digest()));

    // Same count, different subjects: both ask.
    let mut three = Revocations::default();
    three.insert(r_cred, &auths).expect("cred");
    three
        .insert(a.revoke(Revoked::Node(key(4).public()), 7), &auths)
        .expect("other node");
    assert!(three.digest().should_fetch_from(&one.digest()));
    assert!(one.digest().should_fetch_from(&three.digest()));

    // Only the mesh's authority revokes, and tampering breaks the signature.
    let stranger = Authority::new(key(9)).revoke(Revoked::Node(node), 5);
    assert!(matches!(
        Revocations::default().insert(stranger, &auths),
        Err(RevocationError::Auth(AuthError::UntrustedIssuer { .. }))
    ));
    let mut bent = r_node.clone();
    bent.body.subject = Revoked::Node(key(5).public());
    assert!(matches!(
        Revocations::default().insert(bent, &auths),
        Err(RevocationError::Auth(AuthError::BadSignature))
    ));

    // The text form round-trips and fits the wire bound.
    let text = r_node.to_text();
    assert_eq!(Revocation::from_text(&text).expect("parses"), r_node);
    let bytes = crate::wire::encode_unversioned(&r_node);
    assert!(
        bytes.len() <= crate::limits::MAX_REVOCATION_BYTES,
        "{}",
        bytes.len()
    );
}

#[test]
fn the_revocation_set_is_bounded() {
    let a = Authority::new(key(1));
    let auths = authorities(&a);
    let mut set = Revocations::default();
    for i in 0..crate::limits::MAX_REVOCATIONS as u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        assert_eq!(
            set.insert(a.revoke(Revoked::Credential(id), 1), &auths),
            Ok(true)
        );
    }
    let extra = a.revoke(Revoked::Credential([0xff; 16]), 1);
    assert_eq!(set.insert(extra, &auths), Err(RevocationError::Full));
    assert_eq!(set.len(), crate::limits::MAX_REVOCATIONS);
}

#[test]
fn a_budget_holds_across_entries_that_hear_each_others_counts() {
    let mut body = cred_body(key(2).public());
    body.token_budget = 100;
    let (ea, eb, ec) = (key(11).public(), key(12).public(), key(13).public());
    let (mut a, mut b, mut c) = (
        UsageLedger::default(),
        UsageLedger::default(),
        UsageLedger::default(),
    );
    let now = 1_000;
    // 30 tokens spent through A (40 reserved, 10 given back).
    assert_eq!(a.admit(&body, 40, now), Ok(40));
    a.settle(&body.id, 40, 30);
    let from_a = a.poll_counts(8);
    assert_eq!(from_a.len(), 1);
    b.on_remote(ea, &from_a, now);
    c.on_remote(ea, &from_a, now);
    // B knows: only 70 are left.
    assert_eq!(b.admit(&body, 100, now), Ok(70));
    b.settle(&body.id, 70, 70);
    let from_b = b.poll_counts(8);
    a.on_remote(eb, &from_b, now);
    c.on_remote(eb, &from_b, now);
    // C, and A, refuse: the budget is spent across the mesh.
    assert_eq!(
        c.admit(&body, 1, now),
        Err(AuthError::BudgetExhausted {
            used: 100,
            budget: 100
        })
    );
    assert!(a.admit(&body, 1, now).is_err());

    // Counts heard again, or late and older, change nothing.
    let before = c.used_elsewhere(&body.id);
    c.on_remote(ea, &from_a, now);
    c.on_remote(eb, &from_b, now);
    let mut old = from_b[0];
    old.charged = 1;
    c.on_remote(eb, &[old], now);
    assert_eq!(c.used_elsewhere(&body.id), before);
    // A count that could not be true, or has expired, is not taken.
    let mut bent = from_b[0];
    bent.released = bent.charged + 1;
    let mut fresh = UsageLedger::default();
    fresh.on_remote(ec, &[bent], now);
    let mut gone = from_b[0];
    gone.expires_at_ms = now;
    fresh.on_remote(ec, &[gone], now);
    assert_eq!(fresh.used_elsewhere(&body.id), 0);

    // A restarted entry keeps what it and the others counted.
    let mut again = UsageLedger::default();
    again.import(ea, &a.export(ea), now);
    assert_eq!(again.tokens_used(&body.id), 30);
    assert_eq!(again.used_elsewhere(&body.id), 70);
    assert!(again.admit(&body, 1, now).is_err());
}

#[test]
fn every_count_is_republished_in_turn() {
    let mut l = UsageLedger::default();
    let now = 1_000;
    for n in 0..5u8 {
        let mut body = cred_body(key(2).public());
        body.id = [n; 16];
        l.admit(&body, 10, now).expect("admit");
    }
    // The five changed ones first, three at a time.
    let first = l.poll_counts(3);
    let second = l.poll_counts(3);
    assert_eq!(first.len(), 3);
    assert_eq!(second.len(), 3, "two changed and one from the round");
    assert!(!l.has_news());
    // Then the round goes on over all of them, wrapping around.
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        for c in l.poll_counts(2) {
            seen.insert(c.credential);
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
}

#[test]
fn a_rate_holds_across_entries_that_hear_each_others_requests() {
    let mut body = cred_body(key(2).public());
    body.token_budget = 1_000_000;
    body.rate_per_min = 2;
    let ea = key(11).public();
    let (mut a, mut b) = (UsageLedger::default(), UsageLedger::default());
    let now = 1_000;
    // B has seen the credential once; A then takes one more request.
    assert!(b.admit(&body, 1, now).is_ok());
    assert!(a.admit(&body, 1, now).is_ok());
    b.on_remote(ea, &a.poll_counts(8), now + 1);
    // Two requests in this minute across the mesh: B refuses a third.
    assert!(matches!(
        b.admit(&body, 1, now + 2),
        Err(AuthError::RateLimited { .. })
    ));
    // Hearing the same count again takes nothing more.
    b.on_remote(ea, &a.poll_counts(8), now + 3);
    assert!(
        b.admit(&body, 1, now + 30_003).is_ok(),
        "one request's worth refilled"
    );
}
