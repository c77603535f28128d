//! The server's address as an operator writes it: `host:port`, where host is a DNS name, an
//! IPv4 address or a bracketed IPv6 address. Names are resolved at each connection attempt
//! (a server that moved, e.g. a Kubernetes Service after a failover, is found again).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// Longest DNS name (RFC 1035).
const MAX_HOST: usize = 253;

/// `host:port` of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddr {
    host: String,
    port: u16,
}

/// Why a server address was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "server address {given:?}: {why} (expected HOST:PORT, e.g. fl.example.org:4433, 10.0.0.5:4433 or [2001:db8::5]:4433)"
)]
pub struct AddrError {
    given: String,
    why: &'static str,
}

impl ServerAddr {
    /// The host part: a DNS name or an IP address (without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The UDP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address if the host is an IP address (no resolution needed).
    pub fn ip(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }

    /// The addresses the host resolves to now (IP addresses as they are), within `timeout`.
    pub async fn resolve(&self, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
        if let Some(a) = self.ip() {
            return Ok(vec![a]);
        }
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        match tokio::time::timeout(timeout, lookup).await {
            Err(_) => Err(format!(
                "cannot resolve {}: no answer within {:.0?}",
                self.host, timeout
            )),
            Ok(Err(e)) => Err(format!("cannot resolve {}: {e}", self.host)),
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.take(16).collect();
                if addrs.is_empty() {
                    Err(format!("{} resolves to no address", self.host))
                } else {
                    Ok(addrs)
                }
            }
        }
    }
}

impl From<SocketAddr> for ServerAddr {
    fn from(a: SocketAddr) -> Self {
        Self {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl FromStr for ServerAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| AddrError {
            given: s.chars().take(300).collect(),
            why,
        };
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| err("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| err("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(err("the port is not a number from 1 to 65535"));
        }
        if host.contains(':') || host.starts_with('[') {
            return Err(err("an IPv6 address must be in brackets"));
        }
        if host.is_empty() {
            return Err(err("no host"));
        }
        if host.len() > MAX_HOST {
            return Err(err("the host name is longer than 253 characters"));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !host.trim_end_matches('.').split('.').all(label_ok) {
            return Err(err("the host is not a valid DNS name or IP address"));
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_addresses() {
        let a: ServerAddr = "fl.example.org:4433".parse().unwrap();
        assert_eq!((a.host(), a.port()), ("fl.example.org", 4433));
        assert_eq!(a.ip(), None);
        let a: ServerAddr = "10.0.0.5:4433".parse().unwrap();
        assert_eq!(a.ip(), Some("10.0.0.5:4433".parse().unwrap()));
        let a: ServerAddr = "[2001:db8::5]:4433".parse().unwrap();
        assert_eq!(a.host(), "2001:db8::5");
        assert_eq!(a.to_string(), "[2001:db8::5]:4433");
        let a: ServerAddr = "Localhost:1".parse().unwrap();
        assert_eq!(a.to_string(), "localhost:1");
    }

    #[test]
    fn refuses_what_is_not_an_address() {
        for bad in [
            "",
            "fl.example.org",
            "fl.example.org:",
            "fl.example.org:0",
            "fl.example.org:65536",
            "fl.example.org:x",
            ":4433",
            "2001:db8::5:4433",
            "fl_example.org:4433",
            "-fl.example.org:4433",
            "fl..example.org:4433",
            "fl example.org:4433",
        ] {
            assert!(bad.parse::<ServerAddr>().is_err(), "{bad:?} accepted");
        }
        let long = format!("{}.org:1", "a.".repeat(130));
        assert!(long.parse::<ServerAddr>().is_err());
        let e = "fl.example.org"
            .parse::<ServerAddr>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no port") && e.contains("HOST:PORT"), "{e}");
    }

    #[tokio::test]
    async fn resolves_localhost_without_network() {
        let a: ServerAddr = "localhost:4433".parse().unwrap();
        let addrs = a.resolve(Duration::from_secs(5)).await.unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 4433)
        );
    }
}
