//! Bounds shared by every component. Each is a ceiling on something a peer
//! or a client controls, so that no input can make a node allocate or wait
//! without limit.

/// The most bytes one wire frame may carry, after the length prefix.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The most bytes a chat message from a client may have.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// The most entries one chat turn goes through: when its entry fails, a
/// client sends the turn on through another node it knows, this many
/// times in all.
pub const MAX_CLIENT_ENTRIES_PER_TURN: u32 = 4;

/// The most node addresses a client keeps to fall back on (those it was
/// given, then those it learned from the mesh).
pub const MAX_CLIENT_KNOWN_PEERS: usize = 32;

/// The most members whose addresses a node remembers across restarts, to
/// find the mesh again through.
pub const MAX_REMEMBERED_PEERS: usize = 16;

/// The most tokens one request may ask to generate.
pub const MAX_TOKENS_PER_REQUEST: u32 = 32_768;

// A chat request carries a message, and, when its turn is continued after
// its entry failed, an answer as long and one id per token, with room for
// the credential and the receipt.
const _: () = assert!(
    2 * MAX_MESSAGE_BYTES + 4 * MAX_TOKENS_PER_REQUEST as usize + 64 * 1024 <= MAX_FRAME_BYTES
);

/// The most single-use grant ids a node remembers; older ones have expired
/// long before this fills under any sane grant lifetime.
pub const MAX_REMEMBERED_GRANTS: usize = 100_000;

/// The most credentials whose rate and budget a node tracks at once.
pub const MAX_TRACKED_CREDENTIALS: usize = 100_000;

/// The most placements an entry remembers as running (each is forgotten
/// when it ends, or by its deadline at the latest).
pub const MAX_PLACEMENTS_REMEMBERED: usize = 65_536;

/// The most stop sequences one request may give (as OpenAI's API allows).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The most bytes one stop sequence may have.
pub const MAX_STOP_BYTES: usize = 128;

/// The most bytes of an output grammar (a JSON schema's grammar is a few
/// KiB).
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// The most tokens one request's logit bias may name.
pub const MAX_LOGIT_BIAS: usize = 1024;

// Stop sequences, the grammar and the logit bias (8 bytes an entry) ride
// in a request frame beside the message.
const _: () = assert!(
    MAX_MESSAGE_BYTES
        + MAX_STOP_SEQUENCES * MAX_STOP_BYTES
        + MAX_GRAMMAR_BYTES
        + MAX_LOGIT_BIAS * 8
        < MAX_FRAME_BYTES
);

/// The most texts one embedding request may carry (OpenAI's API allows
/// more; a mesh answers them in one frame, so it takes fewer).
pub const MAX_EMBED_INPUTS: usize = 32;

/// The most dimensions an embedding from a peer may have.
pub const MAX_EMBED_DIMENSIONS: usize = 4096;

// An embedding reply (4 bytes a dimension) fits one frame with room for
// its framing, and the request's texts fit a message's budget.
const _: () = assert!(MAX_EMBED_INPUTS * MAX_EMBED_DIMENSIONS * 4 + 64 * 1024 <= MAX_FRAME_BYTES);
const _: () = assert!(MAX_MESSAGE_BYTES + 64 * 1024 <= MAX_FRAME_BYTES);

/// The most slots one model on one node may have (`model.slots`).
pub const MAX_SLOTS_PER_MODEL: u32 = 256;

/// The most requests one model on one node may hold waiting
/// (`model.queue_capacity`).
pub const MAX_QUEUE_PER_MODEL: u32 = 65_536;

/// The most models one node may serve (and one capacity report carry).
pub const MAX_MODELS_PER_NODE: usize = 64;

/// The longest context a report may claim for a model, in tokens.
pub const MAX_CONTEXT_TOKENS: u32 = 1 << 24;

// A report's node-wide figures are sums over its models and must not
// overflow the u32 they are carried in.
const _: () = assert!(
    (MAX_SLOTS_PER_MODEL as u64 + MAX_QUEUE_PER_MODEL as u64) * (MAX_MODELS_PER_NODE as u64)
        <= u32::MAX as u64
);

/// The most targets that may fail one answer before its entry gives up on
/// it (each later one continues after what the failed ones streamed).
pub const MAX_FAILED_TARGETS: usize = 3;

/// The most times a client asks its entry to resume one answer.
pub const MAX_CLIENT_RESUMES: u32 = 3;

