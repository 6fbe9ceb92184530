//! Errors in OpenAI's shape, the bearer's capability token, and request
//! bodies read with the path of whatever is malformed.

use super::*;

// ---------- errors ----------

/// An error in OpenAI's shape.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    pub(super) code: &'static str,
    param: Option<String>,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        ApiError {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
        }
    }

    pub(super) fn bad_field(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = message.into();
        ApiError {
            param: (!param.is_empty()).then_some(param),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    pub(super) fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ErrorFrame> for ApiError {
    fn from(e: ErrorFrame) -> Self {
        let status = match e.code {
            ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::RateLimited | ErrorCode::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ModelUnavailable => StatusCode::NOT_FOUND,
            ErrorCode::NoCapacity => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, outcome_of(e.code), e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; this node serves /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings, /v1/conversations, /metrics, /healthz and /readyz",
    )
}

// ---------- auth ----------

/// Who is asking: the key the capability token carries, and its credential.
pub(super) struct Bearer {
    pub(super) key: Keypair,
    pub(super) token: CapabilityToken,
}

pub(super) fn bearer(headers: &HeaderMap) -> Result<Bearer, ApiError> {
    let unauthorized = |m: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            unauthorized(
                "no credential: send `Authorization: Bearer <token>` with a token from `zavod cap issue`"
                    .into(),
            )
        })?
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not text".into()))?;
    let text = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`".into()))?
        .trim();
    if text.starts_with(CREDENTIAL_TEXT_PREFIX) {
        return Err(unauthorized(
            "this is a credential without its key; over HTTP use the token `zavod cap issue` prints (it starts with zavod-cap-1.)".into(),
        ));
    }
    if !text.starts_with(CAP_TEXT_PREFIX) {
        return Err(unauthorized(
            "the bearer token is not a zavod capability token (zavod-cap-1.…)".into(),
        ));
    }
    let token = CapabilityToken::from_text(text)
        .map_err(|e| unauthorized(format!("bad capability token: {e}")))?;
    Ok(Bearer {
        key: Keypair::from_secret(token.secret),
        token,
    })
}

// ---------- request bodies ----------

/// Whether the body failed because `http.body_read_timeout_ms` passed:
/// the timeout layer's error is somewhere in the rejection's sources.
fn timed_out(r: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(r);
    while let Some(e) = source {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = e.source();
    }
    false
}

pub(super) fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the request body is larger than this node accepts (http.max_body_bytes)",
            )
        } else if timed_out(&r) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request body did not arrive in time (http.body_read_timeout_ms)",
            )
        } else {
            ApiError::bad_field("", format!("cannot read the request body: {r}"))
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let missing = inner
            .to_string()
            .strip_prefix("missing field `")
            .and_then(|r| r.split_once('`'))
            .map(|(f, _)| f.to_string());
        let param = match (path.as_str(), missing) {
            (".", Some(f)) => f,
            (".", None) => String::new(),
            (p, Some(f)) => format!("{p}.{f}"),
            (p, None) => p.to_string(),
        };
        let message = if param.is_empty() {
            format!("malformed request: {inner}")
        } else {
            format!("malformed request at `{param}`: {inner}")
        };
        ApiError::bad_field(param, message)
    })
}
