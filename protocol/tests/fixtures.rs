//! Every fixture under `tests/fixtures/` (written from OpenAI's API reference examples) is
//! parsed into its wire type, written back and compared with the original as JSON. The
//! targeted tests below check what a round trip alone cannot: which variant a union parsed
//! as, that unknown fields are dropped rather than refused, that wrong types are refused,
//! and that the nulls OpenAI emits are written.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::PathBuf;

use llmctl_protocol::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name))
        .unwrap_or_else(|err| panic!("reading fixture {name}: {err}"))
}

fn parse<T: DeserializeOwned>(name: &str) -> T {
    serde_json::from_str(&read(name)).unwrap_or_else(|err| panic!("{name} does not parse: {err}"))
}

fn parse_str<T: DeserializeOwned>(json: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|err| err.to_string())
}

/// Parses fixture `name` as `T`, writes it back, and checks that the output is the fixture
/// as JSON and that it parses back to the same value.
fn round_trip<T>(name: &str)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let text = read(name);
    let parsed: T =
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("{name} does not parse: {err}"));
    let original: Value = serde_json::from_str(&text).expect("a fixture that parsed is JSON");
    // Through a string, not a `Value`: a `Value` object would sort the keys of maps whose
    // order we keep (legacy `top_logprobs`).
    let written = serde_json::to_string(&parsed).expect("wire types always serialize");
    let written_value: Value = serde_json::from_str(&written).expect("our own output is JSON");
    assert_same_json(&original, &written_value, name);
    let reparsed: T = serde_json::from_str(&written).expect("our own output parses");
    assert_eq!(reparsed, parsed, "{name}: parse(write(x)) != x");
}

