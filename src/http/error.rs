//! The one place where failures become HTTP statuses, and the one JSON error envelope:
//! `{"error":{"code":"…","message":"…"}}`. Bad input is 4xx and has changed nothing; a
//! dependency that cannot answer (store, a restarting actor) is 503.

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::actors::CallError;
use crate::actors::node::NodeError;
use crate::actors::pool::PoolError;
use crate::domain::lifecycle::Refusal;
use crate::domain::pool::PoolInputError;
use crate::images::ImageError;
use crate::lifecycle::LifecycleError;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {reason}")]
    BadParam { field: &'static str, reason: String },
    #[error("request body: {0}")]
    BadBody(String),
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("this route needs the admin token (Authorization: Bearer …)")]
    Unauthorized,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("no route for this path")]
    NoRoute,
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// A refusal with a status and code of its own (image uploads: `offset_mismatch`, …).
    #[error("{message}")]
    Refused { status: StatusCode, code: &'static str, message: String },
}

impl ApiError {
    pub fn bad(field: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError::BadParam { field, reason: reason.into() }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadParam { .. } => (StatusCode::BAD_REQUEST, "invalid_param"),
            ApiError::BadBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            ApiError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Refused { status, code, .. } => (*status, code),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let body = json!({"error": {"code": code, "message": self.to_string()}});
        let mut r = super::reply::json(&body);
        *r.status_mut() = status;
        r
    }
}

impl From<PoolInputError> for ApiError {
    fn from(e: PoolInputError) -> Self {
        match e {
            PoolInputError::UnknownBatch(_) => ApiError::NotFound { code: "unknown_batch", message: e.to_string() },
            PoolInputError::UnknownHandle(_) => ApiError::NotFound { code: "unknown_handle", message: e.to_string() },
            PoolInputError::UnknownVm(_) => ApiError::NotFound { code: "unknown_vm", message: e.to_string() },
            PoolInputError::Invalid { field, reason } => ApiError::BadParam { field, reason },
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Unavailable(format!("store: {e}"))
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Input(i) => i.into(),
            PoolError::NoSuchPool(_) => ApiError::NotFound { code: "unknown_pool", message: e.to_string() },
            PoolError::Exists(_) | PoolError::Busy(..) => ApiError::Conflict(e.to_string()),
            PoolError::Store(s) => s.into(),
            PoolError::Call(c) => c.into(),
        }
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::UnknownNode(_) => ApiError::NotFound { code: "unknown_node", message: e.to_string() },
            NodeError::NoCapacity { .. } | NodeError::Store(_) => ApiError::Unavailable(e.to_string()),
            NodeError::BadCredential => {
                ApiError::Refused { status: StatusCode::UNAUTHORIZED, code: "bad_credential", message: e.to_string() }
            }
            NodeError::Busy(..) => ApiError::Conflict(e.to_string()),
            NodeError::Invalid { field, reason } => ApiError::BadParam { field, reason },
            NodeError::Call(c) => c.into(),
        }
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        let refused = |status, code| ApiError::Refused { status, code, message: e.to_string() };
        match &e {
            ImageError::Invalid { field, reason } => ApiError::BadParam { field, reason: reason.clone() },
            ImageError::Exists(_) => refused(StatusCode::CONFLICT, "exists"),
            ImageError::UploadMismatch { .. } => ApiError::Conflict(e.to_string()),
            ImageError::UnknownUpload(_) => ApiError::NotFound { code: "unknown_upload", message: e.to_string() },
            ImageError::UnknownImage(_) => ApiError::NotFound { code: "unknown_image", message: e.to_string() },
            ImageError::UnknownPiece { .. } => ApiError::NotFound { code: "unknown_piece", message: e.to_string() },
            ImageError::OffsetMismatch { .. } => refused(StatusCode::CONFLICT, "offset_mismatch"),
            ImageError::ChunkTooLarge { .. } => refused(StatusCode::PAYLOAD_TOO_LARGE, "chunk_too_large"),
            ImageError::Incomplete { .. } => refused(StatusCode::CONFLICT, "incomplete"),
            ImageError::ChecksumMismatch { .. } => refused(StatusCode::UNPROCESSABLE_ENTITY, "checksum_mismatch"),
            ImageError::Store(s) => s.clone().into(),
            ImageError::Io(_) | ImageError::NoImageStore => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let refused = |status, code| ApiError::Refused { status, code, message: e.to_string() };
        match &e {
            LifecycleError::Refused(r) => match r {
                Refusal::Invalid { field, reason } => ApiError::BadParam { field, reason: reason.clone() },
                Refusal::Unknown(..) => ApiError::NotFound { code: "unknown_object", message: e.to_string() },
                Refusal::Forbidden(_) => refused(StatusCode::FORBIDDEN, "forbidden"),
                Refusal::BadTransition { .. } => refused(StatusCode::CONFLICT, "bad_transition"),
                Refusal::LimitReached { .. } => refused(StatusCode::CONFLICT, "limit_reached"),
                Refusal::NotSupported(_) => refused(StatusCode::NOT_IMPLEMENTED, "not_supported"),
                Refusal::Busy(_) => refused(StatusCode::CONFLICT, "busy"),
                Refusal::HasChildren { .. } => refused(StatusCode::CONFLICT, "has_children"),
            },
            LifecycleError::UnknownUser(_) => ApiError::NotFound { code: "unknown_user", message: e.to_string() },
            LifecycleError::UserExists(_) => refused(StatusCode::CONFLICT, "exists"),
            LifecycleError::NoStore => ApiError::Unavailable(e.to_string()),
            LifecycleError::Store(s) => s.clone().into(),
        }
    }
}
