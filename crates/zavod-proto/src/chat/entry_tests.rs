//! Protocol tests: an entry machine, targets that sign real receipts and
//! a client's [`crate::chat::failover::AnswerStream`], stepped by hand with no
//! network.
//!
//! Why this file passes 600 lines: each test steps one whole request
//! through the machine (placements, runs, client frames, reports) and
//! checks every output; they share the mesh fixture above.

use super::*;
use crate::chat::failover::{AnswerStream, OnFailure, ResumeRequest};
use crate::trust::{
    Authority, GrantBody, Keypair, MembershipBody, ReceiptBody, mint_grant, prompt_hash,
    sign_receipt,
};
use crate::wire::StopReason;

struct Mesh {
    entry_key: Keypair,
    client: NodeId,
    targets: Vec<Keypair>,
    membership: Membership,
    next_request: u128,
}

fn key(n: u8) -> Keypair {
    Keypair::from_secret([n; 32])
}

impl Mesh {
    fn new() -> Self {
        let entry_key = key(1);
        let authority = Authority::new(key(9));
        let membership = authority.certify_member(MembershipBody {
            member: entry_key.public(),
            issued_at_ms: 0,
            expires_at_ms: u64::MAX / 2,
        });
        Mesh {
            entry_key,
            client: key(2).public(),
            targets: vec![key(3), key(4), key(5)],
            membership,
            next_request: 1,
        }
    }

    fn me(&self) -> NodeId {
        self.entry_key.public()
    }

    fn target(&self, i: usize) -> NodeId {
        self.targets[i].public()
    }

    fn entry(&self, client_dials: bool, max_tokens: u32) -> Entry {
        let config = EntryConfig {
            max_failed_targets: 3,
            max_full_targets: 2,
            report_grace_ms: 2_000,
            answer_deadline_ms: 60_000,
        };
        let req = EntryRequest {
            me: self.me(),
            client: self.client,
            client_dials,
            model: "m".into(),
            params: GenParams {
                max_tokens,
                ..Default::default()
            },
            turns: Vec::new(),
            history_turns: 0,
            prompt_display: None,
            recalled: Vec::new(),
            membership: Some(self.membership.clone()),
            continued: None,
        };
        Entry::new(config, req, 0)
    }

    /// What the placer would answer: `target` with a fresh grant.
    fn placed(&mut self, target: NodeId, holder: NodeId) -> Placed {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let grant = mint_grant(
            &self.entry_key,
            GrantBody {
                request,
                client: holder,
                target,
                model: "m".into(),
                max_tokens: 100,
                expires_at_ms: 30_000,
                prompt_hash: [0; 32],
                cache_scope: [0; 16],
            },
        );
        Placed {
            target,
            addrs: vec!["/memory/1".into()],
            grant,
        }
    }

    /// Places the entry's first attempt on target 0 (grant bound to
    /// `holder`) and drains what that produced.
    fn first_on_target_0(&mut self, e: &mut Entry, holder: NodeId) -> (AttemptId, RequestId) {
        let (a0, ..) = place_of(&drain(e)).expect("placed");
        let p0 = self.placed(self.target(0), holder);
        let r0 = p0.grant.body.request;
        e.handle_placed(a0, Ok(p0), 1);
        drain(e);
        (a0, r0)
    }

    fn receipt(&self, t: usize, request: RequestId, answer: &str, n: u32) -> Receipt {
        sign_receipt(
            &self.targets[t],
            ReceiptBody {
                request,
                client: self.client,
                generated_tokens: n,
                answer_hash: prompt_hash(answer),
            },
        )
    }
}

use crate::trust::Receipt;

fn drain(e: &mut Entry) -> Vec<Output> {
    std::iter::from_fn(|| e.poll()).collect()
}

fn text(from: u32, to: u32) -> String {
    (from..to).map(|i| format!("w{i} ")).collect()
}

fn tokens(from: u32, to: u32) -> Vec<RunToken> {
    (from..to)
        .map(|i| RunToken {
            index: i,
            text: format!("w{i} "),
            id: i as i32,
        })
        .collect()
}

