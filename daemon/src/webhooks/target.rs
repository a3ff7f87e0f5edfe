//! Which webhook targets Kiln may call: http or https URLs whose host is, and resolves to,
//! public addresses only, unless the operator allows private ones (`[webhooks]
//! allow_private`). Checked at submission, and again at every delivery through
//! [`CheckedResolver`], so a name that later resolves to a private address (DNS rebinding)
//! is never connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use url::{Host, Url};

/// How long a name may take to resolve at submission or delivery.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an address is refused, or `None` for a public one.
pub fn refused_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            // An IPv4-mapped address (::ffff:a.b.c.d) is that IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_v4(v4);
            }
            refused_v6(v6)
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if ip.is_private() {
        Some("a private address (RFC 1918)")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (CGNAT, 100.64.0.0/10) address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else {
        None
    }
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if first & 0xfe00 == 0xfc00 {
        Some("a private address (unique local, fc00::/7)")
    } else if first & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

/// Whether a host name is one of the `localhost` names (RFC 6761), which always mean this host.
fn is_localhost_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Checks a webhook URL's form and, unless `allow_private`, its host when that is an address
/// or a `localhost` name. Names are resolved by [`check`] / [`CheckedResolver`].
pub fn check_url(webhook: &str, allow_private: bool) -> Result<Url, String> {
    if webhook.len() > 2048 {
        return Err("longer than 2048 characters".to_string());
    }
    let url = Url::parse(webhook).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err("the scheme must be https or http".to_string());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("it must not carry a user name or password".to_string());
    }
    let host = url.host().ok_or("it has no host")?;
    if !allow_private {
        match host {
            Host::Ipv4(ip) => refuse(IpAddr::V4(ip))?,
            Host::Ipv6(ip) => refuse(IpAddr::V6(ip))?,
            Host::Domain(name) => {
                if is_localhost_name(name) {
                    return Err(format!(
                        "{name} is this host; private and loopback targets are refused"
                    ));
                }
            }
        }
    }
    Ok(url)
}

fn refuse(ip: IpAddr) -> Result<(), String> {
    match refused_address(ip) {
        Some(why) => Err(format!(
            "{ip} is {why}; private and loopback targets are refused"
        )),
        None => Ok(()),
    }
}