/// JSON equality, reporting the first difference by path. Numbers compare by value: JSON
/// does not tell `1` from `1.0`, and `f64` fields write integers as `1.0`. Two integers
/// still compare exactly.
fn assert_same_json(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::Number(e), Value::Number(a)) => {
            let same = match (e.as_i128(), a.as_i128()) {
                (Some(e), Some(a)) => e == a,
                _ => e.as_f64() == a.as_f64(),
            };
            assert!(same, "{path}: expected {e}, wrote {a}");
        }
        (Value::Object(e), Value::Object(a)) => {
            let expected_keys: BTreeSet<_> = e.keys().collect();
            let actual_keys: BTreeSet<_> = a.keys().collect();
            assert_eq!(expected_keys, actual_keys, "{path}: keys differ");
            for (key, value) in e {
                assert_same_json(value, &a[key], &format!("{path}.{key}"));
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            assert_eq!(e.len(), a.len(), "{path}: lengths differ");
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                assert_same_json(e, a, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(expected, actual, "{path}"),
    }
}

/// A round trip through one wire type: `round_trip::<T>`.
type RoundTrip = fn(&str);

/// Each fixture with the type it is the wire form of.
const ROUND_TRIPS: &[(&str, RoundTrip)] = &[
    (
        "chat_request_basic.json",
        round_trip::<ChatCompletionRequest>,
    ),
    (
        "chat_request_content_parts.json",
        round_trip::<ChatCompletionRequest>,
    ),
    (
        "chat_request_tools.json",
        round_trip::<ChatCompletionRequest>,
    ),
    (
        "chat_request_sampling.json",
        round_trip::<ChatCompletionRequest>,
    ),
    (
        "chat_request_stream.json",
        round_trip::<ChatCompletionRequest>,
    ),
    ("chat_response.json", round_trip::<ChatCompletionResponse>),
    (
        "chat_response_tool_calls.json",
        round_trip::<ChatCompletionResponse>,
    ),
    (
        "chat_response_logprobs.json",
        round_trip::<ChatCompletionResponse>,
    ),
    ("chat_stream.json", round_trip::<Vec<ChatCompletionChunk>>),
    (
        "chat_stream_tool_calls.json",
        round_trip::<Vec<ChatCompletionChunk>>,
    ),
    (
        "completion_request_text.json",
        round_trip::<CompletionRequest>,
    ),
    (
        "completion_request_texts.json",
        round_trip::<CompletionRequest>,
    ),
    (
        "completion_request_tokens.json",
        round_trip::<CompletionRequest>,
    ),
    (
        "completion_request_token_batches.json",
        round_trip::<CompletionRequest>,
    ),
    (
        "completion_request_full.json",
        round_trip::<CompletionRequest>,
    ),
    ("completion_response.json", round_trip::<CompletionResponse>),
    (
        "completion_response_logprobs.json",
        round_trip::<CompletionResponse>,
    ),
    ("completion_stream.json", round_trip::<Vec<CompletionChunk>>),
    ("models_list.json", round_trip::<ModelList>),
    ("model.json", round_trip::<Model>),
    ("error_invalid_api_key.json", round_trip::<ErrorResponse>),
    ("error_model_not_found.json", round_trip::<ErrorResponse>),
    ("error_context_length.json", round_trip::<ErrorResponse>),
    ("error_rate_limit.json", round_trip::<ErrorResponse>),
    ("error_server.json", round_trip::<ErrorResponse>),
];

/// Fixtures that by design do not survive a round trip unchanged, with their own test.
const NOT_ROUND_TRIPPED: &[&str] = &["chat_request_unknown_fields.json"];

#[test]
fn every_fixture_round_trips() {
    for (name, check) in ROUND_TRIPS {
        check(name);
    }
}

#[test]
fn every_fixture_file_is_checked() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(fixture_path(""))
        .expect("fixtures directory exists")
        .map(|entry| {
            entry
                .expect("readable entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let listed: BTreeSet<String> = ROUND_TRIPS
        .iter()
        .map(|(name, _)| *name)
        .chain(NOT_ROUND_TRIPPED.iter().copied())
        .map(str::to_owned)
        .collect();
    assert_eq!(on_disk, listed);
}

// ---- Requests ----

#[test]
fn legacy_prompt_parses_as_the_form_it_came_in() {
    let prompt = |name| parse::<CompletionRequest>(name).prompt;

    assert_eq!(
        prompt("completion_request_text.json"),
        Prompt::Text("Say this is a test".into())
    );
    assert_eq!(
        prompt("completion_request_texts.json").into_prompts(),
        [
            PromptInput::Text("Say this is a test".into()),
            PromptInput::Text("Say this is another test".into()),
        ]
    );
    assert_eq!(
        prompt("completion_request_tokens.json"),
        Prompt::Tokens(vec![25515, 420, 374, 264, 1296])
    );
    let batches = prompt("completion_request_token_batches.json");
    assert!(matches!(batches, Prompt::TokenBatches(_)), "{batches:?}");
    assert_eq!(batches.len(), 3);
    assert_eq!(
        batches.into_prompts()[2],
        PromptInput::Tokens(vec![0]),
        "a batch element with one token stays a token list"
    );
}

#[test]
fn stop_keeps_its_form() {
    let chat_one = parse::<ChatCompletionRequest>("chat_request_stream.json");
    assert_eq!(chat_one.stop, Some(Stop::One("\n".into())));
    assert_eq!(chat_one.stop_sequences(), ["\n"]);
    assert_eq!(serde_json::to_value(&chat_one.stop).unwrap(), json!("\n"));

    let chat_many = parse::<ChatCompletionRequest>("chat_request_sampling.json");
    assert_eq!(chat_many.stop_sequences(), ["\n\n", "END"]);
    assert_eq!(
        serde_json::to_value(&chat_many.stop).unwrap(),
        json!(["\n\n", "END"])
    );

    let legacy = parse::<CompletionRequest>("completion_request_tokens.json");
    assert_eq!(legacy.stop, Some(Stop::Many(vec!["\n".into(), ".".into()])));
    let unset = parse::<CompletionRequest>("completion_request_token_batches.json");
    assert!(unset.stop_sequences().is_empty());
}

#[test]
fn sampling_fields_and_extensions_are_read() {
    let request = parse::<ChatCompletionRequest>("chat_request_sampling.json");
    assert_eq!(request.temperature, Some(0.7));
    assert_eq!(request.n, Some(2));
    assert_eq!(request.effective_max_tokens(), Some(128));
    assert_eq!(request.max_tokens, Some(64));
    assert_eq!(request.frequency_penalty, Some(-0.25));
    let bias = request.logit_bias.as_ref().expect("logit_bias is set");
    assert_eq!(bias.get("50256"), Some(&-100.0));
    assert_eq!(bias.get("1000"), Some(&2.5));
    assert_eq!(request.logprobs, Some(true));
    assert_eq!(request.top_logprobs, Some(2));
    assert!(request.include_usage());
    assert!(matches!(
        &request.response_format,
        Some(ResponseFormat::JsonSchema { json_schema }) if json_schema.name == "haiku"
    ));
    let Some(ToolChoice::Function(choice)) = &request.tool_choice else {
        panic!(
            "expected a named tool choice, got {:?}",
            request.tool_choice
        );
    };
    assert_eq!(choice.function.name, "count_syllables");
    assert_eq!(request.top_k, Some(40));
    assert_eq!(request.min_p, Some(0.05));
    assert_eq!(request.repetition_penalty, Some(1.1));
    assert_eq!(request.ignore_eos, Some(false));
    assert_eq!(request.min_tokens, Some(4));
    assert_eq!(request.stop_token_ids, Some(vec![128001, 128009]));
    assert_eq!(request.skip_special_tokens, Some(true));

    let legacy = parse::<CompletionRequest>("completion_request_full.json");
    assert_eq!(legacy.logprobs, Some(5));
    assert_eq!(legacy.best_of, Some(3));
    assert_eq!(legacy.echo, Some(true));
    assert_eq!(legacy.seed, Some(-7));
    assert_eq!(legacy.top_k, Some(-1));
    assert!(legacy.is_stream());
    assert!(
        !legacy.include_usage(),
        "include_usage is false in the fixture"
    );
}

#[test]
fn content_parts_keep_unknown_types_for_later_refusal() {
    let request = parse::<ChatCompletionRequest>("chat_request_content_parts.json");
    let user = &request.messages[1];
    assert_eq!(user.role, Role::User);
    assert_eq!(user.name.as_deref(), Some("alice"));
    let parts = user.content.as_ref().expect("user content is set").parts();
    let kinds: Vec<&str> = parts.iter().map(ContentPart::kind).collect();
    assert_eq!(
        kinds,
        [
            "text",
            "image_url",
            "image_url",
            "input_audio",
            "file",
            "text"
        ]
    );
    assert!(
        matches!(&parts[4], ContentPart::Unknown(part) if part["file"]["file_id"] == "file-abc123")
    );
    let ContentPart::ImageUrl { image_url } = &parts[1] else {
        panic!("expected an image part, got {:?}", parts[1]);
    };
    assert_eq!(image_url.detail.as_deref(), Some("high"));
    assert_eq!(
        user.text_content(),
        "What's in this image?\nAnd this recording?"
    );

    let assistant = &request.messages[2];
    assert_eq!(
        assistant.refusal.as_deref(),
        Some("I can't help with that.")
    );
    assert!(matches!(
        assistant.content.as_ref().unwrap().parts(),
        [ContentPart::Refusal { .. }]
    ));
}

#[test]
fn a_known_part_with_a_bad_body_is_an_error_not_unknown() {
    let err = parse_str::<ChatCompletionRequest>(
        r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"image_url","image_url":"https://example.invalid/a.png"}]}]}"#,
    )
    .unwrap_err();
    assert!(err.contains("ImageUrl"), "{err}");
}