/// A run's end as a target reports it: `generated` tokens, signed by
/// `receipt` when it has one.
fn done_info(stop: StopReason, generated: u32, receipt: Option<Receipt>) -> DoneInfo {
    DoneInfo {
        stop,
        prompt_tokens: 3,
        cached_tokens: 0,
        generated_tokens: generated,
        first_token_ms: 1.0,
        decode_tokens_per_s: 1.0,
        finished_at_ms: 5,
        receipt,
        unrecorded: None,
    }
}

fn place_of(outs: &[Output]) -> Option<(AttemptId, NodeId, Vec<NodeId>, GenParams)> {
    outs.iter().find_map(|o| match o {
        Output::Place {
            attempt,
            holder,
            exclude,
            params,
            ..
        } => Some((*attempt, *holder, exclude.clone(), params.clone())),
        _ => None,
    })
}

/// The soft exclusions of the output's placement.
fn avoid_of(outs: &[Output]) -> Vec<NodeId> {
    outs.iter()
        .find_map(|o| match o {
            Output::Place { avoid, .. } => Some(avoid.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn breakers(outs: &[Output]) -> Vec<(NodeId, Outcome)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Breaker { node, outcome } => Some((*node, *outcome)),
            _ => None,
        })
        .collect()
}

/// Tokens the credential was charged, from Settle and Charge.
fn charged(outs: &[Output]) -> u32 {
    outs.iter()
        .map(|o| match o {
            Output::Settle { used } => *used,
            Output::Charge { tokens } => *tokens,
            _ => 0,
        })
        .sum()
}

fn redirect_of(outs: &[Output]) -> Option<Redirect> {
    outs.iter().find_map(|o| match o {
        Output::Transmit(ServerFrame::Redirect(r)) => Some((**r).clone()),
        _ => None,
    })
}

/// The whole failover with no network: the client streams 5 tokens
/// from target 0, which dies after generating 7; the client resumes,
/// the entry re-places the rest on target 1 (away from 0, with the 5
/// tokens as resume tokens and the budget left), target 1 finishes
/// with 12 more, the client hands in the receipt, and target 0's late
/// report charges the 2 tokens the client never saw. Every token
/// generated is charged once; target 0's breaker hears of the failure
/// only because the entry's own dial failed.
#[test]
fn an_answer_fails_over_between_two_targets_with_no_network() {
    let mut mesh = Mesh::new();
    let mut e = mesh.entry(true, 20);
    let mut client = AnswerStream::new(3);
    let mut all = Vec::new();

    let (a0, holder, exclude, _) = place_of(&drain(&mut e)).expect("placed");
    assert_eq!((holder, exclude.len()), (mesh.client, 0));
    let p0 = mesh.placed(mesh.target(0), mesh.client);
    let r0 = p0.grant.body.request;
    e.handle_placed(a0, Ok(p0), 1);
    let outs = drain(&mut e);
    assert!(matches!(outs[0], Output::Expect { request, .. } if request == r0));
    let redirect = redirect_of(&outs).expect("redirected");
    assert_eq!(redirect.target, mesh.target(0));
    all.extend(outs);

    // Target 0 streams 5 tokens to the client, then dies.
    client.start_source();
    for t in tokens(0, 5) {
        client
            .on_source_token(t.index, &t.text, t.id)
            .expect("in order");
    }
    let OnFailure::Resume(r) = client.on_failure(false) else {
        panic!("the client resumes");
    };
    e.handle_client(
        ClientInput::Frame(ClientFrame::Resume {
            reason: "stalled".into(),
            answer: r.answer,
            tokens: r.tokens,
            ids: r.ids,
        }),
        2,
    );
    let outs = drain(&mut e);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::CheckTarget { node } if *node == mesh.target(0))),
        "the entry sees for itself"
    );
    assert!(breakers(&outs).is_empty(), "a client's word counts nothing");
    let (a1, _, exclude, params) = place_of(&outs).expect("placed again");
    assert_eq!(exclude, vec![mesh.target(0)]);
    assert_eq!(params.resume_tokens, (0..5).collect::<Vec<i32>>());
    assert_eq!(params.max_tokens, 15);
    all.extend(outs);
    // The entry's own dial fails: now it counts.
    e.handle_check(mesh.target(0), false, 3);
    let outs = drain(&mut e);
    assert_eq!(breakers(&outs), vec![(mesh.target(0), Outcome::Failure)]);
    all.extend(outs);

    let p1 = mesh.placed(mesh.target(1), mesh.client);
    let r1 = p1.grant.body.request;
    e.handle_placed(a1, Ok(p1), 4);
    let outs = drain(&mut e);
    assert_eq!(
        redirect_of(&outs).expect("redirected").target,
        mesh.target(1)
    );
    all.extend(outs);

    // Target 1 finishes the answer: 12 tokens counted from its start.
    client.start_source();
    for (i, t) in tokens(5, 17).into_iter().enumerate() {
        client
            .on_source_token(i as u32, &t.text, t.id)
            .expect("in order");
    }
    assert_eq!(client.text(), text(0, 17));
    let receipt = mesh.receipt(1, r1, &text(5, 17), 12);
    e.handle_client(
        ClientInput::Frame(ClientFrame::Finished {
            answer: client.text().to_string(),
            receipt: Box::new(receipt),
        }),
        5,
    );
    let outs = drain(&mut e);
    assert_eq!(breakers(&outs), vec![(mesh.target(1), Outcome::Success)]);
    assert!(outs.iter().any(
        |o| matches!(o, Output::Record { answer, tokens } if *answer == text(0, 17) && *tokens == 17)
    ));
    assert!(matches!(outs.last(), Some(Output::Close)));
    all.extend(outs);
    assert!(!e.is_finished(), "target 0's report is still due");

    // Target 0 generated 7 before it died; the client saw 5.
    let report = RunReport {
        request: r0,
        answer: text(0, 7),
        receipt: mesh.receipt(0, r0, &text(0, 7), 7),
        prompt_tokens: 10,
        stop: StopReason::Cancelled,
    };
    e.handle_report(report, 6);
    all.extend(drain(&mut e));
    assert!(e.is_finished());
    assert_eq!(charged(&all), 7 + 12, "every generated token once");
    let settles = all
        .iter()
        .filter(|o| matches!(o, Output::Settle { .. }))
        .count();
    assert_eq!(settles, 1);
}

