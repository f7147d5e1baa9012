//! Builds a real byte-level BPE tokenizer (the GPT-2 / Llama-3 kind) for `llmctl model init`:
//! merges trained with the `tokenizers` crate's BPE trainer on a corpus made here from a seed,
//! Llama-3 style special tokens, and a post-processor that prepends BOS. Also owns the GPT-2
//! byte-to-character map that byte-level token strings are written in.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::rng::Rng;

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
pub const EOT: &str = "<|eot_id|>";
pub const SPECIAL_TOKENS: [&str; 5] = [BOS, EOS, EOT, "<|start_header_id|>", "<|end_header_id|>"];

/// A Llama-3 style chat template (bos, header tokens, `<|eot_id|>` after each turn).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\
{% if message['content'] is string %}{{ message['content'] | trim }}\
{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}\
{{ '<|eot_id|>' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

fn byte_table() -> &'static ([char; 256], std::collections::HashMap<char, u8>) {
    static TABLE: OnceLock<([char; 256], std::collections::HashMap<char, u8>)> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut chars = ['\0'; 256];
        let mut next = 256u32;
        for b in 0..256u32 {
            chars[b as usize] = if printable(b) {
                char::from_u32(b).expect("byte values are valid chars")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("256..512 are valid chars")
            };
        }
        let back = chars
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        (chars, back)
    })
}

/// The byte a byte-level token character stands for.
pub fn char_to_byte(c: char) -> Option<u8> {
    byte_table().1.get(&c).copied()
}

/// Writes `tokenizer.json` to `path`: a byte-level BPE with about `vocab_size` entries, trained
/// on a corpus generated from `seed` (so the same seed gives the same file).
pub fn write_tokenizer(path: &Path, vocab_size: usize, seed: u64) -> Result<(), String> {
    let alphabet: HashSet<char> = byte_table().0.iter().copied().collect();
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .build();
    let bos_id = 0; // special tokens take the first ids, in order.
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS}:0 $A:0"))
        .and_then(|b| b.try_pair(format!("{BOS}:0 $A:0 {BOS}:1 $B:1")))
        .map_err(|e| e.to_string())?
        .special_tokens(vec![(BOS.to_owned(), bos_id)])
        .build()
        .map_err(|e| e.to_string())?;
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(post))
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(|e| e.to_string())?;
    let corpus = corpus(seed);
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(|e| e.to_string())?;
    tokenizer.save(path, true).map_err(|e| e.to_string())
}

const PROSE: &str = "The serving plane takes requests from many clients and keeps the pool of \
executors busy. Each request carries a prompt, and the model answers one token at a time. \
A paged cache holds the keys and values of every sequence in fixed blocks, so memory is never \
wasted on padding. When two prompts share a prefix, the blocks of that prefix are reused. \
Numbers like 0, 1, 2, 3, 42, 1024 and 3.14159 appear in text, as do dates such as 2026-11-24. \
Punctuation matters too: commas, periods; colons: quotes \"like this\", (parentheses), [brackets], \
{braces}, and symbols # $ % & * + - / < = > @ ^ _ ` | ~. Some words come from other languages: \
café, naïve, façade, über, niño, 日本語, 中文, русский, and an emoji 🚀 now and then. \
def main():\n    print(\"hello, world\")\n    return 0\n";

const SYLLABLES: [&str; 48] = [
    "ka", "lo", "mi", "ne", "ta", "ri", "so", "vu", "pe", "da", "ro", "li", "an", "en", "in", "on",
    "ex", "al", "or", "us", "th", "st", "ch", "sh", "qu", "ing", "ion", "er", "ed", "ly", "re",
    "de", "con", "pro", "ment", "ness", "able", "ive", "ous", "ent", "ate", "ize", "ful", "less",
    "tion", "ver", "com", "pre",
];

/// Prose plus seeded pseudo-words with a skewed distribution, so merges exist for a few
/// thousand tokens and depend on the seed.
fn corpus(seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut lines: Vec<String> = PROSE.split(". ").map(str::to_owned).collect();
    lines.extend(std::iter::repeat_n(PROSE.to_owned(), 4));
    for _ in 0..4000 {
        let words = 4 + rng.below(12);
        let mut line = String::new();
        for w in 0..words {
            if w > 0 {
                line.push(' ');
            }
            let syllables = 1 + rng.below(4);
            for _ in 0..syllables {
                // Squaring a uniform index skews toward the first syllables (Zipf-like).
                let u = rng.uniform();
                line.push_str(SYLLABLES[((u * u) * SYLLABLES.len() as f64) as usize]);
            }
        }
        line.push_str(if rng.below(5) == 0 { ", " } else { ". " });
        lines.push(line);
    }
    lines
}
