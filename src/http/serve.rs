//! Serving the router to the network without letting strangers hold kiln's memory or its
//! shutdown: a cap on open connections and on those of any one peer (so one client cannot
//! take the pool a health check needs), a deadline for request headers, small header buffers,
//! and a shutdown that gives open connections a short grace and then closes them.
//!
//! `axum::serve` has none of these knobs; hyper's connection builder has them all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The largest request head (request line and headers) kiln reads. Webhook senders and
/// Prometheus send a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// How the server treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections open at once from one peer address; more are closed at once.
    pub max_connections_per_peer: usize,
    /// How long a client may take to send a request's headers (also the idle time allowed on
    /// a kept-alive connection before its next request).
    pub header_timeout: Duration,
    /// How long open connections get to finish on shutdown before they are closed.
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections finish for
/// `limits.shutdown_grace` and closes the rest.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let peers = Peers::default();
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut full_since_logged = false;
    loop {
        while connections.try_join_next().is_some() {}
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !full_since_logged {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "the HTTP server has as many connections open as it allows; new ones wait"
                    );
                    full_since_logged = true;
                }
                tokio::select! {
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if slots.available_permits() > 0 {
            full_since_logged = false;
        }
        let Some(peer_slot) = peers.enter(peer.ip(), limits.max_connections_per_peer) else {
            // Closed at once: one peer holding the pool would starve the health checks.
            tracing::debug!(peer = %peer.ip(), "closing a connection past the per-peer limit");
            drop(stream);
            continue;
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(
                TokioIo::new(stream),
                // The peer's address, for handlers that serve loopback clients only.
                TowerToHyperService::new(app.clone().layer(Extension(ConnectInfo(peer)))),
            );
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            // Errors here are the client's (a reset, a header timeout): nothing to report.
            let _ = connection.await;
            drop(peer_slot);
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!(
            open = connections.len(),
            "HTTP connections still open after the shutdown grace are closed"
        );
    }
    connections.abort_all();
}

/// Connections open per peer address.
#[derive(Debug, Clone, Default)]
struct Peers(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open connection of a peer; counted down when dropped.
struct PeerSlot {
    peers: Peers,
    ip: IpAddr,
}

impl Peers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `ip` if it has fewer than `limit` connections open.
    fn enter(&self, ip: IpAddr, limit: usize) -> Option<PeerSlot> {
        let mut open = self.lock();
        let count = open.entry(ip).or_default();
        if *count >= limit.max(1) {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
