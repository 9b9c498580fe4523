//! Request-level tests of Kubernetes writers: a [`kube::Client`] whose HTTP service is a
//! `tower_test` mock, so a test sees every request the writer makes (method, path and query,
//! body) and answers it, with tokio's paused clock timing the retries.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

/// The API server's side of a mocked client.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request the client made, waiting for its answer.
pub struct Call {
    pub method: String,
    /// Path and query, e.g. `/api/v1/nodes/worker-3/status?&force=true&fieldManager=...`.
    pub uri: String,
    pub content_type: Option<String>,
    /// The JSON body; `Null` without one.
    pub body: Value,
    reply: SendResponse<Response<Body>>,
}

pub fn client() -> (kube::Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), ApiServer { handle })
}

impl ApiServer {
    /// The next request; panics if the client is dropped first.
    pub async fn next(&mut self) -> Call {
        self.try_next()
            .await
            .expect("the client made no further request")
    }

    /// The next request if one comes within `wait` (of the paused test clock) and before
    /// the client is dropped.
    pub async fn next_within(&mut self, wait: std::time::Duration) -> Option<Call> {
        tokio::time::timeout(wait, self.try_next())
            .await
            .ok()
            .flatten()
    }

    async fn try_next(&mut self) -> Option<Call> {
        let (request, reply) = self.handle.next_request().await?;
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("a readable body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        };
        Some(Call {
            method,
            uri,
            content_type,
            body,
            reply,
        })
    }
}

impl Call {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// The value of query parameter `key`.
    pub fn query(&self, key: &str) -> Option<&str> {
        let (_, query) = self.uri.split_once('?')?;
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == key)
            .map(|(_, value)| value)
    }

    /// Answers with `status` and a JSON body.
    pub fn respond(self, status: u16, body: Value) {
        let response = Response::builder()
            .status(StatusCode::from_u16(status).expect("a status code"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
            .expect("a response");
        self.reply.send_response(response);
    }

    /// Answers 200 (or 201 for a create) with the request's own body, as the server would
    /// return the object written.
    pub fn ok(self) {
        let status = if self.method == "POST" { 201 } else { 200 };
        let body = self.body.clone();
        self.respond(status, body);
    }

    /// Answers with an API error `Status`.
    pub fn fail(self, code: u16, reason: &str) {
        self.respond(
            code,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": format!("mocked {code}"),
                "reason": reason,
                "code": code,
            }),
        );
    }
}