// Every resume a client asks for names a target that failed: an entry
// that took fewer would refuse resumes its clients are entitled to.
const _: () = assert!(MAX_CLIENT_RESUMES as usize <= MAX_FAILED_TARGETS);

/// The most times full targets may turn one answer away before the entry
/// lets its next run wait in a queue (one node that is the only one left
/// may say so each time). Each costs a round trip; in
/// return, a request whose entry's view of the mesh is stale does not
/// queue behind others while slots elsewhere are free.
pub const MAX_FULL_TARGETS: usize = 3;

/// How long an entry that has a target's report of an answer still waits
/// for the client's own receipt before closing the client's stream.
pub const REPORT_GRACE_MS: u64 = 2_000;

/// The most revocations a mesh keeps (revoked nodes and credentials
/// together). Revocations never lapse, so this bounds the list for good;
/// an authority that reaches it issues new credentials under a new mesh.
pub const MAX_REVOCATIONS: usize = 4_096;

/// The most bytes one signed revocation takes on the wire: a tag, a
/// 32-byte subject, a time, the signer's 32-byte key and a 64-byte
/// signature, each with bincode's length or variant prefix.
pub const MAX_REVOCATION_BYTES: usize = 160;

// A node hands its whole list to a member in one frame.
const _: () = assert!(MAX_REVOCATIONS * MAX_REVOCATION_BYTES + 1024 <= MAX_FRAME_BYTES);

/// The most entries whose spending of one credential a node keeps (more
/// than any mesh has entries that one client visits).
pub const MAX_ENTRIES_PER_CREDENTIAL: usize = 256;

/// The most usage counts one capacity announcement carries (each about 40
/// bytes): the rest follow in the next announcements.
pub const MAX_USAGE_PER_ANNOUNCEMENT: usize = 64;

/// Longest pacing interval of a token stream (`model.stream_interval_ms`):
/// past this a stream reads as stalled.
pub const MAX_STREAM_INTERVAL_MS: u32 = 1_000;

/// The most memory saved prompt states may take
/// (`model.prompt_cache_ram_mib`), whatever the config says.
pub const MAX_SAVED_STATE_BYTES: u64 = 64 << 30;

/// Text in one page of a conversation's export (the memory protocol);
/// a page holds at least one turn whatever its size.
pub const MAX_EXPORT_PAGE_BYTES: usize = 256 * 1024;
const _: () = assert!(2 * MAX_EXPORT_PAGE_BYTES + 64 * 1024 <= MAX_FRAME_BYTES);

/// Conversation names in one reply of the memory protocol (names are at
/// most 64 bytes).
pub const MAX_LISTED_CONVERSATIONS: usize = 4_096;
const _: () = assert!(MAX_LISTED_CONVERSATIONS * 80 + 1024 <= MAX_FRAME_BYTES);

/// Text in one replica protocol frame: a read's reply (a conversation's
/// newest entries) or a write's entries. An entry larger than this still
/// goes, alone, so every conversation can be read and written.
pub const MAX_REPLICA_FRAME_TEXT_BYTES: usize = 512 * 1024;
const _: () = assert!(MAX_REPLICA_FRAME_TEXT_BYTES + 256 * 1024 <= MAX_FRAME_BYTES);

/// Facts one user turn may yield (long-term memory).
pub const MAX_FACTS_PER_TURN: usize = 8;

/// The longest sentence taken as a fact.
pub const MAX_FACT_BYTES: usize = 300;

/// Facts of each kind (the holder's, the conversation's) weighed for one
/// prompt: the newest.
pub const MAX_RECALL_CANDIDATES: usize = 1_024;
const _: () = assert!(MAX_FACTS_PER_TURN * MAX_FACT_BYTES <= MAX_MESSAGE_BYTES);

/// Text of the turns one summary request folds in (the rest waits for the
/// next fold).
pub const MAX_FOLD_BYTES: usize = 16 * 1024;
const _: () = assert!(MAX_FOLD_BYTES <= MAX_MESSAGE_BYTES);

/// Tokens a summary may have.
pub const SUMMARY_MAX_TOKENS: u32 = 96;

/// Summaries one node writes at once (one per conversation).
pub const MAX_FOLDS_IN_FLIGHT: usize = 16;

/// Entries in one replica write (a repair or a sync page).
pub const MAX_REPLICA_WRITE_ENTRIES: usize = 1_024;