#[test]
fn tool_history_and_declarations_are_read() {
    let request = parse::<ChatCompletionRequest>("chat_request_tools.json");
    let assistant = &request.messages[1];
    assert_eq!(assistant.content, None, "\"content\": null parses as None");
    let calls = assistant.tool_calls.as_ref().expect("tool calls are set");
    assert_eq!(calls[0].id, "call_abc123");
    assert_eq!(calls[0].function.name, "get_current_weather");
    let tool = &request.messages[2];
    assert_eq!(tool.role, Role::Tool);
    assert_eq!(tool.tool_call_id.as_deref(), Some("call_abc123"));
    assert_eq!(
        request.tool_choice,
        Some(ToolChoice::Mode(ToolChoiceMode::Auto))
    );
    let tools = request.tools.as_ref().expect("tools are set");
    assert_eq!(
        tools[0].function.parameters.as_ref().unwrap()["required"],
        json!(["location"])
    );
}

#[test]
fn unknown_fields_are_ignored_and_not_written() {
    let request = parse::<ChatCompletionRequest>("chat_request_unknown_fields.json");
    assert_eq!(request.model, "gpt-4.1");
    assert_eq!(request.temperature, Some(1.0));
    assert!(request.include_usage());
    assert_eq!(request.messages[0].text_content(), "Hello!");

    let mut expected: Value = parse("chat_request_unknown_fields.json");
    let top = expected.as_object_mut().unwrap();
    assert!(top.remove("chat_template_kwargs").is_some());
    assert!(top.remove("x_trace").is_some());
    assert!(
        expected["messages"][0]
            .as_object_mut()
            .unwrap()
            .remove("weight")
            .is_some()
    );
    assert!(
        expected["stream_options"]
            .as_object_mut()
            .unwrap()
            .remove("include_obfuscation")
            .is_some()
    );
    let written = serde_json::to_value(&request).unwrap();
    assert_same_json(&expected, &written, "unknown fields");
}

