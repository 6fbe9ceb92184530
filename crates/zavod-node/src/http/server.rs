//! The HTTP listener: accepts connections up to `http.max_connections`
//! (one more is closed at once), gives each `http.header_read_timeout_ms`
//! to send a request head (its first byte checked here, the rest by
//! hyper's timer), and serves it with the routes over HTTP/1.1. A connection that stalls or floods costs its own task only.
//!
//! Invariants: a connection holds a place from accept to close; nothing
//! here waits without a deadline except for the next connection.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Serves `routes` on `listener` until the task is aborted.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    routes: Router,
    max_connections: usize,
    header_read_timeout: Duration,
) {
    let places = Arc::new(Semaphore::new(max_connections));
    let mut refused_logged_at: Option<std::time::Instant> = None;
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or a reset before accept: wait a
                // moment rather than spin.
                tracing::debug!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            // Closed by drop; logged at most every ten seconds.
            let now = std::time::Instant::now();
            if refused_logged_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                refused_logged_at = Some(now);
                tracing::warn!(%from, max_connections, "http connection refused: as many open as http.max_connections allows");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(routes.clone());
        tokio::spawn(async move {
            // hyper's head timer starts with the first byte; a connection
            // that sends none is given the same deadline here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            // HTTP/1 only: the automatic version sniffing would read
            // with no deadline of its own.
            let mut builder = Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%from, error = %e, "http connection ended");
            }
            drop(place);
        });
    }
}
