//! The gate: one tower layer in front of every router (gRPC, HTTP and
//! metrics), so the access rules live in one place. It puts the call in an
//! API group, reads the peer address the connection put in the request's
//! extensions and the `authorization` header (gRPC metadata is a header),
//! and either passes the call on or answers it: a trailers-only gRPC status
//! for gRPC requests, an HTTP status with a JSON error otherwise.
//!
//! It fails closed: a call it cannot classify is answered by the gate and
//! never reaches a handler. On the gRPC port it wraps the whole router and
//! classifies by the exact method path; on the HTTP ports it is a
//! `route_layer`, so it runs after routing and classifies by the template
//! the router matched (`MatchedPath`). Paths no route matches go to the
//! router's fallback, which only answers 404.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use axum::body::Body;
use futures::future::{Either, Ready, ready};
use http::{HeaderValue, Request, Response, StatusCode, header};

use axum::extract::MatchedPath;

use super::auth::{Policy, Verdict};
use super::groups::{ApiGroup, grpc_group, http_group};
use crate::ports::PeerAddr;

/// How the gate finds a call's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classify {
    /// By the exact gRPC method path (the layer wraps the whole router).
    GrpcMethod,
    /// By the route template the router matched (the layer is a
    /// `route_layer`); a request without one is refused.
    MatchedRoute,
}

impl Classify {
    fn group<B>(self, request: &Request<B>) -> Option<ApiGroup> {
        match self {
            Classify::GrpcMethod => grpc_group(request.uri().path()),
            Classify::MatchedRoute => request
                .extensions()
                .get::<MatchedPath>()
                .and_then(|matched| http_group(matched.as_str())),
        }
    }
}

/// Applies the current [`Policy`] to every call.
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<ArcSwap<Policy>>,
    classify: Classify,
}

impl AuthLayer {
    pub fn new(policy: Arc<ArcSwap<Policy>>, classify: Classify) -> AuthLayer {
        AuthLayer { policy, classify }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            policy: Arc::clone(&self.policy),
            classify: self.classify,
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Arc<ArcSwap<Policy>>,
    classify: Classify,
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
        // Fail closed: what has no group is answered here.
        let Some(group) = self.classify.group(&request) else {
            tracing::debug!(path = request.uri().path(), "unclassified call refused");
            let path = request.uri().path();
            let response = if is_grpc(&request) || self.classify == Classify::GrpcMethod {
                tonic::Status::unimplemented(format!("no method {path} on this port")).into_http()
            } else {
                json_error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"))
            };
            return Either::Right(ready(Ok(response)));
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
            json_error(status, message)
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

fn json_error(status: StatusCode, message: String) -> Response<Body> {
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