/// A client that claims failure right after a redirect opens nobody's
/// breaker when the entry can reach the target, and the target's work
/// is still charged.
#[test]
fn a_forged_resume_counts_against_no_breaker_and_is_charged() {
    let mut mesh = Mesh::new();
    let mut e = mesh.entry(true, 20);
    let (_, r0) = mesh.first_on_target_0(&mut e, mesh.client);
    e.handle_client(
        ClientInput::Frame(ClientFrame::Resume {
            reason: "lies".into(),
            answer: String::new(),
            tokens: 0,
            ids: Vec::new(),
        }),
        2,
    );
    let mut all = drain(&mut e);
    e.handle_check(mesh.target(0), true, 3);
    all.extend(drain(&mut e));
    assert!(breakers(&all).is_empty());
    // The client goes away; the target's report still charges it.
    e.handle_client(ClientInput::Gone, 4);
    let report = RunReport {
        request: r0,
        answer: text(0, 20),
        receipt: mesh.receipt(0, r0, &text(0, 20), 20),
        prompt_tokens: 10,
        stop: StopReason::MaxTokens,
    };
    e.handle_report(report, 5);
    all.extend(drain(&mut e));
    assert!(
        all.iter()
            .any(|o| matches!(o, Output::Charge { tokens: 20 }))
    );
}

