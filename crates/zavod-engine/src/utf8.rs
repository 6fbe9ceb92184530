//! Incremental UTF-8: a token may end in the middle of a character, so bytes
//! are held back until the character is complete. Invalid sequences become
//! U+FFFD rather than an error, since the text goes to people.

#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// The decoder of an answer resumed after `sent` bytes (the pieces of
    /// the tokens another node streamed before it failed): their complete
    /// text was delivered already, but a character they end inside of is
    /// held, so the next token completes it instead of losing its bytes.
    pub(crate) fn resumed_after(sent: &[u8]) -> Self {
        let mut s = Utf8Stream::default();
        let _ = s.push(sent);
        s
    }

    /// Adds bytes and returns the text that is now complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid` bytes were just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_are_held_until_whole() {
        let mut s = Utf8Stream::default();
        let e = "é€".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..3]), "é");
        assert_eq!(s.push(&e[3..]), "€");
        assert_eq!(s.push(&[0xff, b'a']), "\u{FFFD}a");
        assert_eq!(s.push(&[0xe2]), "");
    }

    #[test]
    fn a_character_split_across_a_failover_keeps_its_bytes() {
        let clef = "a𝄞".as_bytes();
        // The failed node streamed "a" and the first two bytes of the clef.
        let mut s = Utf8Stream::resumed_after(&clef[..3]);
        assert_eq!(s.push(&clef[3..]), "𝄞");
        // Nothing was pending: nothing is held.
        let mut s = Utf8Stream::resumed_after("done".as_bytes());
        assert_eq!(s.push(b"!"), "!");
    }
}
