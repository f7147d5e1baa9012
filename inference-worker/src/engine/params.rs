//! Checked sampling parameters: what a request asks of the sampler and of the stop rules.
//! The server turns OpenAI fields into this type; `validate` is the one place ranges are
//! checked, with errors that name the parameter.

/// How a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// Aborted (client gone, or shut down).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Completions to generate from one prompt; they share the prompt's KV blocks.
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Drop tokens below `min_p` times the most likely token's probability; 0 disables.
    pub min_p: f32,
    /// OpenAI penalties over generated tokens, in [-2, 2].
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Hugging Face repetition penalty over prompt and generated tokens; 1 disables.
    pub repetition_penalty: f32,
    /// Added to the logits of the given token ids, in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Makes sampling reproducible; each of the `n` sequences derives its own stream.
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// End-of-sequence and stop tokens are suppressed until this many tokens exist.
    pub min_tokens: usize,
    /// Stop strings; the output ends before the first match (which is not included).
    pub stop: Vec<String>,
    /// Extra token ids that end the sequence (not included in the text).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Return the sampled token's logprob and this many top alternatives.
    pub logprobs: Option<usize>,
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
        }
    }
}

/// A parameter outside its range: `param` is the OpenAI field name.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("`{param}` {message}")]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

/// Largest `n`, `top_logprobs` and stop-list sizes accepted.
pub const MAX_N: usize = 128;
pub const MAX_TOP_LOGPROBS: usize = 20;
pub const MAX_STOP: usize = 16;

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks every range; `vocab_size` bounds token ids.
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        let err = |param, message: String| Err(ParamError { param, message });
        let finite_in = |v: f32, lo: f32, hi: f32| v.is_finite() && v >= lo && v <= hi;
        if self.n == 0 || self.n > MAX_N {
            return err(
                "n",
                format!("must be between 1 and {MAX_N}, got {}", self.n),
            );
        }
        if !finite_in(self.temperature, 0.0, 2.0) {
            return err(
                "temperature",
                format!("must be in [0, 2], got {}", self.temperature),
            );
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !finite_in(self.min_p, 0.0, 1.0) {
            return err("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !finite_in(self.presence_penalty, -2.0, 2.0) {
            return err(
                "presence_penalty",
                format!("must be in [-2, 2], got {}", self.presence_penalty),
            );
        }
        if !finite_in(self.frequency_penalty, -2.0, 2.0) {
            return err(
                "frequency_penalty",
                format!("must be in [-2, 2], got {}", self.frequency_penalty),
            );
        }
        if !(self.repetition_penalty.is_finite()
            && self.repetition_penalty > 0.0
            && self.repetition_penalty <= 10.0)
        {
            return err(
                "repetition_penalty",
                format!("must be in (0, 10], got {}", self.repetition_penalty),
            );
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return err(
                    "logit_bias",
                    format!("token id {token} is outside the vocabulary of {vocab_size}"),
                );
            }
            if !finite_in(bias, -100.0, 100.0) {
                return err(
                    "logit_bias",
                    format!("bias for token {token} must be in [-100, 100], got {bias}"),
                );
            }
        }
        if self.max_tokens == 0 {
            return err("max_tokens", "must be at least 1".to_owned());
        }
        if self.min_tokens > self.max_tokens {
            return err(
                "min_tokens",
                format!("{} exceeds max_tokens {}", self.min_tokens, self.max_tokens),
            );
        }
        if self.stop.len() > MAX_STOP {
            return err(
                "stop",
                format!("at most {MAX_STOP} stop strings, got {}", self.stop.len()),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return err("stop", "stop strings must not be empty".to_owned());
        }
        if let Some(&bad) = self
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= vocab_size)
        {
            return err(
                "stop_token_ids",
                format!("token id {bad} is outside the vocabulary of {vocab_size}"),
            );
        }
        if let Some(k) = self.logprobs
            && k > MAX_TOP_LOGPROBS
        {
            return err(
                "top_logprobs",
                format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_parameter() {
        let check = |p: SamplingParams| p.validate(100).unwrap_err().param;
        assert_eq!(
            check(SamplingParams {
                n: 0,
                ..Default::default()
            }),
            "n"
        );
        assert_eq!(
            check(SamplingParams {
                n: 1_000_000_000,
                ..Default::default()
            }),
            "n"
        );
        assert_eq!(
            check(SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            }),
            "temperature"
        );
        assert_eq!(
            check(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            }),
            "top_p"
        );
        assert_eq!(
            check(SamplingParams {
                logit_bias: vec![(100, 1.0)],
                ..Default::default()
            }),
            "logit_bias"
        );
        assert_eq!(
            check(SamplingParams {
                max_tokens: 0,
                ..Default::default()
            }),
            "max_tokens"
        );
        assert_eq!(
            check(SamplingParams {
                logprobs: Some(21),
                ..Default::default()
            }),
            "top_logprobs"
        );
        assert_eq!(
            check(SamplingParams {
                stop: vec![String::new()],
                ..Default::default()
            }),
            "stop"
        );
        assert!(SamplingParams::default().validate(100).is_ok());
    }
}