/// An early relay (while the target streams) and a report with a
/// receipt the target did not sign: the first target's work is
/// charged from its own report only.
#[test]
fn a_relay_while_streaming_leaves_the_first_run_charged_from_its_report() {
    let mut mesh = Mesh::new();
    let mut e = mesh.entry(true, 10);
    let (_, r0) = mesh.first_on_target_0(&mut e, mesh.client);
    e.handle_client(
        ClientInput::Frame(ClientFrame::Relay {
            reason: "cannot reach".into(),
        }),
        2,
    );
    let mut all = drain(&mut e);
    let (a1, holder, exclude, _) = place_of(&all).expect("relay placed");
    assert_eq!(holder, mesh.me(), "the entry holds a relay's grant");
    assert!(exclude.is_empty(), "the client's word excludes nobody");
    assert_eq!(
        avoid_of(&all),
        vec![mesh.target(0)],
        "but another node is tried first"
    );
    let p1 = mesh.placed(mesh.target(1), mesh.me());
    let r1 = p1.grant.body.request;
    e.handle_placed(a1, Ok(p1), 3);
    let outs = drain(&mut e);
    assert!(outs.iter().any(|o| matches!(o, Output::Fetch { .. })));
    all.extend(outs);
    e.handle_tokens(a1, tokens(0, 4), 4);
    let done = done_info(
        StopReason::EndOfGeneration,
        4,
        Some(mesh.receipt(1, r1, &text(0, 4), 4)),
    );
    e.handle_done(a1, done, 5);
    let outs = drain(&mut e);
    let sent: Vec<u32> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit(ServerFrame::Token { index, .. }) => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![0, 1, 2, 3]);
    assert!(
        outs.iter().any(
            |o| matches!(o, Output::Transmit(ServerFrame::Done(d)) if d.generated_tokens == 4)
        )
    );
    all.extend(outs);
    // A report for the first run signed by the wrong node proves nothing.
    let forged = RunReport {
        request: r0,
        answer: text(0, 9),
        receipt: mesh.receipt(1, r0, &text(0, 9), 9),
        prompt_tokens: 3,
        stop: StopReason::Cancelled,
    };
    e.handle_report(forged, 6);
    assert!(!e.is_finished());
    let real = RunReport {
        request: r0,
        answer: text(0, 3),
        receipt: mesh.receipt(0, r0, &text(0, 3), 3),
        prompt_tokens: 3,
        stop: StopReason::Cancelled,
    };
    e.handle_report(real, 7);
    all.extend(drain(&mut e));
    assert!(e.is_finished());
    assert_eq!(charged(&all), 4 + 3);
}

/// A relayed (in-process) request: a target that refuses the request's
/// own input ends it with that error and no breaker; one that fails
/// mid-answer is counted, excluded, and the rest continues elsewhere
/// with token indices going on.
#[test]
fn a_relay_sorts_refusals_from_faults_and_continues_the_count() {
    let mut mesh = Mesh::new();
    let mut e = mesh.entry(false, 10);
    let (a0, holder, ..) = place_of(&drain(&mut e)).expect("placed");
    assert_eq!(holder, mesh.me());
    let p0 = mesh.placed(mesh.target(0), mesh.me());
    e.handle_placed(a0, Ok(p0), 1);
    drain(&mut e);
    let bad = error(ErrorCode::BadRequest, "a NUL byte");
    e.handle_failed(a0, bad, true, 2);
    let outs = drain(&mut e);
    assert!(breakers(&outs).is_empty(), "the client's own input");
    assert!(outs.iter().any(
        |o| matches!(o, Output::Transmit(ServerFrame::Error(f)) if f.code == ErrorCode::BadRequest)
    ));
    assert!(outs.iter().any(|o| matches!(o, Output::Settle { used: 0 })));

    let mut e = mesh.entry(false, 10);
    let (a0, _) = mesh.first_on_target_0(&mut e, mesh.me());
    e.handle_tokens(a0, tokens(0, 3), 2);
    let broke = error(ErrorCode::Internal, "the target dropped the stream");
    e.handle_failed(a0, broke, false, 3);
    let outs = drain(&mut e);
    assert_eq!(breakers(&outs), vec![(mesh.target(0), Outcome::Failure)]);
    let (a1, _, exclude, params) = place_of(&outs).expect("placed again");
    assert_eq!(exclude, vec![mesh.target(0)]);
    assert_eq!(params.max_tokens, 7);
    let p1 = mesh.placed(mesh.target(1), mesh.me());
    let r1 = p1.grant.body.request;
    e.handle_placed(a1, Ok(p1), 4);
    drain(&mut e);
    e.handle_tokens(a1, tokens(0, 2), 5);
    let outs = drain(&mut e);
    let indices: Vec<u32> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit(ServerFrame::Token { index, .. }) => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(indices, vec![3, 4], "the count goes on");
    let done = done_info(
        StopReason::EndOfGeneration,
        2,
        Some(mesh.receipt(1, r1, &text(0, 2), 2)),
    );
    e.handle_done(a1, done, 6);
    let outs = drain(&mut e);
    assert!(outs.iter().any(|o| matches!(o, Output::Settle { used: 5 })));
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Record { tokens: 5, .. }))
    );
}

