//! Small response builders shared by every route file.

use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};

use super::error::ApiError;

pub type ApiResult = Result<Response, ApiError>;

pub fn json<T: Serialize + ?Sized>(value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(body.into());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn json_status<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    let mut r = json(value);
    *r.status_mut() = status;
    r
}

pub fn text(body: String) -> Response {
    let mut r = Response::new(body.into());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// 200 with an empty body (what the original answered to most POSTs).
pub fn empty() -> Response {
    warp::reply().into_response()
}

pub fn no_content() -> Response {
    let mut r = empty();
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// Parse a path segment as a non-negative integer, naming the field when it is not one.
pub fn uint<T: TryFrom<u64>>(field: &'static str, raw: &str) -> Result<T, ApiError> {
    match raw.parse::<i128>() {
        Ok(n) if n < 0 => Err(ApiError::bad(field, format!("must not be negative (got {n})"))),
        Ok(n) => u64::try_from(n).ok().and_then(|n| T::try_from(n).ok()).ok_or_else(|| ApiError::bad(field, format!("{n} is too large"))),
        Err(_) => Err(ApiError::bad(field, format!("must be an integer (got {raw:?})"))),
    }
}

/// Parse a JSON body into `T`, naming what was wrong.
pub fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadBody(e.to_string()))
}
