//! The one-port server every service runs: axum routes and tonic services on one listener
//! (HTTP/1.1 and h2c), `/healthz`, `/readyz`, `/metrics`, gRPC health and reflection, tower layers
//! for body limits, deadlines, concurrency limits and load shedding, and graceful shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{BoxError, Json, Router};
use opentelemetry::KeyValue;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument as _;

use crate::error::{ApiError, method_not_allowed_fallback, not_found_fallback};
use crate::metrics::{self, Metrics};
use crate::shutdown::Shutdown;
use crate::telemetry::propagation::TraceParent;

/// A boxed readiness probe: Ok when the dependency answers.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Request limits applied to every route.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted body (axum extractors answer 413 above it).
    pub max_body_bytes: usize,
    /// Requests in flight; beyond it requests are shed with 503.
    pub concurrency_limit: usize,
    /// Deadline for producing a response head.
    pub request_timeout: Duration,
}

impl Limits {
    /// Limits from the shared flags.
    pub fn from_args(common: &crate::config::CommonArgs) -> Self {
        Limits {
            max_body_bytes: common.max_body_bytes,
            concurrency_limit: common.concurrency_limit,
            request_timeout: common.request_timeout,
        }
    }
}

/// Everything a service contributes to its server.
pub struct Parts {
    /// Service name for logs and gRPC health, e.g. `feed`.
    pub name: &'static str,
    /// The service's HTTP routes (state already applied, no fallback).
    pub http: Router,
    /// The service's gRPC services.
    pub grpc: tonic::service::Routes,
    /// Fully-qualified gRPC service names to report SERVING in `grpc.health.v1.Health`.
    pub grpc_names: Vec<&'static str>,
    /// Encoded `FileDescriptorSet`s served by gRPC reflection.
    pub descriptors: Vec<&'static [u8]>,
    /// Named readiness probes for `/readyz`.
    pub checks: Vec<(&'static str, Check)>,
    /// The service's metrics.
    pub metrics: Metrics,
    /// Limits.
    pub limits: Limits,
}

#[derive(Clone)]
struct ProbeState {
    checks: Arc<Vec<(&'static str, Check)>>,
    shutdown: Shutdown,
}

/// Builds the router: service routes + probes + metrics + gRPC health/reflection, under the
/// limit/shedding/timeout/panic layers.
pub async fn router(parts: Parts, shutdown: &Shutdown) -> Result<Router, BoxError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    for name in &parts.grpc_names {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // Report NOT_SERVING as soon as shutdown starts, so balancers drain this instance.
    {
        let shutdown = shutdown.clone();
        let names = parts.grpc_names.clone();
        tokio::spawn(async move {
            shutdown.wait().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            for name in names {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        });
    }
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for set in &parts.descriptors {
        reflection = reflection.register_encoded_file_descriptor_set(set);
    }
    let reflection = reflection.build_v1()?;
    let grpc = parts
        .grpc
        .add_service(health_service)
        .add_service(reflection)
        .into_axum_router();

    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ProbeState {
            checks: Arc::new(parts.checks),
            shutdown: shutdown.clone(),
        });
    let metrics_route = Router::new()
        .route("/metrics", get(metrics::exposition))
        .with_state(parts.metrics.clone());

    let limits = parts.limits;
    tracing::debug!(service = parts.name, grpc = ?parts.grpc_names, "routes assembled");
    let router = grpc
        .merge(parts.http)
        .merge(probes)
        .merge(metrics_route)
        .fallback(not_found_fallback)
        .method_not_allowed_fallback(method_not_allowed_fallback)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overload_response))
                .load_shed()
                .concurrency_limit(limits.concurrency_limit)
                .timeout(limits.request_timeout),
        )
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(
            parts.metrics,
            metrics::track,
        ))
        .layer(axum::middleware::from_fn_with_state(
            parts.name,
            trace_request,
        ));
    Ok(router)
}

/// Routes whose requests get no span: probes and scrapes would drown the interesting traces.
fn untraced(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
        || path.starts_with("/grpc.health.v1.")
        || path.starts_with("/grpc.reflection.")
}