/// A redirected answer nobody reports is charged in full at its
/// deadline; a cancelled relay is charged what was streamed and not
/// kept.
#[test]
fn silence_is_charged_in_full_and_a_cancel_is_not_kept() {
    let mut mesh = Mesh::new();
    let mut e = mesh.entry(true, 10);
    let _ = mesh.first_on_target_0(&mut e, mesh.client);
    e.handle_client(ClientInput::Gone, 2);
    assert_eq!(e.poll_timeout(), Some(60_000));
    e.handle_timeout(60_000);
    let outs = drain(&mut e);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Settle { used: 10 }))
    );
    assert!(e.is_finished());

    let mut e = mesh.entry(false, 10);
    let (a0, r0) = mesh.first_on_target_0(&mut e, mesh.me());
    e.handle_tokens(a0, tokens(0, 2), 2);
    e.handle_client(ClientInput::Gone, 3);
    let outs = drain(&mut e);
    assert!(outs.iter().any(|o| matches!(o, Output::Cancel { .. })));
    let done = done_info(
        StopReason::Cancelled,
        3,
        Some(mesh.receipt(0, r0, &text(0, 3), 3)),
    );
    e.handle_tokens(a0, tokens(2, 3), 4);
    e.handle_done(a0, done, 5);
    let outs = drain(&mut e);
    assert!(outs.iter().any(|o| matches!(o, Output::Settle { used: 3 })));
    assert!(!outs.iter().any(|o| matches!(o, Output::Record { .. })));
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Transmit(_))),
        "the client is gone"
    );
}

/// A run on this node after a resume: accepted once the worker takes
/// it, tokens counted on after the resumed part.
#[test]
fn a_local_run_after_a_resume_counts_on() {
    let mut mesh = Mesh::new();
    let mut e = mesh.entry(true, 10);
    let _ = mesh.first_on_target_0(&mut e, mesh.client);
    e.handle_client(
        ClientInput::Frame(ClientFrame::Resume {
            reason: "died".into(),
            answer: text(0, 4),
            tokens: 4,
            ids: (0..4).collect(),
        }),
        2,
    );
    let (a1, ..) = place_of(&drain(&mut e)).expect("placed");
    let me = mesh.me();
    let p1 = mesh.placed(me, mesh.client);
    e.handle_placed(a1, Ok(p1), 3);
    let outs = drain(&mut e);
    assert!(matches!(outs[..], [Output::RunLocal { ref params, .. }] if params.max_tokens == 6));
    e.handle_started(a1, 4);
    e.handle_tokens(a1, tokens(0, 1), 5);
    let outs = drain(&mut e);
    assert!(matches!(&outs[0], Output::Transmit(ServerFrame::Accepted(a)) if a.served_by == me));
    assert!(matches!(
        &outs[1],
        Output::Transmit(ServerFrame::Token { index: 4, .. })
    ));
}

