//! `node.tailscale`: where the node listens on the tailnet, and the task
//! that finds zavod peers there (`zavod_net::tailscale`). Tailscale's status
//! is read once at start; when it cannot be (no CLI, logged out, stopped),
//! the node says exactly that and stops, unless other listen addresses
//! reach beyond this machine, in which case it goes on without the tailnet
//! and says so.

use crate::config::NodeConfig;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use std::time::Duration;
use zavod_net::tailscale::{
    Discovery, PeerFilter, TailscaleError, listen_addrs, read_status, tailscale_bin,
};

/// The tailnet as this node uses it.
pub(crate) struct Tailnet {
    /// This machine's tailnet addresses with the tailnet port.
    pub(crate) listen: Vec<Multiaddr>,
    /// This machine's tailnet name.
    pub(crate) name: String,
    pub(crate) discovery: Discovery,
}

/// Whether `addr` can be reached from another machine (not loopback).
fn beyond_this_machine(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => !ip.is_loopback(),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_)) => true,
        _ => false,
    }
}

/// Reads the tailnet at start. `Ok(None)`: no tailnet wanted, or it cannot
/// be used but `listen` reaches other machines (said in the log).
pub(crate) async fn prepare(
    config: &NodeConfig,
    listen: &[Multiaddr],
    quic: bool,
) -> Result<Option<Tailnet>, TailscaleError> {
    if !config.node.tailscale {
        return Ok(None);
    }
    let ts = &config.tailscale;
    let filter = PeerFilter::new(ts.tag.as_deref(), ts.host_pattern.as_deref())?;
    let bin = tailscale_bin();
    let status = match read_status(&bin).await {
        Ok(s) => s,
        Err(e) if listen.iter().any(beyond_this_machine) => {
            tracing::warn!(
                error = %e,
                "going on without tailnet discovery: Tailscale cannot be used, and the node listens on its other addresses"
            );
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let name = if status.me.dns_name.is_empty() {
        status.me.host_name.clone()
    } else {
        status.me.dns_name.clone()
    };
    Ok(Some(Tailnet {
        listen: listen_addrs(&status.me, ts.port, quic),
        name,
        discovery: Discovery {
            bin,
            filter,
            port: ts.port,
            poll: Duration::from_millis(ts.poll_ms),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_stays_on_this_machine() {
        let reach = |a: &str| beyond_this_machine(&a.parse().expect("multiaddr"));
        assert!(!reach("/ip4/127.0.0.1/tcp/7070"));
        assert!(!reach("/ip6/::1/tcp/7070"));
        assert!(reach("/ip4/0.0.0.0/tcp/7070"));
        assert!(reach("/ip4/192.168.1.5/udp/7070/quic-v1"));
        assert!(reach("/dns4/example.org/tcp/7070"));
    }
}
