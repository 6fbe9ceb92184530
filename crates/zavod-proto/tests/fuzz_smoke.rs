//! A bounded smoke run of every fuzz target (`zavod_proto::fuzz`): each
//! runs over its committed corpus (`crates/zavod-fuzz/corpus/TARGET/`) and
//! over seeded mutations of valid inputs (bytes flipped, cut, repeated,
//! spliced), so a decoder that panics on a malformed input fails the tests
//! without waiting for a fuzzing session. `ZAVOD_FUZZ_WRITE_CORPUS=1`
//! writes the valid seeds into the corpus folders (how they were made).

use std::path::PathBuf;
use zavod_proto::chat::prompt::{Role, Turn};
use zavod_proto::fuzz::{TARGETS, authority_key};
use zavod_proto::ids::ConversationId;
use zavod_proto::mesh::capacity::{CapacityReport, ModelOffer, Resources, WorkerLoad};
use zavod_proto::mesh::view::Announcement;
use zavod_proto::trust::{
    Authority, CapabilityToken, CredentialBody, GrantBody, JoinTicketBody, Keypair, MembershipBody,
    ModelPattern, ReceiptBody, mint_grant, sign_receipt, sign_report,
};
use zavod_proto::wire::memory::{MemoryOp, MemoryReply, MemoryRequest};
use zavod_proto::wire::{
    Accepted, ChatRequest, ClientFrame, DoneInfo, ErrorCode, ErrorFrame, GenParams, ServerFrame,
    StopReason, encode, encode_unversioned,
};
use zavod_proto::{NodeId, RequestId};

/// Mutations of each seed per target.
const MUTATIONS: u32 = 20_000;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../zavod-fuzz/corpus")
        .join(target)
}