/// A turn continued after its entry failed: the new entry places the rest
/// after what had streamed (resume tokens, what is left of the budget,
/// indices counting on) and keeps the whole answer; a continuation that
/// leaves nothing to generate, or whose ids do not match, is refused.
#[test]
fn an_answer_continued_from_a_failed_entry_counts_on_and_is_kept_whole() {
    let mut mesh = Mesh::new();
    let continued = |n: u32| ResumeRequest {
        answer: text(0, n),
        tokens: n,
        ids: (0..n as i32).collect(),
    };
    let mut e = {
        let mut e = mesh.entry(true, 10);
        drain(&mut e);
        e.req.continued = Some(continued(4));
        // Built again with the continuation, as the node builds it.
        Entry::new(e.config.clone(), e.req.clone(), 0)
    };
    let (a0, holder, exclude, params) = place_of(&drain(&mut e)).expect("placed");
    assert_eq!(holder, mesh.client);
    assert!(exclude.is_empty(), "no target is known to have failed");
    assert_eq!(params.resume_tokens, (0..4).collect::<Vec<i32>>());
    assert_eq!(params.max_tokens, 6);
    let me = mesh.me();
    let p0 = mesh.placed(me, mesh.client);
    e.handle_placed(a0, Ok(p0), 1);
    drain(&mut e);
    e.handle_started(a0, 2);
    e.handle_tokens(a0, tokens(0, 2), 3);
    let outs = drain(&mut e);
    assert!(matches!(
        &outs[1],
        Output::Transmit(ServerFrame::Token { index: 4, .. })
    ));
    e.handle_done(a0, done_info(StopReason::EndOfGeneration, 2, None), 4);
    let outs = drain(&mut e);
    let kept = outs.iter().find_map(|o| match o {
        Output::Record { answer, tokens } => Some((answer.clone(), *tokens)),
        _ => None,
    });
    assert_eq!(kept, Some((text(0, 4) + &text(0, 2), 6)));

    for bad in [
        continued(10),
        ResumeRequest {
            ids: vec![1],
            ..continued(3)
        },
    ] {
        let mut e = mesh.entry(true, 10);
        drain(&mut e);
        e.req.continued = Some(bad);
        let mut e = Entry::new(e.config.clone(), e.req.clone(), 0);
        let outs = drain(&mut e);
        assert!(place_of(&outs).is_none(), "nothing is placed: {outs:?}");
        assert!(
            outs.iter()
                .any(|o| matches!(o, Output::Transmit(ServerFrame::Error(f))
                if f.code == ErrorCode::BadRequest && f.message.contains("cannot continue"))),
            "{outs:?}"
        );
    }
}

