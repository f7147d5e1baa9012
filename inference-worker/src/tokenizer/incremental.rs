//! Incremental detokenization for streaming: turns one new token at a time into the text it
//! adds, never emitting half a UTF-8 character. Byte-level tokens can end inside a multi-byte
//! character; decoding then yields U+FFFD, so text is held back until the character completes.
//! Context tokens before the new ones are decoded along with them so that decoders which depend
//! on neighbours (leading spaces, byte fallback) produce the same text as a full decode.

use super::Tokenizer;

/// How many tokens before the unread ones are decoded with them for context.
const CONTEXT_TOKENS: usize = 5;

#[derive(Clone, Debug)]
pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// Starts after `prompt` (only its last few tokens are kept, as context).
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let tokens = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let n = tokens.len();
        Self {
            tokens,
            prefix_offset: 0,
            read_offset: n,
            skip_special_tokens,
        }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let skip = self.skip_special_tokens;
        let prefix = tokenizer
            .decode(&self.tokens[self.prefix_offset..self.read_offset], skip)
            .unwrap_or_default();
        let full = tokenizer
            .decode(&self.tokens[self.prefix_offset..], skip)
            .unwrap_or_default();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let Some(new) = full.get(prefix.len()..) else {
                return String::new();
            };
            let new = new.to_owned();
            // Keep a few tokens of context, drop the rest so decoding stays O(1) per token.
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            if self.prefix_offset > 4 * CONTEXT_TOKENS {
                let cut = self.prefix_offset;
                self.tokens.drain(..cut);
                self.prefix_offset -= cut;
                self.read_offset -= cut;
            }
            new
        } else {
            String::new()
        }
    }
}
