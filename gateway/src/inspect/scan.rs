//! A lazy scan of a JSON object's top level: each member's key and the byte range of its value,
//! without building the values. Strings (where the bulk of a long prompt is) are skipped with
//! `memchr` (SIMD) to their closing quote; nested arrays and objects are skipped by depth. The
//! members the gateway needs are then read from their ranges alone, so the cost of inspecting
//! a request does not grow with the messages it carries.
//!
//! Checked: the top level is one object, keys are strings, brackets balance, strings close,
//! nothing follows the object. Not checked: the values the gateway does not read (scalars inside
//! messages, say): the upstream reads those and says what is wrong with them.

use std::ops::Range;

/// One top-level member: its key (unescaped) and where its value lies in the body.
pub struct Member<'a> {
    pub key: std::borrow::Cow<'a, str>,
    pub value: Range<usize>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `i` is at an opening quote; returns the index after the closing one.
fn skip_string(b: &[u8], mut i: usize) -> Result<usize, String> {
    i += 1;
    loop {
        let at = memchr::memchr2(b'"', b'\\', &b[i..])
            .ok_or_else(|| "a string is not closed".to_owned())?;
        i += at;
        if b[i] == b'\\' {
            // The escaped byte is never the end (a \uXXXX escape holds no quote or backslash).
            i += 2;
            if i > b.len() {
                return Err("a string is not closed".into());
            }
        } else {
            return Ok(i + 1);
        }
    }
}

/// `i` is at a value; returns the index after it.
fn skip_value(b: &[u8], i: usize) -> Result<usize, String> {
    match b.get(i) {
        None => Err("a value is missing".into()),
        Some(b'"') => skip_string(b, i),
        Some(b'{' | b'[') => {
            // The closers still open, innermost last.
            let mut open: Vec<u8> = Vec::new();
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' => open.push(b'}'),
                    b'[' => open.push(b']'),
                    c @ (b'}' | b']') => {
                        if open.pop() != Some(c) {
                            return Err(format!("unexpected `{}`", c as char));
                        }
                        if open.is_empty() {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err("an array or object is not closed".into())
        }
        Some(_) => {
            // A number, true, false or null: up to the next delimiter.
            let end = b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .map_or(b.len(), |p| i + p);
            if end == i {
                Err(format!("unexpected `{}`", b[i] as char))
            } else {
                Ok(end)
            }
        }
    }
}

/// The members of the JSON object `b`, in order.
pub fn members(b: &[u8]) -> Result<Vec<Member<'_>>, String> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return Err("the body is not a JSON object".into());
    }
    i = skip_ws(b, i + 1);
    let mut out = Vec::new();
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return Err("expected a key".into());
            }
            let key_end = skip_string(b, i)?;
            let raw = &b[i..key_end];
            let key = match std::str::from_utf8(&raw[1..raw.len() - 1]) {
                Ok(k) if !k.contains('\\') => std::borrow::Cow::Borrowed(k),
                _ => std::borrow::Cow::Owned(
                    serde_json::from_slice::<String>(raw).map_err(|e| format!("a key: {e}"))?,
                ),
            };
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return Err(format!("expected `:` after {key:?}"));
            }
            i = skip_ws(b, i + 1);
            let end = skip_value(b, i)?;
            out.push(Member { key, value: i..end });
            i = skip_ws(b, end);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err("expected `,` or `}` between members".into()),
            }
        }
    }
    if skip_ws(b, i) != b.len() {
        return Err("trailing characters after the object".into());
    }
    Ok(out)
}

/// The object `body` (scanned into `members`) with member `key` set to the JSON `value`: its
/// value replaced where it stands, or the member added first. Every other byte is the
/// client's. `key` is one of ours (it needs no escaping).
pub fn set_member(body: &[u8], members: &[Member<'_>], key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + key.len() + value.len() + 4);
    match members.iter().find(|m| m.key == key) {
        Some(m) => {
            out.extend_from_slice(&body[..m.value.start]);
            out.extend_from_slice(value);
            out.extend_from_slice(&body[m.value.end..]);
        }
        None => {
            let open = body.iter().position(|&c| c == b'{').expect("an object");
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(format!("\"{key}\":").as_bytes());
            out.extend_from_slice(value);
            if !members.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(&body[open + 1..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<(String, String)> {
        members(text.as_bytes())
            .unwrap()
            .into_iter()
            .map(|m| (m.key.into_owned(), text[m.value].to_owned()))
            .collect()
    }

    #[test]
    fn members_and_their_raw_values() {
        let text = r#" { "model" : "m", "messages":[{"role":"user","content":"a \"quoted\" ] } \\ text"}],
            "n":2, "stream":true, "x":null, "o":{"a":[1,{"b":"}"}]}, "k\u0065y": -1.5e3 } "#;
        let m = keys(text);
        assert_eq!(m[0], ("model".into(), "\"m\"".into()));
        assert!(m[1].1.starts_with('[') && m[1].1.ends_with(']'));
        assert_eq!(m[2], ("n".into(), "2".into()));
        assert_eq!(m[3], ("stream".into(), "true".into()));
        assert_eq!(m[4], ("x".into(), "null".into()));
        assert_eq!(m[5].1, r#"{"a":[1,{"b":"}"}]}"#);
        assert_eq!(m[6], ("key".into(), "-1.5e3".into()));
        assert!(keys("{}").is_empty());
    }

    #[test]
    fn a_member_is_replaced_in_place_or_added_first() {
        let set = |text: &str, key: &str, value: &str| {
            let m = members(text.as_bytes()).unwrap();
            String::from_utf8(set_member(text.as_bytes(), &m, key, value.as_bytes())).unwrap()
        };
        assert_eq!(
            set(r#"{"a":1, "model" : "x","b":[2]}"#, "model", r#""y""#),
            r#"{"a":1, "model" : "y","b":[2]}"#
        );
        assert_eq!(
            set(r#" {"a":1}"#, "model", r#""y""#),
            r#" {"model":"y","a":1}"#
        );
        assert_eq!(set("{}", "model", r#""y""#), r#"{"model":"y"}"#);
    }

    #[test]
    fn malformed_bodies_are_errors_never_panics() {
        for bad in [
            "",
            "[]",
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":1",
            "{\"a\":1,}",
            "{\"a\":\"x}",
            "{\"a\":[1,2}",
            "{a:1}",
            "{\"a\":1} x",
            "{\"a\":[1}}",
            "{\"a\":\"\\",
            "{\"a\" 1}",
            "{\"a\":,}",
        ] {
            assert!(members(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = members(&bytes);
        }

        #[test]
        fn agrees_with_serde_on_valid_objects(keys in proptest::collection::vec("[a-z\"\\\\ ]{0,6}", 0..5), text in "[ -~]{0,40}") {
            let mut obj = serde_json::Map::new();
            for (i, k) in keys.iter().enumerate() {
                obj.insert(k.clone(), serde_json::json!([text, {"n": i, "t": text}]));
            }
            let body = serde_json::to_vec(&serde_json::Value::Object(obj.clone())).unwrap();
            let found = members(&body).unwrap();
            proptest::prop_assert_eq!(found.len(), obj.len());
            for m in found {
                let v: serde_json::Value = serde_json::from_slice(&body[m.value.clone()]).unwrap();
                proptest::prop_assert_eq!(&v, &obj[m.key.as_ref()]);
            }
        }
    }
}
