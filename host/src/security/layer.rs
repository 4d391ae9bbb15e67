//! The gate: one tower layer in front of every router (gRPC, HTTP and
//! metrics), so the access rules live in one place. It classifies the call
//! by path, reads the peer address the connection put in the request's
//! extensions and the `authorization` header (gRPC metadata is a header),
//! and either passes the call on or answers it: a trailers-only gRPC status
//! for gRPC requests, an HTTP status with a JSON error otherwise.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use axum::body::Body;
use futures::future::{Either, Ready, ready};
use http::{HeaderValue, Request, Response, StatusCode, header};

use super::auth::{Policy, Verdict};
use super::groups::classify;
use crate::listen::PeerAddr;

/// Applies the current [`Policy`] to every call.
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<ArcSwap<Policy>>,
}

impl AuthLayer {
    pub fn new(policy: Arc<ArcSwap<Policy>>) -> AuthLayer {
        AuthLayer { policy }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Arc<ArcSwap<Policy>>,
}

impl<S, B> tower::Service<Request<B>> for Auth<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // A path no route answers passes on, to its 404 or UNIMPLEMENTED.
        let Some(group) = classify(request.uri().path()) else {
            return Either::Left(self.inner.call(request));
        };
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let (status, code, message) = match self.policy.load().decide(group, peer, authorization) {
            Verdict::Allow => return Either::Left(self.inner.call(request)),
            Verdict::Unauthenticated(msg) => {
                (StatusCode::UNAUTHORIZED, tonic::Code::Unauthenticated, msg)
            }
            Verdict::PermissionDenied(msg) => {
                (StatusCode::FORBIDDEN, tonic::Code::PermissionDenied, msg)
            }
        };
        tracing::debug!(path = request.uri().path(), %group, ?peer, %message, "call refused");
        let response = if is_grpc(&request) {
            tonic::Status::new(code, message).into_http()
        } else {
            http_refusal(status, message)
        };
        Either::Right(ready(Ok(response)))
    }
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn http_refusal(status: StatusCode, message: String) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"plinth\""),
        );
    }
    response
}