#[test]
fn null_optional_fields_read_as_unset() {
    let request = parse_str::<ChatCompletionRequest>(
        r#"{"model":"m","messages":[],"stop":null,"tools":null,"tool_choice":null,
            "stream_options":null,"logit_bias":null,"metadata":null,"temperature":null}"#,
    )
    .unwrap();
    assert_eq!(request.stop, None);
    assert_eq!(request.tools, None);
    assert_eq!(request.tool_choice, None);
    assert_eq!(request.metadata, None);
    assert_eq!(request.temperature, None);
    assert_eq!(
        serde_json::to_value(&request).unwrap(),
        json!({"model":"m","messages":[]})
    );
}

#[test]
fn wrong_types_are_parse_errors() {
    let chat = |body: &str| parse_str::<ChatCompletionRequest>(body).unwrap_err();
    let legacy = |body: &str| parse_str::<CompletionRequest>(body).unwrap_err();
    let messages = r#""messages":[{"role":"user","content":"hi"}]"#;

    let err = chat(&format!(r#"{{"model":"m",{messages},"n":"two"}}"#));
    assert!(
        err.contains(r#"invalid type: string "two", expected u32"#),
        "{err}"
    );
    let err = chat(&format!(
        r#"{{"model":"m",{messages},"temperature":"hot"}}"#
    ));
    assert!(err.contains("expected f64"), "{err}");
    let err = chat(r#"{"model":"m","messages":"hi"}"#);
    assert!(err.contains("invalid type: string"), "{err}");
    let err = chat(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#);
    assert!(
        err.contains("a string or an array of content parts"),
        "{err}"
    );
    let err = chat(r#"{"model":"m","messages":[{"role":"wizard","content":"hi"}]}"#);
    assert!(err.contains("unknown variant `wizard`"), "{err}");
    let err = chat(&format!(r#"{{"model":"m",{messages},"stop":5}}"#));
    assert!(err.contains("a string or an array of strings"), "{err}");
    let err = chat(&format!(r#"{{"model":"m",{messages},"logprobs":3}}"#));
    assert!(err.contains("expected a boolean"), "{err}");
    let err = chat(&format!(
        r#"{{"model":"m",{messages},"tools":[{{"type":"custom","function":{{"name":"f"}}}}]}}"#
    ));
    assert!(err.contains(r#"expected "function""#), "{err}");
    let err = chat(&format!(
        r#"{{"model":"m",{messages},"response_format":{{"type":"xml"}}}}"#
    ));
    assert!(err.contains("unknown variant `xml`"), "{err}");
    let err = chat(&format!("{{{messages}}}"));
    assert!(err.contains("missing field `model`"), "{err}");

    let err = legacy(r#"{"model":"m","prompt":"p","logprobs":true}"#);
    assert!(err.contains("expected u32"), "{err}");
    let err = legacy(r#"{"model":"m","prompt":[1,"a"]}"#);
    assert!(err.contains("invalid type: string"), "{err}");
    let err = legacy(r#"{"model":"m","prompt":{"text":"p"}}"#);
    assert!(err.contains("an array of arrays of token ids"), "{err}");
    let err = legacy(r#"{"model":"m","prompt":"p","max_tokens":-1}"#);
    assert!(err.contains("expected u32"), "{err}");
}

// ---- Responses and chunks ----

#[test]
fn responses_are_read() {
    let response = parse::<ChatCompletionResponse>("chat_response.json");
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, FinishReason::Stop);
    assert_eq!(choice.logprobs, None);
    assert_eq!(response.usage.total_tokens, 29);

    let tools = parse::<ChatCompletionResponse>("chat_response_tool_calls.json");
    assert_eq!(tools.choices[0].finish_reason, FinishReason::ToolCalls);
    assert_eq!(tools.choices[0].message.content, None);
    assert_eq!(
        tools.usage.prompt_tokens_details,
        Some(PromptTokensDetails {
            cached_tokens: 64,
            audio_tokens: None
        })
    );

    let logprobs = parse::<ChatCompletionResponse>("chat_response_logprobs.json");
    let content = logprobs.choices[0]
        .logprobs
        .as_ref()
        .and_then(|l| l.content.as_ref())
        .expect("content logprobs are set");
    assert_eq!(content[0].bytes.as_deref(), Some(&b"Hello"[..]));
    assert_eq!(content[1].top_logprobs[1].token, " there");
    assert_eq!(content[2].bytes, None);
    assert_eq!(
        logprobs.choices[1].finish_reason,
        FinishReason::ContentFilter
    );

    let legacy = parse::<CompletionResponse>("completion_response_logprobs.json");
    let logprobs = legacy.choices[0]
        .logprobs
        .as_ref()
        .expect("logprobs are set");
    assert_eq!(
        logprobs.token_logprobs[0], None,
        "first echoed token has no logprob"
    );
    assert_eq!(logprobs.top_logprobs[0], None);
    assert_eq!(logprobs.text_offset[7], 21);
}

#[test]
fn legacy_top_logprobs_are_written_in_the_order_given() {
    // "!" sorts before "." so a sorted map would write them the other way round.
    let response = parse::<CompletionResponse>("completion_response_logprobs.json");
    let written = serde_json::to_string(&response).unwrap();
    assert!(written.contains(r#"{".":-1.6,"!":-0.4}"#), "{written}");
}

#[test]
fn chunk_usage_has_three_states() {
    let chunks = parse::<Vec<ChatCompletionChunk>>("chat_stream.json");
    let (last, rest) = chunks.split_last().unwrap();
    for chunk in rest {
        assert_eq!(
            chunk.usage,
            Some(None),
            "chunk before the last carries usage: null"
        );
    }
    assert!(last.choices.is_empty());
    assert_eq!(
        last.usage
            .as_ref()
            .and_then(Option::as_ref)
            .map(|u| u.total_tokens),
        Some(11)
    );
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    assert_eq!(
        rest.last().unwrap().choices[0].finish_reason,
        Some(FinishReason::Stop)
    );
    assert_eq!(chunks[1].choices[0].finish_reason, None);

    let tool_chunks = parse::<Vec<ChatCompletionChunk>>("chat_stream_tool_calls.json");
    assert!(tool_chunks.iter().all(|chunk| chunk.usage.is_none()));
    let first_call = &tool_chunks[0].choices[0].delta.tool_calls.as_ref().unwrap()[0];
    assert_eq!(
        first_call.id.as_deref(),
        Some("call_DdmO9pD3xa9XTPNJ32zg2hcA")
    );
    let arguments: String = tool_chunks
        .iter()
        .flat_map(|chunk| &chunk.choices)
        .filter_map(|choice| choice.delta.tool_calls.as_ref())
        .flatten()
        .filter_map(|call| call.function.as_ref()?.arguments.as_deref())
        .collect();
    assert_eq!(arguments, r#"{"location": "Boston, MA"}"#);

    let legacy = parse::<Vec<CompletionChunk>>("completion_stream.json");
    assert_eq!(legacy[0].usage, Some(None));
    assert_eq!(legacy[3].usage, Some(Some(Usage::new(5, 2))));
}

#[test]
fn delta_with_null_content_parses() {
    // OpenAI sends `"content": null` in the first chunk of a tool call; it reads as unset.
    let chunk = parse_str::<ChatCompletionChunk>(
        r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m",
            "choices":[{"index":0,"delta":{"role":"assistant","content":null,"refusal":null},
            "logprobs":null,"finish_reason":null}]}"#,
    )
    .unwrap();
    assert_eq!(chunk.choices[0].delta.content, None);
}

#[test]
fn chunks_write_openai_nulls() {
    let content = ChatChunkChoice {
        delta: ChatDelta {
            content: Some("Hi".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let with_usage = ChatCompletionChunk::new("c", 7, "m", vec![content.clone()], true);
    assert_eq!(
        serde_json::to_value(&with_usage).unwrap(),
        json!({
            "id": "c", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": null, "finish_reason": null}],
            "usage": null
        })
    );
    let without_usage =
        serde_json::to_value(ChatCompletionChunk::new("c", 7, "m", vec![content], false)).unwrap();
    assert!(without_usage.get("usage").is_none(), "{without_usage}");

    let last = ChatCompletionChunk::usage_only("c", 7, "m", Usage::new(3, 4));
    assert_eq!(
        serde_json::to_value(&last).unwrap(),
        json!({
            "id": "c", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        })
    );

    let legacy = CompletionChunk::new(
        "l",
        7,
        "m",
        vec![CompletionChunkChoice {
            text: "x".into(),
            ..Default::default()
        }],
        true,
    );
    assert_eq!(
        serde_json::to_value(&legacy).unwrap(),
        json!({
            "id": "l", "object": "text_completion", "created": 7, "model": "m",
            "choices": [{"text": "x", "index": 0, "logprobs": null, "finish_reason": null}],
            "usage": null
        })
    );
    let legacy_last =
        serde_json::to_value(CompletionChunk::usage_only("l", 7, "m", Usage::new(1, 1))).unwrap();
    assert_eq!(legacy_last["choices"], json!([]));
    assert_eq!(legacy_last["usage"]["total_tokens"], 2);
}

#[test]
fn whole_responses_write_openai_nulls() {
    let response = ChatCompletionResponse {
        id: "chatcmpl-1".into(),
        object: ChatCompletionObject,
        created: 7,
        model: "m".into(),
        system_fingerprint: None,
        service_tier: None,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatCompletionMessage::assistant("Hi"),
            logprobs: None,
            finish_reason: FinishReason::Length,
        }],
        usage: Usage::new(1, 1),
    };
    assert_eq!(
        serde_json::to_value(&response).unwrap(),
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hi", "refusal": null},
                "logprobs": null,
                "finish_reason": "length"
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        })
    );
}

#[test]
fn a_body_labelled_as_another_object_is_refused() {
    let mut chunk: Value = parse("chat_response.json");
    chunk["object"] = json!("chat.completion.chunk");
    let err = serde_json::from_value::<ChatCompletionResponse>(chunk)
        .unwrap_err()
        .to_string();
    assert!(err.contains(r#"expected "chat.completion""#), "{err}");
}

// ---- Models and errors ----

#[test]
fn models_list_is_built_and_read() {
    let list = ModelList::new(vec![Model::new("gpt-4.1", 1686935002, "openai")]);
    let model: Model = parse("model.json");
    assert_eq!(list.data[0], model);
    assert_eq!(
        serde_json::to_value(&list).unwrap(),
        json!({"object": "list", "data": [
            {"id": "gpt-4.1", "object": "model", "created": 1686935002, "owned_by": "openai"}
        ]})
    );
    assert_eq!(parse::<ModelList>("models_list.json").data.len(), 3);
}

#[test]
fn error_constructors_match_openai_bodies() {
    assert_eq!(
        ErrorResponse::model_not_found("gpt-9"),
        parse::<ErrorResponse>("error_model_not_found.json")
    );
    let context: ErrorResponse = parse("error_context_length.json");
    assert_eq!(
        ErrorResponse::context_length_exceeded(context.error.message.clone()),
        context
    );
    let server: ErrorResponse = parse("error_server.json");
    assert_eq!(
        ErrorResponse::server_error(server.error.message.clone()),
        server
    );
    let rate: ErrorResponse = parse("error_rate_limit.json");
    assert_eq!(
        ErrorResponse::rate_limit_exceeded(RateLimitKind::Requests, rate.error.message.clone()),
        rate
    );

    let key: ErrorResponse = parse("error_invalid_api_key.json");
    let built = ErrorResponse::invalid_api_key();
    assert_eq!(
        (&built.error.kind, &built.error.param, &built.error.code),
        (&key.error.kind, &key.error.param, &key.error.code)
    );
    assert_eq!(
        ErrorResponse::missing_api_key().error.kind,
        INVALID_REQUEST_ERROR
    );

    let invalid = ErrorResponse::invalid_parameter("top_p", "`top_p` must be in (0, 1]");
    assert_eq!(
        serde_json::to_value(&invalid).unwrap(),
        json!({"error": {
            "message": "`top_p` must be in (0, 1]",
            "type": "invalid_request_error",
            "param": "top_p",
            "code": null
        }})
    );
    let event: StreamErrorEvent = ErrorResponse::server_error("engine failed");
    assert_eq!(
        serde_json::to_value(&event).unwrap(),
        json!({"error": {"message": "engine failed", "type": "server_error", "param": null, "code": null}})
    );
}
