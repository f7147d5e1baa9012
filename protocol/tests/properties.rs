//! Property tests of the wire types: whatever JSON arrives, parsing a request answers `Ok` or
//! `Err` and never panics, and what parses survives a round trip through its own serialization.

use llmctl_protocol::{ChatCompletionRequest, CompletionRequest};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "echo",
    "tools",
    "response_format",
];

/// A valid request with some of its fields replaced by any JSON.
fn mutated_request() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..4).prop_map(|edits| {
        let mut req = json!({"model": "m", "max_tokens": 4, "prompt": "hi",
            "messages": [{"role": "user", "content": "hi"}]});
        for (field, value) in edits {
            req[field] = value;
        }
        req
    })
}

proptest! {
    // A fixed seed: CI runs the same cases every time (change it to explore others).
    #![proptest_config(ProptestConfig {
        cases: 512,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x11c7),
        ..ProptestConfig::default()
    })]

    #[test]
    fn requests_parse_or_refuse_and_what_parses_round_trips(req in mutated_request()) {
        let bytes = serde_json::to_vec(&req).unwrap();
        if let Ok(chat) = serde_json::from_slice::<ChatCompletionRequest>(&bytes) {
            let again: ChatCompletionRequest =
                serde_json::from_slice(&serde_json::to_vec(&chat).unwrap()).unwrap();
            prop_assert_eq!(
                serde_json::to_value(&again).unwrap(),
                serde_json::to_value(&chat).unwrap()
            );
        }
        if let Ok(completion) = serde_json::from_slice::<CompletionRequest>(&bytes) {
            let again: CompletionRequest =
                serde_json::from_slice(&serde_json::to_vec(&completion).unwrap()).unwrap();
            prop_assert_eq!(
                serde_json::to_value(&again).unwrap(),
                serde_json::to_value(&completion).unwrap()
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<ChatCompletionRequest>(&bytes);
        let _ = serde_json::from_slice::<CompletionRequest>(&bytes);
    }
}

/// Found by the property above: a float parsed without full precision drifted by one unit in
/// the last place on a round trip (serde_json's `float_roundtrip` feature is on for this).
#[test]
fn a_large_integer_temperature_survives_a_round_trip() {
    let bytes = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":-977197231684868417}"#;
    let chat: ChatCompletionRequest = serde_json::from_slice(bytes).unwrap();
    let again: ChatCompletionRequest =
        serde_json::from_slice(&serde_json::to_vec(&chat).unwrap()).unwrap();
    assert_eq!(chat.temperature, again.temperature);
}
