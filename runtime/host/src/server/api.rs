//! The OpenAI request and response shapes the server speaks: parsing a request body into a
//! [`Request`] (every field checked by name, so a wrong type gets a 400 that says which),
//! OpenAI-style error bodies, and the JSON of responses and stream chunks.

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use crate::chat::Message;

/// An error as OpenAI returns it: a status and `{"error": {message, type, param, code}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: param.map(str::to_string), code: None }
    }
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: Some(code) }
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// What the prompt of a request is.
#[derive(Clone, Debug)]
pub enum Input {
    Chat(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A parsed chat or completion request. `None` fields take the server's defaults.
#[derive(Clone, Debug)]
pub struct Request {
    pub model: Option<String>,
    pub input: Input,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn number(o: &Map<String, Value>, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| ApiError::bad_request(format!("'{name}' must be a number, not {}", type_name(v)), Some(name)))?;
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::bad_request(format!("'{name}' is {x}, but must be between {lo} and {hi}"), Some(name)));
            }
            Ok(Some(x))
        }
    }
}

fn integer(o: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) => Ok(Some(x)),
            None => Err(ApiError::bad_request(format!("'{name}' must be a non-negative integer, not {}", type_name(v)), Some(name))),
        },
    }
}

fn boolean(o: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match field(o, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad_request(format!("'{name}' must be a boolean, not {}", type_name(v)), Some(name))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Message content: a string, or an array of `{"type": "text", "text": ...}` parts.
fn content(v: Option<&Value>, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::bad_request(format!("{param}: content parts of type '{other}' are not supported (only text)"), Some(&param)))
                    }
                    _ => return Err(ApiError::bad_request(format!("{param}: each part needs \"type\": \"text\" and a string \"text\""), Some(&param))),
                }
            }
            Ok(out)
        }
        Some(v) => Err(ApiError::bad_request(format!("{param} must be a string or an array of text parts, not {}", type_name(v)), Some(&param))),
    }
}

fn messages(v: &Value) -> Result<Vec<Message>, ApiError> {
    let arr = v.as_array().ok_or_else(|| ApiError::bad_request(format!("'messages' must be an array, not {}", type_name(v)), Some("messages")))?;
    if arr.is_empty() {
        return Err(ApiError::bad_request("'messages' is empty", Some("messages")));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let o = m.as_object().ok_or_else(|| ApiError::bad_request(format!("messages[{i}] must be an object"), Some("messages")))?;
        let role = o.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::bad_request(format!("messages[{i}] needs a string 'role'"), Some("messages")))?;
        // The developer role of newer clients is a system message to the template.
        let role = if role == "developer" { "system" } else { role };
        out.push(Message::new(role, &content(o.get("content"), i)?));
    }
    Ok(out)
}

fn prompt(v: &Value) -> Result<Input, ApiError> {
    let bad = || ApiError::bad_request("'prompt' must be a string, an array of one string, or an array of token ids", Some("prompt"));
    match v {
        Value::String(s) => Ok(Input::Text(s.clone())),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => Ok(Input::Text(a[0].as_str().unwrap_or_default().to_string())),
        Value::Array(a) if a.len() > 1 && a.iter().all(Value::is_string) => {
            Err(ApiError::bad_request("several prompts in one request are not supported; send one per request", Some("prompt")))
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.as_u64().is_some_and(|t| t <= u32::MAX as u64)) => {
            Ok(Input::Tokens(a.iter().filter_map(Value::as_u64).map(|t| t as u32).collect()))
        }
        _ => Err(bad()),
    }
}

/// Parses a body of `/v1/chat/completions` (`chat`) or `/v1/completions`.
pub fn parse(body: &[u8], chat: bool) -> Result<Request, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), None))?;
    let o = v.as_object().ok_or_else(|| ApiError::bad_request(format!("the body must be a JSON object, not {}", type_name(&v)), None))?;
    let model = match field(o, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(ApiError::bad_request(format!("'model' must be a string, not {}", type_name(v)), Some("model"))),
    };
    let input = if chat {
        messages(field(o, "messages").ok_or_else(|| ApiError::bad_request("'messages' is required", Some("messages")))?)?
    } else {
        return parse_rest(o, model, prompt(field(o, "prompt").ok_or_else(|| ApiError::bad_request("'prompt' is required", Some("prompt")))?)?);
    };
    parse_rest(o, model, Input::Chat(input))
}

fn parse_rest(o: &Map<String, Value>, model: Option<String>, input: Input) -> Result<Request, ApiError> {
    if let Some(n) = integer(o, "n")? {
        if n != 1 {
            return Err(ApiError::bad_request(format!("'n' is {n}; only n = 1 is supported"), Some("n")));
        }
    }
    // `max_completion_tokens` is the newer name of the same limit.
    let max_tokens = match integer(o, "max_completion_tokens")? {
        Some(x) => Some(x),
        None => integer(o, "max_tokens")?,
    };
    let stop = match field(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(v) => return Err(ApiError::bad_request(format!("'stop' must be a string or an array of strings, not {}", type_name(v)), Some("stop"))),
    };
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => boolean(so, "include_usage")?,
        Some(v) => return Err(ApiError::bad_request(format!("'stream_options' must be an object, not {}", type_name(v)), Some("stream_options"))),
    };
    Ok(Request {
        model,
        input,
        max_tokens: max_tokens.map(|x| x as usize),
        temperature: number(o, "temperature", 0.0, 2.0)?.map(|x| x as f32),
        top_p: number(o, "top_p", 0.0, 1.0)?.map(|x| x as f32),
        top_k: integer(o, "top_k")?.map(|x| x as usize),
        min_p: number(o, "min_p", 0.0, 1.0)?.map(|x| x as f32),
        seed: match field(o, "seed") {
            // Negative seeds are valid in the OpenAI API; they map onto the same 64 bits.
            Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().map(|s| s as u64),
            _ => integer(o, "seed")?,
        },
        stop,
        stream: boolean(o, "stream")?,
        include_usage,
    })
}

/// The `usage` object.
pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked_by_name() {
        let e = parse(br#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#, true).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("must be a number"), "{}", e.message);
        let e = parse(br#"{"messages": "hi"}"#, true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse(b"{not json", true).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse(br#"{"prompt": "x", "n": 2}"#, false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = parse(br#"{"prompt": "x", "top_p": 3}"#, false).unwrap_err();
        assert!(e.message.contains("between 0 and 1"), "{}", e.message);
    }

    #[test]
    fn openai_request_shapes_parse() {
        let r = parse(
            br#"{"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, {"role": "user", "content": "hi"}],
                "max_tokens": 5, "temperature": 0, "stop": "\n", "stream": true, "stream_options": {"include_usage": true}, "seed": -1}"#,
            true,
        )
        .unwrap();
        match &r.input {
            Input::Chat(m) => assert_eq!(m, &vec![Message::new("system", "be brief"), Message::new("user", "hi")]),
            other => panic!("{other:?}"),
        }
        assert_eq!((r.max_tokens, r.temperature, r.stream, r.include_usage, r.seed), (Some(5), Some(0.0), true, true, Some(u64::MAX)));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        let r = parse(br#"{"prompt": [1, 2, 3], "max_completion_tokens": 2}"#, false).unwrap();
        assert!(matches!(r.input, Input::Tokens(ref t) if t == &[1, 2, 3]));
        assert_eq!(r.max_tokens, Some(2));
    }
}