/// The server span of every request, named after the route template (HTTP) or the method's
/// full name (gRPC), child of the caller's context from `traceparent` (HTTP headers and gRPC
/// metadata alike). The request runs as part of `service` so its spans are attributed to it.
async fn trace_request(
    State(service): State<&'static str>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if untraced(path) {
        return crate::telemetry::in_service(service, next.run(request)).await;
    }
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let Some(ratio) = crate::telemetry::root_sample_ratio() else {
        // Span export is off: a `tracing` span, for the logs.
        let span = if grpc {
            tracing::info_span!("grpc.server", otel.name = path.trim_start_matches('/'))
        } else {
            let route = matched_route(&request);
            tracing::info_span!(
                "http.server",
                otel.name = format_args!("{} {route}", request.method())
            )
        };
        return crate::telemetry::in_service(service, next.run(request).instrument(span)).await;
    };
    // Sampling is decided here, before any span exists: a caller's `traceparent` decides (the
    // load generator's per-request choice), else this service's ratio for new traces. An
    // unsampled request runs without spans at all — the largest share of what tracing costs —
    // and passes its unsampled context on.
    let caller = crate::telemetry::propagation::caller(request.headers());
    let sampled = match caller {
        Some(tp) => tp.sampled,
        None => ratio > 0.0 && rand::random::<f64>() < ratio,
    };
    if !sampled {
        let tp = caller.unwrap_or_else(|| TraceParent {
            trace_id: rand::random::<u128>().max(1),
            span_id: rand::random::<u64>().max(1),
            sampled: false,
        });
        return crate::telemetry::in_service(
            service,
            crate::telemetry::propagation::unsampled(tp, next.run(request)),
        )
        .await;
    }
    // The full context (with `tracestate`), only for sampled requests.
    let parent = match caller {
        Some(tp) => crate::telemetry::propagation::caller_context(tp, request.headers()),
        None => opentelemetry::Context::current(),
    };
    // A sampled request's server span is made with the OpenTelemetry SDK directly (see
    // `telemetry::server_span`): it is the parent of everything the request does, `tracing`
    // spans included (they take the active OpenTelemetry context as their parent).
    let (name, mut attributes) = if grpc {
        let full = path.trim_start_matches('/');
        let (svc, method) = full.split_once('/').unwrap_or((full, ""));
        // Method names and route templates are few: kept once (`telemetry::names`), not
        // copied for every span.
        (
            crate::telemetry::names::name(full),
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", crate::telemetry::names::value(svc)),
                KeyValue::new("rpc.method", crate::telemetry::names::value(method)),
            ],
        )
    } else {
        let route = matched_route(&request);
        let method = request.method().as_str();
        (
            crate::telemetry::names::name(&format!("{method} {route}")),
            vec![
                KeyValue::new(
                    "http.request.method",
                    crate::telemetry::names::value(method),
                ),
                KeyValue::new("http.route", crate::telemetry::names::value(route)),
                KeyValue::new("url.path", path.to_owned()),
            ],
        )
    };
    if caller.is_none() {
        // A new trace sampled here: the sampler must not draw again.
        attributes.push(KeyValue::new(crate::telemetry::EDGE_SAMPLED_KEY, true));
    }
    let cx = crate::telemetry::sync_in_service(service, || {
        crate::telemetry::server_span(name, attributes, &parent)
    });
    let response = crate::telemetry::in_service(
        service,
        opentelemetry::context::FutureExt::with_context(next.run(request), cx.clone()),
    )
    .await;
    let span = opentelemetry::trace::TraceContextExt::span(&cx);
    if grpc {
        let code = crate::grpc::grpc_status(response.headers());
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        if code != 0 {
            span.set_status(opentelemetry::trace::Status::error(format!(
                "gRPC status {code}"
            )));
        }
    } else {
        let status = response.status();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if status.is_server_error() {
            span.set_status(opentelemetry::trace::Status::error(status.to_string()));
        }
    }
    span.end();
    response
}

/// The route template a request matched (`unmatched` for none).
fn matched_route(request: &axum::extract::Request) -> &str {
    request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
}

async fn overload_response(err: BoxError) -> Response {
    if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::unavailable(
            "overloaded",
            "server is at its concurrency limit; retry shortly",
            1,
        )
        .into_response()
    } else if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::unavailable("timeout", "request exceeded the server's deadline", 1)
            .into_response()
    } else {
        ApiError::internal(err).into_response()
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("handler panicked").into_response()
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<ProbeState>) -> Response {
    if state.shutdown.is_triggered() {
        return ApiError::unavailable("draining", "shutting down", 5).into_response();
    }
    let results = futures::future::join_all(state.checks.iter().map(|(name, check)| {
        let check = Arc::clone(check);
        async move {
            let outcome = match tokio::time::timeout(Duration::from_secs(2), check()).await {
                Ok(r) => r,
                Err(_) => Err("timed out after 2s".to_owned()),
            };
            (*name, outcome)
        }
    }))
    .await;
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
        .collect();
    if failures.is_empty() {
        let checks: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(name, _)| ((*name).to_owned(), json!("ok")))
            .collect();
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "checks": checks})),
        )
            .into_response()
    } else {
        ApiError::unavailable("not_ready", failures.join("; "), 2).into_response()
    }
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting and drains in-flight
/// requests for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
    grace: Duration,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening (HTTP/1.1 + h2c)");
    let signal = shutdown.clone();
    // Responses are small and latency matters more than packet count.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, router.into_make_service())
        .with_graceful_shutdown(async move { signal.wait().await });
    let server = tokio::spawn(async move { server.await });
    shutdown.wait().await;
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(std::io::Error::other(join)),
        Err(_) => {
            tracing::warn!(%addr, ?grace, "in-flight requests did not finish within the grace period");
            Ok(())
        }
    }
}

/// Why a service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The database could not be reached or migrated.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// The engine could not be set up.
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    /// A peer URL is invalid.
    #[error(transparent)]
    Peer(#[from] crate::grpc::PeerUrlError),
    /// Binding or serving failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// Telemetry could not be set up.
    #[error("telemetry: {0}")]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// Anything else during set-up (router, reflection, hashing parameters).
    #[error("{0}")]
    Setup(String),
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|e| {
        ServeError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e}"),
        ))
    })
}
