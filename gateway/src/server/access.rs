//! Who may connect: the `--allow-cidr` allow-list, `--trusted-proxy` load balancers whose
//! PROXY protocol header (or `X-Forwarded-For`) names the real client, and the per-source cap
//! on concurrent handshakes (`--max-handshakes-per-source`), so one address cannot hold every
//! `--max-concurrent-handshakes` permit with idle connections.
//!
//! Order at accept (see `server::run`): a peer that is not a trusted proxy is checked against
//! the allow-list and takes a per-source permit right away, before any TLS or HTTP work. A
//! trusted proxy's connection is checked once its PROXY header names the client; without a
//! PROXY header, the HTTP layer checks the client from `X-Forwarded-For` (the rightmost
//! address that is not a trusted proxy) and answers 403 when it is not allowed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `2001:db8::/32`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0-{max}"))?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside the network (IPv4-mapped IPv6 addresses match IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Access settings (validated with the rest of the configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessConfig {
    /// Allowed client networks; empty = everyone.
    pub allow: Vec<Cidr>,
    /// Load balancers whose PROXY header / `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Concurrent handshakes per client address (0 = no cap).
    pub max_handshakes_per_source: u32,
}

/// Run-time access control, shared by the accept loop and the handshake tasks.
#[derive(Debug)]
pub struct AccessControl {
    cfg: AccessConfig,
    /// Handshakes in progress per client address. Touched at accept and when a handshake
    /// ends, never per frame.
    in_progress: Mutex<HashMap<IpAddr, u32>>,
}

/// Held while a handshake from one client address is in progress.
#[derive(Debug)]
pub struct SourcePermit {
    access: Arc<AccessControl>,
    ip: IpAddr,
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut map = self
            .access
            .in_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl AccessControl {
    /// Run-time state for `cfg`.
    pub fn new(cfg: AccessConfig) -> Arc<AccessControl> {
        Arc::new(AccessControl {
            cfg,
            in_progress: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.cfg.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// Whether `ip` may connect.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.cfg.allow.is_empty() || self.cfg.allow.iter().any(|c| c.contains(ip))
    }

    /// True when an allow-list is configured.
    pub fn has_allow_list(&self) -> bool {
        !self.cfg.allow.is_empty()
    }

    /// Takes a per-source handshake permit for `ip`; `None` at the cap.
    pub fn source_permit(self: &Arc<Self>, ip: IpAddr) -> Option<SourcePermit> {
        let cap = self.cfg.max_handshakes_per_source;
        let mut map = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if cap > 0 && *n >= cap {
            if *n == 0 {
                map.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(SourcePermit {
            access: self.clone(),
            ip,
        })
    }

    /// The client behind a trusted proxy per `X-Forwarded-For`: the rightmost address that is
    /// not itself a trusted proxy (earlier entries are client-supplied and can be forged).
    pub fn forwarded_client(&self, xff: &str) -> Option<IpAddr> {
        xff.split(',')
            .rev()
            .filter_map(|p| parse_forwarded_addr(p.trim()))
            .find(|ip| !self.is_trusted_proxy(*ip))
    }
}

/// One `X-Forwarded-For` element: an address, possibly `[v6]:port` or `v4:port`.
fn parse_forwarded_addr(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_match_their_networks_only() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.255.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "v4-mapped v6");
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("::1")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }

    #[test]
    fn per_source_permits_are_capped_and_released() {
        let a = AccessControl::new(AccessConfig {
            max_handshakes_per_source: 2,
            ..Default::default()
        });
        let p1 = a.source_permit(ip("1.2.3.4")).unwrap();
        let _p2 = a.source_permit(ip("1.2.3.4")).unwrap();
        assert!(a.source_permit(ip("1.2.3.4")).is_none());
        assert!(
            a.source_permit(ip("5.6.7.8")).is_some(),
            "other sources unaffected"
        );
        drop(p1);
        assert!(a.source_permit(ip("1.2.3.4")).is_some());
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted_address() {
        let a = AccessControl::new(AccessConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            allow: vec!["54.172.60.0/23".parse().unwrap()],
            ..Default::default()
        });
        assert_eq!(
            a.forwarded_client("1.1.1.1, 54.172.60.9, 10.0.0.2"),
            Some(ip("54.172.60.9"))
        );
        assert_eq!(a.forwarded_client("10.0.0.3"), None);
        assert_eq!(
            a.forwarded_client("[2001:db8::1]:443"),
            Some(ip("2001:db8::1"))
        );
        assert!(a.allowed(ip("54.172.61.200")) && !a.allowed(ip("1.1.1.1")));
    }
}
