//! Where pieces come from: the `PieceSource` trait, and `HttpSource`, its HTTP implementation for
//! peers (`GET {base}/pieces/{image}/{index}` and `…/have`, served by `server.rs`) and for the
//! origin, the hive (`GET {base}/api/v1/images/{image}/manifest` and `…/pieces/{index}`, with the
//! node's bearer token). A source only moves bytes; the caller checks them against the manifest.
//! Reading a body pays the node's download limit as the bytes arrive and stops at the expected
//! length, so no peer can make a node read more than a piece.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use secrecy::{ExposeSecret, SecretString};

use super::catalog::Have;
use super::limiter::Bandwidth;
use super::manifest::Manifest;

/// Bytes read before paying the limiter: fewer, larger payments cost fewer timer wake-ups.
const PAY_EVERY: usize = 128 * 1024;

/// One piece of one image, with the length the manifest gives it.
#[derive(Clone, Copy, Debug)]
pub struct PieceRef<'a> {
    pub image: &'a str,
    pub index: usize,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("{source_id} does not hold piece {index}")]
    NotHeld { source_id: String, index: usize },
    #[error("{source_id} answered HTTP {status} for {what}")]
    Status { source_id: String, status: u16, what: String },
    #[error("{source_id}: {error}")]
    Transport { source_id: String, error: String },
    #[error("{source_id} sent {got} bytes for piece {index}, expected {expected}")]
    Length { source_id: String, index: usize, got: u64, expected: u64 },
    #[error("{source_id}: bad answer: {reason}")]
    BadAnswer { source_id: String, reason: String },
    #[error("{0} is the origin: it has no have list")]
    NotAPeer(String),
}

/// A peer or the origin, as the fetcher sees it.
#[async_trait]
pub trait PieceSource: Send + Sync + std::fmt::Debug {
    /// A stable name for logs and counters (a node id, or "origin").
    fn id(&self) -> &str;

    /// The bytes of one piece, paying `down` for them as they arrive.
    async fn get(&self, piece: PieceRef<'_>, down: &Bandwidth) -> Result<Bytes, SourceError>;

    /// Which pieces of `image` this source holds and is fetching (peers only).
    async fn have(&self, image: &str) -> Result<Have, SourceError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Peer,
    Origin,
}

#[derive(Clone, Debug)]
pub struct HttpSource {
    id: String,
    base: String,
    kind: Kind,
    client: reqwest::Client,
    token: Option<SecretString>,
}

impl HttpSource {
    /// A peer's piece server at `base_url` (e.g. `http://10.0.0.7:7300`).
    pub fn peer(id: impl Into<String>, base_url: impl Into<String>, client: reqwest::Client) -> HttpSource {
        HttpSource { id: id.into(), base: trim(base_url.into()), kind: Kind::Peer, client, token: None }
    }

    /// The hive at `base_url`; `token` goes in `Authorization: Bearer …`.
    pub fn origin(base_url: impl Into<String>, token: Option<SecretString>, client: reqwest::Client) -> HttpSource {
        HttpSource { id: "origin".into(), base: trim(base_url.into()), kind: Kind::Origin, client, token }
    }

    /// The image's manifest, from the origin; checked for shape.
    pub async fn manifest(&self, image: &str) -> Result<Manifest, SourceError> {
        if self.kind != Kind::Origin {
            return Err(self.bad("manifests come from the origin"));
        }
        let resp = self.request(format!("{}/api/v1/images/{image}/manifest", self.base)).await?;
        let resp = self.check(resp, "the manifest", None)?;
        let m: Manifest = resp.json().await.map_err(|e| self.bad(e.to_string()))?;
        if m.sha256 != image {
            return Err(self.bad(format!("manifest for {}, asked for {image}", m.sha256)));
        }
        m.validate().map_err(|e| self.bad(e.to_string()))?;
        Ok(m)
    }

    fn piece_url(&self, image: &str, index: usize) -> String {
        match self.kind {
            Kind::Peer => format!("{}/pieces/{image}/{index}", self.base),
            Kind::Origin => format!("{}/api/v1/images/{image}/pieces/{index}", self.base),
        }
    }

    async fn request(&self, url: String) -> Result<reqwest::Response, SourceError> {
        let mut req = self.client.get(url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose_secret());
        }
        req.send().await.map_err(|e| self.transport(e))
    }

