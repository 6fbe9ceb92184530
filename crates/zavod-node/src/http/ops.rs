//! The operator's endpoints: Prometheus metrics, liveness and readiness.

use super::*;

pub(super) async fn metrics(State(st): State<Arc<Http>>) -> Response {
    let shared = &st.shared;
    let m = &shared.metrics;
    let dir = shared.directory.get();
    // Figures that move with time alone are read now.
    if let Some(router) = dir.router
        && let Ok(counts) = ractor::call_t!(router, RouterMsg::PeerCounts, ACTOR_MS)
    {
        for (state, n) in counts {
            m.peers
                .get_or_create(&StateLabels { state })
                .set(i64::from(n));
        }
    }
    if let Some(breaker) = dir.breaker
        && let Ok(states) = ractor::call_t!(breaker, BreakerMsg::States, ACTOR_MS)
    {
        m.breaker.clear();
        for (node, state) in states {
            m.breaker
                .get_or_create(&PeerStateLabels {
                    peer: zavod_net::peer_label(&node),
                    state: state.name(),
                })
                .set(1);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

pub(super) async fn healthz(State(st): State<Arc<Http>>) -> Response {
    let d = st.shared.directory.get();
    if d.router.is_some() && d.memory.is_some() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "actors restarting\n").into_response()
    }
}

/// Ready when some node of the mesh (this one included) serves a model.
pub(super) async fn readyz(State(st): State<Arc<Http>>) -> Response {
    let Some(router) = st.shared.directory.get().router else {
        return (StatusCode::SERVICE_UNAVAILABLE, "router restarting\n").into_response();
    };
    match ractor::call_t!(router, RouterMsg::Models, ACTOR_MS) {
        Ok(models) if !models.is_empty() => {
            let names: Vec<String> = models.into_iter().map(|(o, _)| o.name).collect();
            (StatusCode::OK, format!("ready: {}\n", names.join(", "))).into_response()
        }
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no node of the mesh serves a model yet\n",
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("router: {e}\n")).into_response(),
    }
}
