//! Reading an entry's answer, frame by frame: the one place that says what
//! a client may receive and in which order. `zavod chat` and the OpenAI
//! API's whole and streamed answers all read through an [`EntryReader`].
//!
//! The order an entry keeps (see [`crate::chat::entry`]): `Accepted` first,
//! and again whenever a relay moves the answer to another node; then either
//! a `Redirect` (the client fetches the answer from the target itself) or
//! the tokens; then `Done`. An `Error` may come at any point and ends the
//! answer. Anything else is the entry breaking the protocol, and the stream
//! ending before `Done` is a truncated answer.

use crate::wire::{Accepted, DoneInfo, ErrorFrame, Redirect, ServerFrame};

/// One frame, read in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// The entry placed the request; `again` when it had before (a relay
    /// moved the answer to another node).
    Accepted {
        accepted: Box<Accepted>,
        again: bool,
    },
    /// Fetch the answer from another node.
    Redirect(Box<Redirect>),
    Token {
        index: u32,
        text: String,
        id: i32,
    },
    Done(DoneInfo),
}

/// Why an answer cannot be read on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    /// The entry refused or failed the request and said why.
    #[error("{}", .0.message)]
    Refused(ErrorFrame),
    /// The stream ended before the answer was done.
    #[error("the answer ended before it was done")]
    Ended,
    /// A frame out of order, or one this reader cannot act on.
    #[error("the node broke the chat protocol: {0}")]
    Unexpected(&'static str),
}

/// Reads one answer's frames in order. See the module docs.
#[derive(Debug, Clone)]
pub struct EntryReader {
    follows_redirects: bool,
    accepted: bool,
    done: bool,
}

impl EntryReader {
    /// `follows_redirects`: whether this client fetches a redirected
    /// answer itself (`zavod chat` does; the node's own HTTP API runs the
    /// entry in process, which relays instead).
    pub fn new(follows_redirects: bool) -> Self {
        EntryReader {
            follows_redirects,
            accepted: false,
            done: false,
        }
    }

    /// The next frame (`None`: the stream ended).
    pub fn read(&mut self, frame: Option<ServerFrame>) -> Result<Read, ReadError> {
        if self.done {
            return Err(ReadError::Unexpected("a frame after the answer was done"));
        }
        let Some(frame) = frame else {
            return Err(ReadError::Ended);
        };
        match frame {
            ServerFrame::Error(e) => {
                self.done = true;
                Err(ReadError::Refused(e))
            }
            ServerFrame::Accepted(accepted) => {
                let again = std::mem::replace(&mut self.accepted, true);
                Ok(Read::Accepted { accepted, again })
            }
            _ if !self.accepted => Err(ReadError::Unexpected(
                "the answer went on before it was accepted",
            )),
            ServerFrame::Redirect(_) if !self.follows_redirects => Err(ReadError::Unexpected(
                "a redirect where the answer was to come directly",
            )),
            ServerFrame::Redirect(r) => Ok(Read::Redirect(r)),
            ServerFrame::Token { index, text, id } => Ok(Read::Token { index, text, id }),
            ServerFrame::Done(d) => {
                self.done = true;
                Ok(Read::Done(d))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{NodeId, RequestId};
    use crate::trust::{Authority, GrantBody, Keypair, MembershipBody, mint_grant};
    use crate::wire::{ErrorCode, GenParams, RunRequest, StopReason};

    fn accepted() -> ServerFrame {
        let key = Keypair::from_secret([3; 32]);
        let grant = mint_grant(
            &key,
            GrantBody {
                request: RequestId(1),
                client: NodeId([1; 32]),
                target: NodeId([2; 32]),
                model: "m".into(),
                max_tokens: 8,
                expires_at_ms: 1_000,
                prompt_hash: [0; 32],
                cache_scope: [0; 16],
            },
        );
        ServerFrame::Accepted(Box::new(Accepted {
            request: RequestId(1),
            served_by: NodeId([2; 32]),
            model: "m".into(),
            history_turns: 0,
            grant,
            prompt: None,
            recalled: Vec::new(),
        }))
    }

    fn token(index: u32) -> ServerFrame {
        ServerFrame::Token {
            index,
            text: "a".into(),
            id: 5,
        }
    }

    fn done() -> ServerFrame {
        ServerFrame::Done(DoneInfo {
            stop: StopReason::MaxTokens,
            prompt_tokens: 1,
            cached_tokens: 0,
            generated_tokens: 1,
            first_token_ms: 1.0,
            decode_tokens_per_s: 1.0,
            finished_at_ms: 1,
            receipt: None,
            unrecorded: None,
        })
    }

    #[test]
    fn an_answer_reads_in_order_and_a_relay_is_accepted_again() {
        let mut r = EntryReader::new(false);
        assert!(matches!(
            r.read(Some(accepted())),
            Ok(Read::Accepted { again: false, .. })
        ));
        assert!(matches!(r.read(Some(token(0))), Ok(Read::Token { .. })));
        assert!(matches!(
            r.read(Some(accepted())),
            Ok(Read::Accepted { again: true, .. })
        ));
        assert!(matches!(r.read(Some(done())), Ok(Read::Done(_))));
        assert_eq!(
            r.read(Some(token(1))),
            Err(ReadError::Unexpected("a frame after the answer was done"))
        );
    }

    #[test]
    fn frames_out_of_order_are_the_entry_breaking_the_protocol() {
        for early in [token(0), done()] {
            let mut r = EntryReader::new(true);
            assert!(matches!(r.read(Some(early)), Err(ReadError::Unexpected(_))));
        }
        // A redirect only where the client follows it.
        let redirect = || {
            let ServerFrame::Accepted(a) = accepted() else {
                unreachable!("accepted() is an Accepted")
            };
            let issuer_membership =
                Authority::new(Keypair::from_secret([9; 32])).certify_member(MembershipBody {
                    member: Keypair::from_secret([3; 32]).public(),
                    issued_at_ms: 0,
                    expires_at_ms: 1_000,
                });
            ServerFrame::Redirect(Box::new(Redirect {
                target: a.served_by,
                addrs: vec![],
                run: RunRequest {
                    grant: a.grant,
                    issuer_membership,
                    turns: vec![],
                    params: GenParams::default(),
                    may_queue: true,
                },
            }))
        };
        let mut r = EntryReader::new(false);
        r.read(Some(accepted())).expect("accepted");
        assert!(matches!(
            r.read(Some(redirect())),
            Err(ReadError::Unexpected(_))
        ));
        let mut r = EntryReader::new(true);
        r.read(Some(accepted())).expect("accepted");
        assert!(matches!(r.read(Some(redirect())), Ok(Read::Redirect(_))));
    }

    #[test]
    fn an_error_or_the_end_stops_the_answer() {
        let mut r = EntryReader::new(true);
        let refused = ErrorFrame {
            code: ErrorCode::NoCapacity,
            message: "full".into(),
        };
        assert_eq!(
            r.read(Some(ServerFrame::Error(refused.clone()))),
            Err(ReadError::Refused(refused))
        );
        let mut r = EntryReader::new(true);
        r.read(Some(accepted())).expect("accepted");
        r.read(Some(token(0))).expect("a token");
        assert_eq!(r.read(None), Err(ReadError::Ended));
    }
}