    fn check(&self, resp: reqwest::Response, what: &str, index: Option<usize>) -> Result<reqwest::Response, SourceError> {
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND
            && let Some(index) = index
        {
            return Err(SourceError::NotHeld { source_id: self.id.clone(), index });
        }
        if !status.is_success() {
            return Err(SourceError::Status { source_id: self.id.clone(), status: status.as_u16(), what: what.to_string() });
        }
        Ok(resp)
    }

    fn transport(&self, e: reqwest::Error) -> SourceError {
        SourceError::Transport { source_id: self.id.clone(), error: e.without_url().to_string() }
    }

    fn bad(&self, reason: impl Into<String>) -> SourceError {
        SourceError::BadAnswer { source_id: self.id.clone(), reason: reason.into() }
    }
}

#[async_trait]
impl PieceSource for HttpSource {
    fn id(&self) -> &str {
        &self.id
    }

    async fn get(&self, piece: PieceRef<'_>, down: &Bandwidth) -> Result<Bytes, SourceError> {
        let resp = self.request(self.piece_url(piece.image, piece.index)).await?;
        let mut resp = self.check(resp, &format!("piece {}", piece.index), Some(piece.index))?;
        let too_long = |got: u64| SourceError::Length { source_id: self.id.clone(), index: piece.index, got, expected: piece.len };
        if let Some(n) = resp.content_length()
            && n != piece.len
        {
            return Err(too_long(n));
        }
        let mut buf = BytesMut::with_capacity(piece.len as usize);
        let mut unpaid = 0;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
            if (buf.len() + chunk.len()) as u64 > piece.len {
                return Err(too_long((buf.len() + chunk.len()) as u64));
            }
            buf.extend_from_slice(&chunk);
            unpaid += chunk.len();
            if unpaid >= PAY_EVERY {
                down.consume(unpaid as u64).await;
                unpaid = 0;
            }
        }
        down.consume(unpaid as u64).await;
        if buf.len() as u64 != piece.len {
            return Err(too_long(buf.len() as u64));
        }
        Ok(buf.freeze())
    }

    async fn have(&self, image: &str) -> Result<Have, SourceError> {
        if self.kind != Kind::Peer {
            return Err(SourceError::NotAPeer(self.id.clone()));
        }
        let resp = self.request(format!("{}/pieces/{image}/have", self.base)).await?;
        let resp = self.check(resp, "the have list", None)?;
        resp.json().await.map_err(|e| self.bad(e.to_string()))
    }
}

fn trim(mut url: String) -> String {
    while url.ends_with('/') {
        url.pop();
    }
    url
}

#[cfg(test)]
mod tests {
    use warp::Filter;

    use super::*;

    /// A peer that answers every piece request with `body`.
    async fn peer_sending(body: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
        let route = warp::path!("pieces" / String / usize).map(move |_, _| body);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        (url, tokio::spawn(warp::serve(route).incoming(listener).run()))
    }

    #[tokio::test]
    async fn a_peer_cannot_send_more_or_less_than_the_piece() {
        let (url, task) = peer_sending(b"0123456789").await;
        let peer = HttpSource::peer("chatty", url, reqwest::Client::builder().no_proxy().build().unwrap());
        let down = Bandwidth::unlimited();
        let short = peer.get(PieceRef { image: "x", index: 0, len: 4 }, &down).await.unwrap_err();
        assert!(matches!(short, SourceError::Length { got: 10, expected: 4, .. }), "{short}");
        let long = peer.get(PieceRef { image: "x", index: 0, len: 20 }, &down).await.unwrap_err();
        assert!(matches!(long, SourceError::Length { got: 10, expected: 20, .. }), "{long}");
        assert_eq!(&peer.get(PieceRef { image: "x", index: 0, len: 10 }, &down).await.unwrap()[..], b"0123456789");
        assert_eq!(down.total(), 10, "only the bytes read are paid for");
        task.abort();
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_a_transport_error_and_the_origin_has_no_have_list() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let peer = HttpSource::peer("gone", url.clone(), reqwest::Client::builder().no_proxy().build().unwrap());
        let err = peer.get(PieceRef { image: "x", index: 0, len: 1 }, &Bandwidth::unlimited()).await.unwrap_err();
        assert!(matches!(err, SourceError::Transport { .. }), "{err}");
        let origin = HttpSource::origin(format!("{url}/"), None, reqwest::Client::builder().no_proxy().build().unwrap());
        assert_eq!(origin.id(), "origin");
        assert!(matches!(origin.have("x").await, Err(SourceError::NotAPeer(_))));
        assert!(matches!(peer.manifest("x").await, Err(SourceError::BadAnswer { .. })));
    }
}
