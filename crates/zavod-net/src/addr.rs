//! Peer addresses as people type them: a multiaddr with or without a
//! trailing `/p2p/PEER_ID`, or `host:port`.

use crate::NetError;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::net::IpAddr;

/// Parses `--peer` input into a dialable multiaddr.
pub fn parse_peer_addr(input: &str) -> Result<Multiaddr, NetError> {
    let s = input.trim();
    let bad = |reason: &str| NetError::BadAddress {
        input: input.into(),
        reason: format!(
            "{reason}; expected a multiaddr like /ip4/127.0.0.1/tcp/7070[/p2p/PEER_ID] or host:port"
        ),
    };
    if s.starts_with('/') {
        let addr: Multiaddr = s.parse().map_err(|e| bad(&format!("{e}")))?;
        let has_transport = addr
            .iter()
            .any(|p| matches!(p, Protocol::Tcp(_) | Protocol::Udp(_)));
        if !has_transport {
            return Err(bad("it names no tcp or udp port"));
        }
        return Ok(addr);
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(|| bad("missing ]:port"))?;
        (h, p)
    } else {
        s.rsplit_once(':').ok_or_else(|| bad("missing :port"))?
    };
    let port: u16 = port
        .parse()
        .map_err(|_| bad("port is not a number from 0 to 65535"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    let mut addr = Multiaddr::empty();
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => addr.push(Protocol::Ip4(ip)),
        Ok(IpAddr::V6(ip)) => addr.push(Protocol::Ip6(ip)),
        Err(_) => {
            if host.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') {
                return Err(bad("host is neither an IP address nor a name"));
            }
            addr.push(Protocol::Dns(host.to_owned().into()))
        }
    }
    addr.push(Protocol::Tcp(port));
    Ok(addr)
}

/// Splits a trailing `/p2p/PEER_ID` off an address.
pub fn split_peer(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => (base, Some(peer)),
        Some(other) => {
            base.push(other);
            (base, None)
        }
        None => (base, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(
            parse_peer_addr("127.0.0.1:7070").expect("ok").to_string(),
            "/ip4/127.0.0.1/tcp/7070"
        );
        assert_eq!(
            parse_peer_addr("[::1]:7070").expect("ok").to_string(),
            "/ip6/::1/tcp/7070"
        );
        assert_eq!(
            parse_peer_addr("node-a.tail1234.ts.net:7070")
                .expect("ok")
                .to_string(),
            "/dns/node-a.tail1234.ts.net/tcp/7070"
        );
        let with_peer =
            "/ip4/10.0.0.2/tcp/7070/p2p/12D3KooWGjMCwJhLnDQ6Gz5qNsNoVhH6dAeZgXUKdjEVDdR4Gr6Y";
        let a = parse_peer_addr(with_peer).expect("ok");
        let (base, peer) = split_peer(&a);
        assert_eq!(base.to_string(), "/ip4/10.0.0.2/tcp/7070");
        assert!(peer.is_some());
    }

    #[test]
    fn refused_forms_say_why() {
        for bad in [
            "",
            "localhost",
            "1.2.3.4:99999",
            "/ip4/1.2.3.4",
            "/ip4/999.1.1.1/tcp/1",
            ":80",
            "a b:80",
        ] {
            let e = parse_peer_addr(bad).expect_err(bad).to_string();
            assert!(e.contains("expected a multiaddr"), "{bad}: {e}");
        }
    }
}
