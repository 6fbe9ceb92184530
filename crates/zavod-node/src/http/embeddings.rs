//! `POST /v1/embeddings`: OpenAI's embeddings endpoint over
//! [`crate::protocol::embed::embed`], with this node as the entry. `input` is a text
//! or a list of texts (token arrays are refused: send the text);
//! `encoding_format` is `float` (the default) or `base64` (little-endian
//! f32, as OpenAI's Python client asks by default); `dimensions` is
//! refused, since zavod's vectors have the model's own width.

use super::{ApiError, Http, bearer, counted, in_flight_permit, parse_body};
use crate::metrics::outcome_of;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<u32>,
    /// Accepted and ignored, as OpenAI's clients may send it.
    #[serde(rename = "user")]
    _user: Option<String>,
}

/// The texts of `input`, or a 400 naming what is wrong with it.
fn texts(input: Value) -> Result<Vec<String>, ApiError> {
    let tokens = || {
        ApiError::bad_field(
            "input",
            "token arrays are not supported: send the text (a string or a list of strings)",
        )
    };
    match input {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Number(_) | Value::Array(_) => Err(tokens()),
                _ => Err(ApiError::bad_field(
                    "input",
                    "input must be a string or a list of strings",
                )),
            })
            .collect(),
        _ => Err(ApiError::bad_field(
            "input",
            "input must be a string or a list of strings",
        )),
    }
}

#[derive(Clone, Copy)]
enum Encoding {
    Float,
    Base64,
}

pub(super) async fn embeddings(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (bearer, body, inputs, encoding) = counted(&st, || {
        let bearer = bearer(&headers)?;
        let mut body: EmbeddingsBody = parse_body(body)?;
        if body.dimensions.is_some() {
            return Err(ApiError::bad_field(
                "dimensions",
                "dimensions is not supported: vectors have the model's own width",
            ));
        }
        let encoding = match body.encoding_format.as_deref() {
            None | Some("float") => Encoding::Float,
            Some("base64") => Encoding::Base64,
            Some(other) => {
                return Err(ApiError::bad_field(
                    "encoding_format",
                    format!("encoding_format must be \"float\" or \"base64\", not {other:?}"),
                ));
            }
        };
        let inputs = texts(std::mem::take(&mut body.input))?;
        zavod_proto::wire::embed::check_inputs(&inputs)
            .map_err(|m| ApiError::bad_field("input", m))?;
        Ok((bearer, body, inputs, encoding))
    })?;
    let _permit = in_flight_permit(&st)?;
    let out = crate::protocol::embed::embed(
        &st.shared,
        bearer.key.public(),
        bearer.token.credential.clone(),
        Some(body.model),
        inputs,
    )
    .await;
    let out = match out {
        Ok(o) => {
            st.shared.metrics.request("http", "ok");
            o
        }
        Err(e) => {
            st.shared.metrics.request("http", outcome_of(e.code));
            return Err(e.into());
        }
    };
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = match encoding {
                Encoding::Float => json!(v),
                Encoding::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut resp = axum::Json(json!({
        "object": "list",
        "data": data,
        "model": out.model,
        "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&zavod_net::peer_label(&out.served_by)) {
        resp.headers_mut().insert("x-zavod-served-by", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_a_text_or_texts_and_token_arrays_are_named() {
        assert_eq!(texts(json!("a")).ok(), Some(vec!["a".to_string()]));
        assert_eq!(
            texts(json!(["a", "b"])).ok(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        let e = texts(json!([1, 2, 3])).expect_err("tokens");
        assert!(e.message.contains("token arrays"), "{}", e.message);
        assert!(texts(json!([[1, 2]])).is_err());
        assert!(texts(json!({"a": 1})).is_err());
        assert!(texts(json!(["a", null])).is_err());
    }
}