/// Valid inputs for each target, signed by the authority the targets trust.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let authority = Authority::new(authority_key());
    let node = Keypair::from_secret([9; 32]);
    let client = Keypair::from_secret([5; 32]);
    let credential = authority.issue_credential(CredentialBody {
        id: [1; 16],
        holder: client.public(),
        models: ModelPattern("*".into()),
        token_budget: 1_000,
        rate_per_min: 0,
        not_before_ms: 0,
        expires_at_ms: 1 << 50,
    });
    let grant = mint_grant(
        &node,
        GrantBody {
            request: RequestId(7),
            client: client.public(),
            target: node.public(),
            model: "m".into(),
            max_tokens: 16,
            expires_at_ms: 1 << 50,
            prompt_hash: [0; 32],
            cache_scope: [1; 16],
        },
    );
    let receipt = sign_receipt(
        &node,
        ReceiptBody {
            request: RequestId(7),
            client: client.public(),
            generated_tokens: 2,
            answer_hash: [0; 32],
        },
    );
    let membership = authority.certify_member(MembershipBody {
        member: node.public(),
        issued_at_ms: 0,
        expires_at_ms: 1 << 50,
    });
    let load = WorkerLoad {
        slots_total: 4,
        slots_busy: 1,
        queue_depth: 0,
        tokens_per_s: 30.0,
        cache_keys: vec![1, 2, 3],
    };
    let mut report = CapacityReport::build(
        node.public(),
        1,
        0,
        &Resources {
            ram_total_bytes: 8 << 30,
            ram_free_bytes: 4 << 30,
            ..Default::default()
        },
        &[(ModelOffer::new("m", "Q4_K_M", 4096), load)],
    );
    report.addrs = vec!["/ip4/127.0.0.1/tcp/7070".into()];
    let frames = || -> Vec<Vec<u8>> {
        let done = DoneInfo {
            stop: StopReason::MaxTokens,
            prompt_tokens: 3,
            cached_tokens: 0,
            generated_tokens: 2,
            first_token_ms: 1.0,
            decode_tokens_per_s: 2.0,
            finished_at_ms: 1,
            receipt: Some(receipt.clone()),
            unrecorded: None,
        };
        [
            encode(&ServerFrame::Accepted(Box::new(Accepted {
                request: RequestId(7),
                served_by: node.public(),
                model: "m".into(),
                history_turns: 0,
                grant: grant.clone(),
                prompt: None,
                recalled: Vec::new(),
            }))),
            encode(&ServerFrame::Token {
                index: 0,
                text: "Hel".into(),
                id: 12,
            }),
            encode(&ServerFrame::Token {
                index: 1,
                text: "lo".into(),
                id: 13,
            }),
            encode(&ServerFrame::Done(done)),
            encode(&ServerFrame::Error(ErrorFrame {
                code: ErrorCode::NoCapacity,
                message: "full".into(),
            })),
        ]
        .into_iter()
        .filter_map(Result::ok)
        .collect()
    };
    let texts = |v: Vec<String>| v.into_iter().map(String::into_bytes).collect();
    match target {
        "wire_frames" => {
            let mut v = frames();
            v.extend(
                [
                    encode(&ClientFrame::Chat(Box::new(ChatRequest {
                        credential: credential.clone(),
                        model: Some("m".into()),
                        conversation: None,
                        message: "hello".into(),
                        params: GenParams::default(),
                        show_prompt: false,
                        turn: None,
                        continued: None,
                    }))),
                    encode(&ClientFrame::Cancel),
                    encode(&MemoryRequest {
                        credential: credential.clone(),
                        op: MemoryOp::Export {
                            conversation: ConversationId::parse("c-1").expect("valid"),
                            from: 3,
                        },
                    }),
                    encode(&MemoryReply::Turns {
                        turns: vec![Turn {
                            role: Role::User,
                            text: "hello".into(),
                            tokens: 2,
                        }],
                        next: Some(4),
                        held: true,
                    }),
                    encode(&ClientFrame::Resume {
                        reason: "stalled".into(),
                        answer: "Hel".into(),
                        tokens: 1,
                        ids: vec![12],
                    }),
                ]
                .into_iter()
                .filter_map(Result::ok),
            );
            v
        }
        "credentials" => texts(vec![
            credential.to_text(),
            CapabilityToken {
                secret: client.secret_bytes(),
                credential: credential.clone(),
            }
            .to_text(),
        ]),
        "grants" => vec![encode_unversioned(&grant)],
        "receipts" => vec![encode_unversioned(&receipt)],
        "capacity_reports" => encode(&Announcement {
            report: sign_report(&node, report),
            membership,
        })
        .into_iter()
        .collect(),
        "invites" => texts(vec![
            authority
                .invite(JoinTicketBody {
                    id: [3; 16],
                    expires_at_ms: 1 << 50,
                    bootstrap: vec![format!(
                        "/ip4/127.0.0.1/tcp/7070/p2p/{}",
                        hex_peer(&node.public())
                    )],
                    membership_ttl_ms: 60_000,
                    uses: 1,
                })
                .to_text(),
        ]),
        "entry_reader" => {
            // Frames cut by a two-byte length each, as the target reads
            // them: a whole answer, and one that ends in an error.
            let join = |frames: &[Vec<u8>]| {
                let mut joined = Vec::new();
                for f in frames {
                    if let Ok(n) = u16::try_from(f.len()) {
                        joined.extend(n.to_le_bytes());
                        joined.extend(f);
                    }
                }
                joined
            };
            let f = frames();
            vec![
                join(&f[..4]),
                join(&[f[0].clone(), f[1].clone(), f[4].clone()]),
            ]
        }
        other => panic!("no seeds for {other}"),
    }
}

/// Any stable text naming a node (the targets only parse it).
fn hex_peer(n: &NodeId) -> String {
    n.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// A small seeded generator (splitmix64): the same mutations every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(seed: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80][rng.below(4)];
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 if !v.is_empty() => {
                // Repeat a stretch (length prefixes meet more data).
                let a = rng.below(v.len());
                let b = a + rng.below(v.len() - a + 1).min(64);
                let chunk = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            4 if !other.is_empty() => {
                // Splice in part of another seed.
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {
                let at = rng.below(v.len() + 1);
                v.insert(at, rng.next() as u8);
            }
        }
    }
    v
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations_of_valid_inputs() {
    let write = std::env::var_os("ZAVOD_FUZZ_WRITE_CORPUS").is_some();
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has no valid seed");
        let dir = corpus_dir(name);
        if write {
            std::fs::create_dir_all(&dir).expect("corpus folder");
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), s).expect("write seed");
            }
        }
        let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (the committed corpus)", dir.display()))
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path()).ok())
            .collect();
        assert!(!corpus.is_empty(), "{} is empty", dir.display());
        corpus.extend(seeds);
        for input in &corpus {
            target(input);
        }
        let mut rng = Rng(0x5eed ^ name.len() as u64);
        for i in 0..MUTATIONS {
            let seed = &corpus[i as usize % corpus.len()];
            let other = &corpus[rng.below(corpus.len())];
            target(&mutate(seed, other, &mut rng));
        }
    }
}
