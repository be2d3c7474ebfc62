//! `/metrics`: Weave's metrics under a `weft_` prefix, plus the data path's
//! counters. Built from a snapshot at each scrape, so nothing is double-counted.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Ctx;
use crate::mesh::ConnState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    state: String,
    r#type: String,
    encryption: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: String,
}

/// Renders every metric.
pub async fn handler(State(ctx): State<Ctx>) -> Response {
    let mut registry = Registry::default();
    let status = ctx.mesh.status().borrow().clone();

    let connections = Family::<ConnLabels, Gauge>::default();
    registry.register("weft_connections", "Control connections by state, data path type and encryption", connections.clone());
    for state in ["established", "connecting", "failed"] {
        for enc in ["yes", "no"] {
            // Every label combination is present, zero when there is none.
            connections
                .get_or_create(&ConnLabels { state: state.into(), r#type: ctx.dp.name().into(), encryption: enc.into() })
                .set(0);
        }
    }
    for c in &status.connections {
        let state = match c.state {
            ConnState::Established => "established",
            ConnState::Connecting => "connecting",
            ConnState::Failed => "failed",
        };
        let labels = ConnLabels {
            state: state.into(),
            r#type: ctx.dp.name().into(),
            encryption: if c.encrypted { "yes" } else { "no" }.into(),
        };
        connections.get_or_create(&labels).inc();
    }

    let terminations = Family::<ReasonLabels, Counter>::default();
    registry.register("weft_connection_terminations", "Control connections that ended, by reason", terminations.clone());
    for reason in crate::mesh::CloseReason::ALL {
        terminations.get_or_create(&ReasonLabels { reason: reason.label().into() }).inc_by(0);
    }
    for (reason, n) in &status.terminations {
        terminations.get_or_create(&ReasonLabels { reason: reason.clone() }).inc_by(*n);
    }

    let peers = Gauge::<i64>::default();
    registry.register("weft_peers", "Peers in the topology, including this one", peers.clone());
    peers.set(status.peers.len() as i64);

    if let Ok(ipam) = ctx.ipam.status().await {
        let ips = Gauge::<i64>::default();
        let max = Gauge::<i64>::default();
        let unreachable = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register("weft_ips", "Addresses allocated on this peer", ips.clone());
        registry.register("weft_max_ips", "Addresses this peer owns", max.clone());
        registry.register("weft_unreachable_ips_percentage", "Share of the range owned by unreachable peers", unreachable.clone());
        ips.set(ipam.used as i64);
        let me = status.name;
        max.set(ipam.peers.iter().filter(|p| Some(p.peer) == me).map(|p| p.owned as i64).sum());
        unreachable.set(ipam.unreachable_percent);
    }

    if let Some(dns) = &ctx.dns {
        use std::sync::atomic::Ordering::Relaxed;
        let entries = Gauge::<i64>::default();
        registry.register("weft_dns_entries", "Live names in the DNS table, all hosts", entries.clone());
        entries.set(dns.entries() as i64);
        let queries = Family::<ReasonLabels, Counter>::default();
        registry.register("weft_dns_queries", "DNS queries served here, by outcome", queries.clone());
        let c = dns.counters();
        for (outcome, n) in [
            ("answered", &c.answered),
            ("nxdomain", &c.nxdomain),
            ("forwarded", &c.forwarded),
            ("failed", &c.failed),
            ("refused", &c.refused),
            ("rate_limited", &c.rate_limited),
            ("overloaded", &c.overloaded),
        ] {
            queries.get_or_create(&ReasonLabels { reason: outcome.into() }).inc_by(n.load(Relaxed));
        }
        let in_flight = Gauge::<i64>::default();
        registry.register("weft_dns_forwards_in_flight", "Queries being forwarded upstream now", in_flight.clone());
        in_flight.set(c.in_flight.load(Relaxed) as i64);
    }

    let endpoints = Gauge::<i64>::default();
    registry.register("weft_endpoints", "Endpoints in the gossiped table, all hosts", endpoints.clone());
    endpoints.set(ctx.table.all().iter().map(|e| e.endpoints.len() as i64).sum());

    if let Ok(stats) = ctx.dp.stats().await {
        let packets = Family::<PathLabels, Counter>::default();
        let bytes = Family::<PathLabels, Counter>::default();
        let drops = Family::<ReasonLabels, Counter>::default();
        registry.register("weft_datapath_packets", "Packets forwarded by the kernel data path, by path", packets.clone());
        registry.register("weft_datapath_bytes", "Bytes forwarded by the kernel data path, by path", bytes.clone());
        registry.register("weft_datapath_drops", "Packets the kernel data path dropped, by reason", drops.clone());
        for (path, c) in &stats.paths {
            packets.get_or_create(&PathLabels { path: (*path).into() }).inc_by(c.packets);
            bytes.get_or_create(&PathLabels { path: (*path).into() }).inc_by(c.bytes);
        }
        for (reason, c) in &stats.drops {
            drops.get_or_create(&ReasonLabels { reason: (*reason).into() }).inc_by(c.packets);
        }
    }

    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}
