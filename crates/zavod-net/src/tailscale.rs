//! Tailscale as a way to run a mesh: this machine's tailnet addresses and
//! the zavod peers on the tailnet, as the local `tailscale` CLI reports them
//! (`tailscale status --json`).
//!
//! Reading the status is pure ([`TailnetStatus::parse`]), so recorded
//! fixtures test it; running the CLI is bounded in time and output. Which
//! peers are dialled is [`PeerFilter`]'s: online, and carrying the
//! configured ACL tag or matching the host-name pattern when either is set.
//! [`discover`] re-reads the status every few seconds and dials the peers
//! it admits that are not connected, so machines that come and go are
//! found; a peer reached is a libp2p peer like any other, and the mesh's
//! membership check decides what it may do.
//!
//! Invariants: at most [`MAX_TAILNET_PEERS`] peers are considered per read;
//! every CLI run and every dial has a timeout; the status is never trusted
//! beyond addresses to dial (a peer proves itself by its key and
//! membership, not by what Tailscale calls it).

use crate::Client;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Names the `tailscale` executable when it is not `tailscale` on `PATH`.
pub const TAILSCALE_BIN_ENV: &str = "ZAVOD_TAILSCALE_BIN";
/// Longest a `tailscale status --json` may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest status output read (a tailnet of thousands of machines is a few
/// MiB).
const MAX_STATUS_BYTES: usize = 16 << 20;
/// Peers considered from one status read, at most.
pub const MAX_TAILNET_PEERS: usize = 1_024;

/// Why the tailnet cannot be used, in words that say what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TailscaleError {
    #[error(
        "the Tailscale CLI `{bin}` was not found: install Tailscale (https://tailscale.com/download) and run `tailscale up`, or name the CLI with {TAILSCALE_BIN_ENV}"
    )]
    Missing { bin: String },
    #[error(
        "`{bin} status --json` failed: {detail}; is tailscaled running? Start it (for example `sudo systemctl start tailscaled`), then run `tailscale up`"
    )]
    Failed { bin: String, detail: String },
    #[error("`{bin} status --json` gave no answer within {secs} s; is tailscaled stuck?")]
    Timeout { bin: String, secs: u64 },
    #[error(
        "this machine is not logged in to a tailnet (Tailscale's state is {state}): run `tailscale up` and log in"
    )]
    NeedsLogin { state: String },
    #[error("Tailscale is stopped on this machine: run `tailscale up`")]
    Stopped,
    #[error(
        "Tailscale is not running (its state is {state}): run `tailscale up`, or wait until it has started"
    )]
    NotRunning { state: String },
    #[error("this machine has no tailnet address yet: run `tailscale up`")]
    NoAddress,
    #[error("could not read Tailscale's status: {0}")]
    Parse(String),
    #[error("tailscale.host_pattern {pattern:?} is not a pattern: {reason}")]
    BadPattern { pattern: String, reason: String },
}

/// One machine of the tailnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailnetPeer {
    pub host_name: String,
    /// The MagicDNS name, without its final dot.
    pub dns_name: String,
    /// IPv4 first.
    pub ips: Vec<IpAddr>,
    pub online: bool,
    pub tags: Vec<String>,
}

