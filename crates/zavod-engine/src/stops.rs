//! Stop sequences: generation ends where the answer's text first contains
//! one of them, and the client never sees it or anything after it.
//!
//! Text that could be the start of a stop sequence is held back until the
//! next tokens show whether it is. Tokens are held whole, with their ids:
//! what leaves is always a run of whole tokens whose text holds no stop
//! sequence and does not end in the beginning of one, so a failover resume
//! (which continues after the ids a client received) never splits a stop
//! sequence or loses text. Only the token in which a stop sequence begins
//! leaves cut, and it is the last.
//!
//! Pure: no clock, no I/O.

use crate::GenToken;

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: Vec<GenToken>,
    /// The held tokens' text, joined.
    held_text: String,
}

/// What one token brings.
#[derive(Debug, PartialEq)]
pub struct Step {
    /// Tokens that may leave now, in order.
    pub release: Vec<GenToken>,
    /// A stop sequence matched: generation ends after `release`.
    pub stopped: bool,
    /// Tokens made but never to be sent (they hold the stop sequence or
    /// follow it): not part of the answer.
    pub dropped: u32,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: Vec::new(),
            held_text: String::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Takes the next generated token.
    pub fn push(&mut self, token: GenToken) -> Step {
        if self.stops.is_empty() {
            return Step {
                release: vec![token],
                stopped: false,
                dropped: 0,
            };
        }
        self.held_text.push_str(&token.text);
        self.held.push(token);
        // The earliest match of any stop sequence ends the answer there.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held_text.find(s.as_str()))
            .min()
        {
            let held = self.held.len();
            let release = self.cut_at(at);
            return Step {
                dropped: u32::try_from(held - release.len()).unwrap_or(u32::MAX),
                release,
                stopped: true,
            };
        }
        // Hold back the longest tail that begins some stop sequence.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held_text, s))
            .max()
            .unwrap_or(0);
        let free = self.held_text.len() - keep;
        let mut release = Vec::new();
        let mut used = 0;
        while let Some(t) = self.held.first() {
            if used + t.text.len() > free {
                break;
            }
            used += t.text.len();
            release.push(self.held.remove(0));
        }
        self.held_text.drain(..used);
        Step {
            release,
            stopped: false,
            dropped: 0,
        }
    }

    /// Everything still held, for when generation ends otherwise.
    pub fn finish(&mut self) -> Vec<GenToken> {
        self.held_text.clear();
        std::mem::take(&mut self.held)
    }

    /// The held tokens whose text lies before byte `at` of the held text,
    /// the one spanning `at` cut there (dropped when nothing is left of it).
    fn cut_at(&mut self, at: usize) -> Vec<GenToken> {
        let mut out = Vec::new();
        let mut start = 0;
        for mut t in std::mem::take(&mut self.held) {
            if start >= at {
                break;
            }
            let end = start + t.text.len();
            if end > at {
                t.text.truncate(at - start);
                if t.text.is_empty() {
                    break;
                }
            }
            start = end;
            out.push(t);
        }
        self.held_text.clear();
        out
    }
}

/// Bytes of the longest suffix of `text` that is a proper prefix of `stop`,
/// ending on a character boundary of both.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let from = text.len() - n;
            text.is_char_boundary(from) && stop.is_char_boundary(n) && text[from..] == stop[..n]
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(i: u32, text: &str) -> GenToken {
        GenToken {
            index: i,
            text: text.into(),
            id: i as i32,
        }
    }

    /// Feeds `pieces`; returns the text released and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool, Vec<i32>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let (mut text, mut ids) = (String::new(), Vec::new());
        for (i, p) in pieces.iter().enumerate() {
            let step = m.push(tok(i as u32, p));
            for t in step.release {
                text.push_str(&t.text);
                ids.push(t.id);
            }
            if step.stopped {
                return (text, true, ids);
            }
        }
        for t in m.finish() {
            text.push_str(&t.text);
            ids.push(t.id);
        }
        (text, false, ids)
    }

    #[test]
    fn a_stop_sequence_across_tokens_ends_the_answer_before_it() {
        let (text, stopped, ids) = run(&["\nUser:"], &["Paris", ".", "\n", "Us", "er:", " more"]);
        assert_eq!(text, "Paris.");
        assert!(stopped);
        assert_eq!(ids, vec![0, 1]);
        let mut m = StopMatcher::new(&["ab".to_string()]);
        assert_eq!(m.push(tok(0, "x")).release.len(), 1);
        assert_eq!(m.push(tok(1, "a")).release.len(), 0);
        let s = m.push(tok(2, "b"));
        assert!(s.stopped);
        assert_eq!((s.release.len(), s.dropped), (0, 2));
    }

    #[test]
    fn a_stop_inside_a_token_cuts_that_token() {
        let (text, stopped, ids) = run(&["END"], &["one ", "twoEND three"]);
        assert_eq!((text.as_str(), stopped), ("one two", true));
        assert_eq!(ids, vec![0, 1]);
        // A token that begins with the stop sequence is dropped whole.
        let (text, _, ids) = run(&["END"], &["one", "END"]);
        assert_eq!((text.as_str(), ids), ("one", vec![0]));
    }

    #[test]
    fn text_that_only_looks_like_a_start_is_released_when_it_is_not() {
        let (text, stopped, _) = run(&["###"], &["a #", "# b", " c"]);
        assert_eq!((text.as_str(), stopped), ("a ## b c", false));
        // Held text leaves when generation ends.
        let (text, stopped, ids) = run(&["###"], &["a ##"]);
        assert_eq!((text.as_str(), stopped, ids), ("a ##", false, vec![0]));
    }

    #[test]
    fn released_tokens_never_end_in_the_start_of_a_stop() {
        let stops = vec!["<|end|>".to_string()];
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for (i, p) in ["x<", "|e", "nd", "|", ">"].iter().enumerate() {
            let s = m.push(tok(i as u32, p));
            for t in s.release {
                out.push_str(&t.text);
            }
            assert!(!out.ends_with('<') && !out.ends_with("<|e"), "{out:?}");
            if s.stopped {
                break;
            }
        }
        assert_eq!(out, "x");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_no_stops_pass_everything() {
        let (text, stopped, _) = run(&["b", "a"], &["xa", "b"]);
        assert_eq!((text.as_str(), stopped), ("x", true));
        let (text, stopped, _) = run(&[], &["a", "b"]);
        assert_eq!((text.as_str(), stopped), ("ab", false));
        let (text, _, _) = run(&[""], &["a"]);
        assert_eq!(text, "a");
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let (text, stopped, _) = run(&["€!"], &["é€", "x", "€", "!"]);
        assert_eq!((text.as_str(), stopped), ("é€x", true));
    }
}
