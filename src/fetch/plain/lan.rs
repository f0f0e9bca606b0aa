//! Whether an address a stranger announced by mDNS is on one of this
//! host's networks: a `_nix-serve._tcp` record may name any address, and
//! the agent must not be sent off the LAN by one. Pure: the caller passes
//! the host's interface addresses and masks.

use std::net::IpAddr;

/// One network of this host: an interface address and its mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    pub addr: IpAddr,
    pub mask: IpAddr,
}

/// Whether `ip` is on one of `networks` (same family, same masked bits).
pub fn on_networks(ip: IpAddr, networks: &[Network]) -> bool {
    networks.iter().any(|n| match (ip, n.addr, n.mask) {
        (IpAddr::V4(ip), IpAddr::V4(a), IpAddr::V4(m)) => {
            let m = u32::from(m);
            u32::from(ip) & m == u32::from(a) & m
        }
        (IpAddr::V6(ip), IpAddr::V6(a), IpAddr::V6(m)) => {
            let m = u128::from(m);
            u128::from(ip) & m == u128::from(a) & m
        }
        _ => false,
    })
}

/// Where to reach a cache announced at `addrs`: the first IPv4 address on
/// one of `networks` (IPv6 link-local addresses need a scope that a URL
/// does not carry), as `http://address:port`. An announcement with no
/// such address gets why, to show.
pub fn cache_url(
    addrs: &[std::net::SocketAddr],
    networks: &[Network],
) -> Result<crate::fetch::upstream::CacheUrl, String> {
    let on_lan = addrs
        .iter()
        .filter(|a| a.is_ipv4() && a.port() != 0)
        .find(|a| on_networks(a.ip(), networks));
    match on_lan {
        Some(a) => crate::fetch::upstream::CacheUrl::parse(&format!("http://{a}")),
        None => Err(format!(
            "announced at {addrs:?}: no IPv4 address on this host's networks"
        )),
    }
}

/// This host's networks now (none if they cannot be read).
pub fn host_networks() -> Vec<Network> {
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    ifaces
        .into_iter()
        .map(|i| match i.addr {
            if_addrs::IfAddr::V4(a) => Network {
                addr: IpAddr::V4(a.ip),
                mask: IpAddr::V4(a.netmask),
            },
            if_addrs::IfAddr::V6(a) => Network {
                addr: IpAddr::V6(a.ip),
                mask: IpAddr::V6(a.netmask),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(addr: &str, mask: &str) -> Network {
        Network {
            addr: addr.parse().unwrap(),
            mask: mask.parse().unwrap(),
        }
    }

    #[test]
    fn only_addresses_on_a_network_of_this_host_pass() {
        let nets = [
            net("10.77.0.3", "255.255.255.0"),
            net("fe80::1", "ffff:ffff:ffff:ffff::"),
        ];
        assert!(on_networks("10.77.0.9".parse().unwrap(), &nets));
        assert!(!on_networks("10.77.1.9".parse().unwrap(), &nets));
        assert!(!on_networks("1.1.1.1".parse().unwrap(), &nets));
        assert!(on_networks("fe80::99".parse().unwrap(), &nets));
        assert!(!on_networks("2001:db8::1".parse().unwrap(), &nets));
        assert!(!on_networks("10.77.0.9".parse().unwrap(), &[]));
    }

    #[test]
    fn an_announced_cache_is_reached_on_the_lan_or_not_at_all() {
        let nets = [net("10.77.0.3", "255.255.255.0")];
        let addrs: Vec<std::net::SocketAddr> = vec![
            "[fe80::5]:5000".parse().unwrap(),
            "8.8.8.8:80".parse().unwrap(),
            "10.77.0.9:5000".parse().unwrap(),
        ];
        assert_eq!(
            cache_url(&addrs, &nets).unwrap().as_str(),
            "http://10.77.0.9:5000"
        );
        let off = cache_url(&addrs[..2], &nets).unwrap_err();
        assert!(off.contains("8.8.8.8"), "{off}");
    }
}