/// Resolves a name and refuses it when any of its addresses is refused (or it has none).
pub async fn resolve_checked(name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
        .await
        .map_err(|_| {
            format!(
                "{name} did not resolve within {} s",
                RESOLVE_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("{name} does not resolve: {e}"))?;
    let addrs: Vec<SocketAddr> = found.collect();
    if addrs.is_empty() {
        return Err(format!("{name} resolves to no address"));
    }
    for addr in &addrs {
        if let Some(why) = refused_address(addr.ip()) {
            return Err(format!(
                "{name} resolves to {}, {why}; private and loopback targets are refused",
                addr.ip()
            ));
        }
    }
    Ok(addrs)
}

/// The full check at submission: the URL's form, and unless `allow_private`, every address its
/// host resolves to.
pub async fn check(webhook: &str, allow_private: bool) -> Result<Url, String> {
    let url = check_url(webhook, allow_private)?;
    if !allow_private && let Some(Host::Domain(name)) = url.host() {
        let port = url.port_or_known_default().unwrap_or(443);
        resolve_checked(name, port).await?;
    }
    Ok(url)
}

/// reqwest's resolver for deliveries: resolves names itself and hands reqwest only checked
/// addresses, so the connection goes to an address that passed the check (no second lookup
/// that DNS rebinding could answer differently). With `allow_private` it checks nothing.
#[derive(Debug, Clone, Copy)]
pub struct CheckedResolver {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let name = name.as_str().to_string();
        Box::pin(async move {
            if !allow_private && is_localhost_name(&name) {
                return Err(format!("{name} is this host; refused").into());
            }
            let addrs = if allow_private {
                let found =
                    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((&*name, 0)))
                        .await
                        .map_err(|_| format!("{name} did not resolve in time"))??;
                found.collect::<Vec<_>>()
            } else {
                resolve_checked(&name, 0).await?
            };
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// A resolver for [`reqwest::ClientBuilder::dns_resolver`].
pub fn resolver(allow_private: bool) -> Arc<CheckedResolver> {
    Arc::new(CheckedResolver { allow_private })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn address_classes() {
        for (ip, refused) in [
            ("127.0.0.1", true),
            ("127.8.9.10", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("100.64.0.1", true),
            ("100.127.255.254", true),
            ("100.128.0.1", false),
            ("0.0.0.0", true),
            ("224.0.0.1", true),
            ("255.255.255.255", true),
            ("8.8.8.8", false),
            ("93.184.216.34", false),
            ("::1", true),
            ("::", true),
            ("fc00::1", true),
            ("fd12:3456::1", true),
            ("fe80::1", true),
            ("febf::1", true),
            ("ff02::1", true),
            ("::ffff:10.0.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:8.8.8.8", false),
            ("2606:4700:4700::1111", false),
            ("2001:db8::1", false),
        ] {
            assert_eq!(refused_address(v4(ip)).is_some(), refused, "{ip}");
        }
    }

    #[test]
    fn urls() {
        assert!(check_url("https://example.com/hook", false).is_ok());
        assert!(check_url("http://8.8.8.8:8080/hook", false).is_ok());
        assert!(check_url("https://[2606:4700:4700::1111]/hook", false).is_ok());
        for (url, why) in [
            ("ftp://example.com/hook", "scheme"),
            ("not a url", "relative URL"),
            ("http://127.0.0.1:9000/hook", "loopback"),
            ("http://10.0.0.5/hook", "RFC 1918"),
            ("http://[::1]/hook", "loopback"),
            ("http://[fd00::5]/hook", "fc00::/7"),
            ("http://[fe80::1]/hook", "link-local"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://100.100.1.1/hook", "CGNAT"),
            ("http://localhost:8080/hook", "this host"),
            ("http://api.LOCALHOST./hook", "this host"),
            ("http://0.0.0.0/hook", "unspecified"),
            ("http://user:pw@example.com/hook", "password"),
        ] {
            let err = check_url(url, false).expect_err(url);
            assert!(err.contains(why), "{url}: {err}");
        }
        // Allowed by the operator: addresses pass, the form is still checked.
        assert!(check_url("http://127.0.0.1:9000/hook", true).is_ok());
        assert!(check_url("http://localhost/hook", true).is_ok());
        assert!(check_url("ftp://127.0.0.1/hook", true).is_err());
        let long = format!("https://example.com/{}", "a".repeat(2100));
        assert!(check_url(&long, false).is_err());
    }

    #[tokio::test]
    async fn names_that_resolve_to_private_addresses_are_refused() {
        // A name that resolves (through the system resolver's hosts file) to loopback.
        // `localhost` itself is refused by name; an IP literal needs no resolving.
        let err = resolve_checked("127.0.0.1", 80)
            .await
            .expect_err("loopback");
        assert!(err.contains("loopback"), "{err}");
        // `localhost` resolves through the hosts file to loopback addresses only.
        let err = resolve_checked("localhost", 80)
            .await
            .expect_err("resolves to loopback");
        assert!(err.contains("loopback"), "{err}");
        let err = check("http://localhost.:1/x", false)
            .await
            .expect_err("localhost");
        assert!(err.contains("this host"), "{err}");
        assert!(check("http://127.0.0.1:1/x", true).await.is_ok());
        let err = check("http://no-such-host.invalid/x", false)
            .await
            .expect_err("unresolvable");
        assert!(err.contains("no-such-host.invalid"), "{err}");
    }

    #[tokio::test]
    async fn the_delivery_resolver_hands_out_only_checked_addresses() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let name = |s: &str| reqwest::dns::Name::from_str(s).expect("name");
        // `localhost` is refused by name; `127.0.0.1` handed over as a name is resolved and
        // refused for its address, as a name rebound to a private address would be.
        let strict = CheckedResolver {
            allow_private: false,
        };
        assert!(strict.resolve(name("localhost")).await.is_err());
        assert!(strict.resolve(name("127.0.0.1")).await.is_err());
        let open = CheckedResolver {
            allow_private: true,
        };
        let addrs: Vec<SocketAddr> = open
            .resolve(name("localhost"))
            .await
            .expect("allowed")
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
        // A real client with the strict resolver refuses to connect to a loopback server.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(resolver(false))
            .build()
            .expect("client");
        let err = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .expect_err("refused before connecting");
        assert!(err.is_connect() || err.is_request(), "{err:?}");
    }
}