/// What `tailscale status --json` says, as much as zavod uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailnetStatus {
    pub me: TailnetPeer,
    /// Sorted by host name, then DNS name: the same status gives the same
    /// order.
    pub peers: Vec<TailnetPeer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawStatus {
    #[serde(default)]
    backend_state: String,
    #[serde(rename = "Self")]
    me: Option<RawPeer>,
    #[serde(default)]
    peer: Option<BTreeMap<String, RawPeer>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawPeer {
    #[serde(default)]
    host_name: String,
    #[serde(default, rename = "DNSName")]
    dns_name: String,
    #[serde(default, rename = "TailscaleIPs")]
    tailscale_ips: Option<Vec<String>>,
    #[serde(default)]
    online: bool,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl RawPeer {
    fn into_peer(self) -> TailnetPeer {
        // Addresses that do not parse are skipped, not fatal: one odd
        // entry must not hide the rest of the tailnet.
        let mut ips: Vec<IpAddr> = self
            .tailscale_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        TailnetPeer {
            host_name: self.host_name,
            dns_name: self.dns_name.trim_end_matches('.').to_string(),
            ips,
            online: self.online,
            tags: self.tags.unwrap_or_default(),
        }
    }
}

impl TailnetStatus {
    /// Parses `tailscale status --json`; an error unless Tailscale is
    /// running and this machine has a tailnet address.
    pub fn parse(json: &[u8]) -> Result<TailnetStatus, TailscaleError> {
        let raw: RawStatus =
            serde_json::from_slice(json).map_err(|e| TailscaleError::Parse(e.to_string()))?;
        match raw.backend_state.as_str() {
            "Running" => {}
            "NeedsLogin" | "NeedsMachineAuth" => {
                return Err(TailscaleError::NeedsLogin {
                    state: raw.backend_state,
                });
            }
            "Stopped" => return Err(TailscaleError::Stopped),
            _ => {
                return Err(TailscaleError::NotRunning {
                    state: if raw.backend_state.is_empty() {
                        "unknown".into()
                    } else {
                        raw.backend_state
                    },
                });
            }
        }
        let me = raw.me.ok_or(TailscaleError::NoAddress)?.into_peer();
        if me.ips.is_empty() {
            return Err(TailscaleError::NoAddress);
        }
        let mut peers: Vec<TailnetPeer> = raw
            .peer
            .unwrap_or_default()
            .into_values()
            .map(RawPeer::into_peer)
            .collect();
        peers.sort_by(|a, b| {
            (&a.host_name, &a.dns_name, &a.ips).cmp(&(&b.host_name, &b.dns_name, &b.ips))
        });
        peers.truncate(MAX_TAILNET_PEERS);
        Ok(TailnetStatus { me, peers })
    }
}

/// Which tailnet machines are dialled as zavod peers.
#[derive(Debug, Clone, Default)]
pub struct PeerFilter {
    /// Only machines carrying this ACL tag (e.g. `tag:zavod`).
    tag: Option<String>,
    /// Only machines whose host name matches (`*` and `?` wildcards).
    host_pattern: Option<glob::Pattern>,
}

impl PeerFilter {
    pub fn new(tag: Option<&str>, host_pattern: Option<&str>) -> Result<Self, TailscaleError> {
        let host_pattern = host_pattern
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| TailscaleError::BadPattern {
                    pattern: p.into(),
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        // Tailscale writes tags with their `tag:` prefix; accept either.
        let tag = tag.map(|t| {
            if t.starts_with("tag:") {
                t.to_string()
            } else {
                format!("tag:{t}")
            }
        });
        Ok(PeerFilter { tag, host_pattern })
    }

    /// Whether `peer` is dialled: online, tagged and named as configured.
    pub fn admits(&self, peer: &TailnetPeer) -> bool {
        peer.online
            && !peer.ips.is_empty()
            && self.tag.as_ref().is_none_or(|t| peer.tags.contains(t))
            && self
                .host_pattern
                .as_ref()
                .is_none_or(|p| p.matches(&peer.host_name))
    }
}

fn ip_addr(ip: IpAddr) -> Multiaddr {
    match ip {
        IpAddr::V4(v4) => Multiaddr::empty().with(Protocol::Ip4(v4)),
        IpAddr::V6(v6) => Multiaddr::empty().with(Protocol::Ip6(v6)),
    }
}

/// Where a node listens on the tailnet: TCP on each of this machine's
/// tailnet addresses, and QUIC beside it when `quic`.
pub fn listen_addrs(me: &TailnetPeer, port: u16, quic: bool) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    for &ip in &me.ips {
        out.push(ip_addr(ip).with(Protocol::Tcp(port)));
        if quic {
            out.push(ip_addr(ip).with(Protocol::Udp(port)).with(Protocol::QuicV1));
        }
    }
    out
}

/// Where a tailnet peer's node is dialled: TCP on its first address (IPv4
/// when it has one).
pub fn dial_addr(peer: &TailnetPeer, port: u16) -> Option<Multiaddr> {
    peer.ips
        .first()
        .map(|&ip| ip_addr(ip).with(Protocol::Tcp(port)))
}

/// The Tailscale CLI to run: `$ZAVOD_TAILSCALE_BIN`, else `tailscale`.
pub fn tailscale_bin() -> PathBuf {
    std::env::var_os(TAILSCALE_BIN_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("tailscale"), PathBuf::from)
}

/// Runs `bin status --json` and parses what it says.
pub async fn read_status(bin: &Path) -> Result<TailnetStatus, TailscaleError> {
    let name = bin.display().to_string();
    let run = tokio::process::Command::new(bin)
        .args(["status", "--json"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(STATUS_TIMEOUT, run).await {
        Err(_) => {
            return Err(TailscaleError::Timeout {
                bin: name,
                secs: STATUS_TIMEOUT.as_secs(),
            });
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TailscaleError::Missing { bin: name });
        }
        Ok(Err(e)) => {
            return Err(TailscaleError::Failed {
                bin: name,
                detail: e.to_string(),
            });
        }
        Ok(Ok(out)) => out,
    };
    if out.stdout.len() > MAX_STATUS_BYTES {
        return Err(TailscaleError::Parse(format!(
            "the status is {} bytes, more than {MAX_STATUS_BYTES}",
            out.stdout.len()
        )));
    }
    // A stopped or logged-out Tailscale may still print its JSON (and exit
    // non-zero): its state says more than the exit code.
    match TailnetStatus::parse(&out.stdout) {
        Err(TailscaleError::Parse(_)) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let detail = stderr.trim();
            Err(TailscaleError::Failed {
                bin: name,
                detail: if detail.is_empty() {
                    format!("it exited with {}", out.status)
                } else {
                    detail.chars().take(400).collect()
                },
            })
        }
        other => other,
    }
}

/// How [`discover`] runs.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub bin: PathBuf,
    pub filter: PeerFilter,
    /// The port zavod nodes listen on across the tailnet.
    pub port: u16,
    pub poll: Duration,
}

/// Tailnet host names of the peers reached through discovery, by peer id
/// (for `zavod status`).
pub type TailnetNames = Arc<RwLock<BTreeMap<PeerId, String>>>;

/// Every `d.poll`, reads the tailnet's status and dials each admitted
/// machine that is not connected; runs until the network stops. What
/// failed is logged when it changes, not every round.
pub async fn discover(net: Client, d: Discovery, names: TailnetNames) {
    let mut last_error: Option<TailscaleError> = None;
    // Tailnet address -> the peer id found there.
    let mut found: BTreeMap<Multiaddr, PeerId> = BTreeMap::new();
    loop {
        match read_status(&d.bin).await {
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "tailnet discovery: cannot read Tailscale's status");
                    last_error = Some(e);
                }
            }
            Ok(status) => {
                if last_error.take().is_some() {
                    tracing::info!("tailnet discovery: Tailscale's status reads again");
                }
                for peer in status.peers.iter().filter(|p| d.filter.admits(p)) {
                    let Some(addr) = dial_addr(peer, d.port) else {
                        continue;
                    };
                    if let Some(id) = found.get(&addr)
                        && net.is_connected(*id).await.unwrap_or(false)
                    {
                        continue;
                    }
                    match net.dial(addr.clone()).await {
                        Ok(id) => {
                            tracing::info!(peer = %id, host = %peer.host_name, %addr, "tailnet peer connected");
                            found.insert(addr, id);
                            let name = if peer.dns_name.is_empty() {
                                peer.host_name.clone()
                            } else {
                                peer.dns_name.clone()
                            };
                            match names.write() {
                                Ok(mut n) => {
                                    n.insert(id, name);
                                }
                                Err(p) => {
                                    p.into_inner().insert(id, name);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::debug!(host = %peer.host_name, %addr, error = %e, "tailnet peer not reached");
                        }
                    }
                }
                // Forget addresses no longer on the tailnet, so `found`
                // stays bounded by what the status lists.
                let listed: Vec<Multiaddr> = status
                    .peers
                    .iter()
                    .filter_map(|p| dial_addr(p, d.port))
                    .collect();
                found.retain(|a, _| listed.contains(a));
            }
        }
        if net.is_stopped() {
            return;
        }
        tokio::time::sleep(d.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: &str = r#"{
      "Version": "1.76.1",
      "BackendState": "Running",
      "TailscaleIPs": ["100.101.1.1", "fd7a:115c:a1e0::1"],
      "Self": {
        "ID": "n1", "HostName": "gpu-box", "DNSName": "gpu-box.tail1234.ts.net.",
        "OS": "linux", "TailscaleIPs": ["fd7a:115c:a1e0::1", "100.101.1.1"], "Online": true
      },
      "Peer": {
        "nodekey:b": {
          "HostName": "laptop", "DNSName": "laptop.tail1234.ts.net.", "OS": "macOS",
          "TailscaleIPs": ["100.101.1.2", "fd7a:115c:a1e0::2"], "Online": true,
          "Tags": ["tag:zavod"]
        },
        "nodekey:a": {
          "HostName": "zavod-rack-1", "DNSName": "zavod-rack-1.tail1234.ts.net.",
          "TailscaleIPs": ["100.101.1.3"], "Online": true
        },
        "nodekey:c": {
          "HostName": "old-desktop", "DNSName": "old-desktop.tail1234.ts.net.",
          "TailscaleIPs": ["100.101.1.4"], "Online": false, "Tags": ["tag:zavod"]
        },
        "nodekey:d": {
          "HostName": "v6-only", "DNSName": "v6-only.tail1234.ts.net.",
          "TailscaleIPs": ["fd7a:115c:a1e0::5"], "Online": true, "Tags": ["tag:zavod"]
        }
      },
      "User": {}
    }"#;

    fn names(s: &TailnetStatus, f: &PeerFilter) -> Vec<String> {
        s.peers
            .iter()
            .filter(|p| f.admits(p))
            .map(|p| p.host_name.clone())
            .collect()
    }

    #[test]
    fn a_running_tailnet_gives_addresses_and_online_peers_in_order() {
        let s = TailnetStatus::parse(RUNNING.as_bytes()).expect("parses");
        assert_eq!(s.me.host_name, "gpu-box");
        assert_eq!(s.me.dns_name, "gpu-box.tail1234.ts.net");
        assert!(s.me.ips[0].is_ipv4(), "IPv4 first: {:?}", s.me.ips);
        let all = PeerFilter::default();
        assert_eq!(names(&s, &all), ["laptop", "v6-only", "zavod-rack-1"]);
        let listen: Vec<String> = listen_addrs(&s.me, 7070, true)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            listen,
            [
                "/ip4/100.101.1.1/tcp/7070",
                "/ip4/100.101.1.1/udp/7070/quic-v1",
                "/ip6/fd7a:115c:a1e0::1/tcp/7070",
                "/ip6/fd7a:115c:a1e0::1/udp/7070/quic-v1",
            ]
        );
        let v6 = s
            .peers
            .iter()
            .find(|p| p.host_name == "v6-only")
            .expect("v6");
        assert_eq!(
            dial_addr(v6, 7070).map(|a| a.to_string()).as_deref(),
            Some("/ip6/fd7a:115c:a1e0::5/tcp/7070")
        );
        let laptop = s
            .peers
            .iter()
            .find(|p| p.host_name == "laptop")
            .expect("laptop");
        assert_eq!(
            dial_addr(laptop, 7070).map(|a| a.to_string()).as_deref(),
            Some("/ip4/100.101.1.2/tcp/7070")
        );
    }

    #[test]
    fn a_tag_or_a_host_pattern_narrows_the_peers() {
        let s = TailnetStatus::parse(RUNNING.as_bytes()).expect("parses");
        let tagged = PeerFilter::new(Some("tag:zavod"), None).expect("filter");
        assert_eq!(names(&s, &tagged), ["laptop", "v6-only"]);
        let bare = PeerFilter::new(Some("zavod"), None).expect("filter");
        assert_eq!(names(&s, &bare), ["laptop", "v6-only"]);
        let named = PeerFilter::new(None, Some("zavod-*")).expect("filter");
        assert_eq!(names(&s, &named), ["zavod-rack-1"]);
        let both = PeerFilter::new(Some("tag:zavod"), Some("zavod-*")).expect("filter");
        assert!(names(&s, &both).is_empty());
        assert!(matches!(
            PeerFilter::new(None, Some("[")),
            Err(TailscaleError::BadPattern { .. })
        ));
    }

    #[test]
    fn a_tailnet_that_is_not_up_says_what_to_do() {
        let stopped =
            r#"{"BackendState": "Stopped", "Self": {"HostName": "x", "TailscaleIPs": []}}"#;
        let e = TailnetStatus::parse(stopped.as_bytes()).expect_err("stopped");
        assert_eq!(e, TailscaleError::Stopped);
        assert!(e.to_string().contains("tailscale up"), "{e}");
        let login = r#"{"BackendState": "NeedsLogin", "Self": null, "Peer": null}"#;
        let e = TailnetStatus::parse(login.as_bytes()).expect_err("logged out");
        assert!(matches!(e, TailscaleError::NeedsLogin { .. }));
        assert!(e.to_string().contains("not logged in"), "{e}");
        let starting = r#"{"BackendState": "Starting"}"#;
        assert!(matches!(
            TailnetStatus::parse(starting.as_bytes()),
            Err(TailscaleError::NotRunning { .. })
        ));
        let no_ip =
            r#"{"BackendState": "Running", "Self": {"HostName": "x", "TailscaleIPs": null}}"#;
        assert_eq!(
            TailnetStatus::parse(no_ip.as_bytes()),
            Err(TailscaleError::NoAddress)
        );
        assert!(matches!(
            TailnetStatus::parse(b"not json"),
            Err(TailscaleError::Parse(_))
        ));
    }

    #[tokio::test]
    async fn a_missing_cli_is_named_with_the_fix() {
        let e = read_status(Path::new("/nonexistent/zavod-test/tailscale"))
            .await
            .expect_err("missing");
        assert!(matches!(e, TailscaleError::Missing { .. }), "{e:?}");
        assert!(e.to_string().contains("install Tailscale"), "{e}");
        assert!(e.to_string().contains(TAILSCALE_BIN_ENV), "{e}");
    }
}