/// Targets that say they are full (a relayed run, a redirected client, a
/// local worker) are passed on without a breaker hearing of it, avoided
/// rather than excluded, and after `max_full_targets` of them the next
/// run may wait in a queue; what the client saw counts on unchanged.
#[test]
fn full_targets_are_passed_on_then_the_last_one_is_waited_for() {
    let mut mesh = Mesh::new();
    let full = || error(ErrorCode::NoCapacity, "all 4 slots are busy");

    // Relayed: the target refuses the fetch.
    let mut e = mesh.entry(false, 10);
    let (a0, _) = mesh.first_on_target_0(&mut e, mesh.me());
    e.handle_failed(a0, full(), true, 2);
    let outs = drain(&mut e);
    assert!(breakers(&outs).is_empty(), "a full target is not at fault");
    let (a1, _, exclude, params) = place_of(&outs).expect("placed again");
    assert!(exclude.is_empty(), "only avoided");
    assert_eq!(avoid_of(&outs), vec![mesh.target(0)]);
    assert_eq!(params.max_tokens, 10);
    let p1 = mesh.placed(mesh.target(1), mesh.me());
    e.handle_placed(a1, Ok(p1), 3);
    let outs = drain(&mut e);
    let run = outs
        .iter()
        .find_map(|o| match o {
            Output::Fetch { run, .. } => Some(run.clone()),
            _ => None,
        })
        .expect("fetched");
    assert!(
        !run.may_queue,
        "one full target: the next may not queue yet"
    );
    e.handle_failed(a1, full(), true, 4);
    let outs = drain(&mut e);
    let (a2, ..) = place_of(&outs).expect("placed a third time");
    assert_eq!(avoid_of(&outs), vec![mesh.target(0), mesh.target(1)]);
    let p2 = mesh.placed(mesh.target(2), mesh.me());
    e.handle_placed(a2, Ok(p2), 5);
    let outs = drain(&mut e);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Fetch { run, .. } if run.may_queue))
    );
    // Full even so (its queue is): now it is a failure like any other,
    // still not the target's fault.
    e.handle_failed(a2, full(), true, 6);
    let outs = drain(&mut e);
    assert!(breakers(&outs).is_empty());
    let (_, _, exclude, _) = place_of(&outs).expect("placed a fourth time");
    assert_eq!(exclude, vec![mesh.target(2)]);

    // Redirected: the client says its target was full.
    let mut e = mesh.entry(true, 10);
    let (_, r0) = mesh.first_on_target_0(&mut e, mesh.client);
    let mut client = AnswerStream::new(3);
    client.start_source();
    assert_eq!(client.on_full(), OnFailure::Full);
    e.handle_client(
        ClientInput::Frame(ClientFrame::Full {
            reason: "all 4 slots are busy".into(),
        }),
        2,
    );
    let outs = drain(&mut e);
    assert!(breakers(&outs).is_empty());
    assert!(
        !outs.iter().any(|o| matches!(o, Output::CheckTarget { .. })),
        "nothing to check: the target answered"
    );
    let (a1, holder, exclude, _) = place_of(&outs).expect("placed again");
    assert_eq!(holder, mesh.client, "still redirected");
    assert!(exclude.is_empty());
    assert_eq!(avoid_of(&outs), vec![mesh.target(0)]);
    let p1 = mesh.placed(mesh.target(1), mesh.client);
    let r1 = p1.grant.body.request;
    e.handle_placed(a1, Ok(p1), 3);
    let redirect = redirect_of(&drain(&mut e)).expect("redirected again");
    assert!(!redirect.run.may_queue);
    assert!(redirect.run.params.resume_tokens.is_empty());
    client.start_source();
    for t in tokens(0, 10) {
        client
            .on_source_token(t.index, &t.text, t.id)
            .expect("in order");
    }
    e.handle_client(
        ClientInput::Frame(ClientFrame::Finished {
            answer: client.text().to_owned(),
            receipt: Box::new(mesh.receipt(1, r1, &text(0, 10), 10)),
        }),
        4,
    );
    let mut all = drain(&mut e);
    // The full target may have generated something after all (the
    // client's word): its report is still charged.
    let report = RunReport {
        request: r0,
        answer: String::new(),
        receipt: mesh.receipt(0, r0, "", 0),
        prompt_tokens: 0,
        stop: StopReason::Cancelled,
    };
    e.handle_report(report, 5);
    all.extend(drain(&mut e));
    assert_eq!(charged(&all), 10);
    assert!(e.is_finished());

    // The only node with the model is full every time: it is placed
    // there again (avoided, but nothing else is left) until the entry
    // lets the run wait.
    let mut e = mesh.entry(false, 10);
    let (mut a, _) = mesh.first_on_target_0(&mut e, mesh.me());
    {
        e.handle_failed(a, full(), true, 2);
        let outs = drain(&mut e);
        assert!(breakers(&outs).is_empty());
        (a, ..) = place_of(&outs).expect("placed again");
        let p = mesh.placed(mesh.target(0), mesh.me());
        e.handle_placed(a, Ok(p), 3);
        let outs = drain(&mut e);
        assert!(
            outs.iter()
                .any(|o| matches!(o, Output::Fetch { run, .. } if !run.may_queue))
        );
    }
    e.handle_failed(a, full(), true, 4);
    let (a, ..) = place_of(&drain(&mut e)).expect("placed a third time");
    let p = mesh.placed(mesh.target(0), mesh.me());
    e.handle_placed(a, Ok(p), 5);
    let outs = drain(&mut e);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Fetch { run, .. } if run.may_queue)),
        "after two turn-aways (as configured) the run waits"
    );

    // A local worker with every slot busy: placed elsewhere.
    let mut e = mesh.entry(true, 10);
    let (a0, ..) = place_of(&drain(&mut e)).expect("placed");
    let mine = mesh.placed(mesh.me(), mesh.client);
    e.handle_placed(a0, Ok(mine), 1);
    let outs = drain(&mut e);
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::RunLocal {
            may_queue: false,
            ..
        }
    )));
    e.handle_failed(a0, full(), true, 2);
    let outs = drain(&mut e);
    assert!(breakers(&outs).is_empty());
    assert_eq!(avoid_of(&outs), vec![mesh.me()]);
}
