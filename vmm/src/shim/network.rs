//! A pod's network, as the CNI plugin set it up: an interface with an
//! IPv4 address (and usually a default route) in the network namespace
//! the sandbox's spec names. The shim makes the VM's TAP device in that
//! namespace and joins the two with tc mirred redirects both ways (as Kata
//! Containers does): what arrives on the interface leaves through the TAP
//! to the guest, what the guest sends leaves through the interface. The
//! guest takes the interface's MAC address, IPv4 address, default route
//! and MTU, so the pod's peers see the address CNI gave it; the VMM runs
//! in the namespace. A namespace without such an interface (`ctr run`
//! without `--with-ns`) leaves the VM on the settings' network.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, RouteMessageBuilder};

use devices::virtio::net::tap::Tap;

use crate::config::NetworkConfig;

use super::{Error, Result};

/// The VM's TAP device in a pod's namespace.
pub const TAP: &str = "vmmtap0";
/// tc's handle of an ingress qdisc (`ffff:`).
const INGRESS: u32 = 0xffff_0000;
/// ETH_P_ALL (a filter for every protocol), in network byte order as tc
/// takes it.
const ALL_PROTOCOLS: u16 = 0x0003u16.to_be();

/// A pod's interface joined to its VM's TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The namespace (a path such as /var/run/netns/cni-...).
    pub netns: PathBuf,
    /// CNI's interface (eth0).
    pub interface: String,
    /// Its IPv4 address with the prefix length, "a.b.c.d/len".
    pub address: String,
    pub gateway: Option<Ipv4Addr>,
    pub mac: [u8; 6],
    /// Its MTU (the TAP's and the guest's too).
    pub mtu: Option<u32>,
}

/// What the namespace has: the interface, its index, address and MAC.
struct Found {
    index: u32,
    network: PodNetwork,
}

impl PodNetwork {
    /// Joins the first interface with an IPv4 address in `netns` to a new
    /// TAP device there; `None` when the namespace has no such interface,
    /// or is the shim's own (the host's: a spec that joins it must not
    /// take the host's interface away from it).
    pub fn connect(netns: &Path) -> Result<Option<PodNetwork>> {
        use std::os::unix::fs::MetadataExt;
        let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
        let own = id(Path::new("/proc/self/ns/net"))
            .map_err(|e| net_error(Path::new("/proc/self/ns/net"), "read", e))?;
        if id(netns).map_err(|e| net_error(netns, "open the network namespace", e))? == own {
            log::info!(
                "{} is the host's network namespace: the VM stays on the settings' network",
                netns.display()
            );
            return Ok(None);
        }
        let path = netns.to_path_buf();
        in_namespace(netns, move |handle| async move {
            let Some(found) = find(&handle, &path).await? else {
                return Ok(None);
            };
            let tap = make_tap()?;
            let joined = join(&handle, found.index, &found.network).await;
            if let Err(e) = joined {
                let _ = tap.remove();
                remove_ingress(&handle, found.index).await;
                return Err(e);
            }
            Ok(Some(found.network))
        })
    }

    /// The VM's network: the TAP with the interface's addresses.
    pub fn config(&self) -> NetworkConfig {
        NetworkConfig::Tap {
            tap: TAP.to_string(),
            address: self.address.clone(),
            gateway: self.gateway.map(|g| g.to_string()),
            mac: Some(vmm_agent::format_mac(&self.mac)),
            rate_limit: None,
        }
    }

    /// Opens the namespace, for a child process to enter
    /// ([`enter`]) before it runs.
    pub fn open(&self) -> Result<File> {
        File::open(&self.netns).map_err(|e| net_error(&self.netns, "open", e))
    }
}

/// Undoes [`PodNetwork::connect`] in `netns`, if it was done: removes the
/// TAP device and the interface's redirect (the interface stays CNI's). A
/// namespace already gone has nothing left to undo.
pub fn reset(netns: &Path) {
    if !netns.exists() {
        return;
    }
    let path = netns.to_path_buf();
    let done = in_namespace(netns, move |handle| async move {
        if link_index(&handle, TAP).await.is_none() {
            return Ok(());
        }
        if let Ok(tap) = Tap::open(TAP) {
            let _ = tap.remove();
        }
        if let Some(found) = find(&handle, &path).await? {
            remove_ingress(&handle, found.index).await;
        }
        Ok(())
    });
    if let Err(e) = done {
        log::warn!("the pod's network was not reset: {e}");
    }
}

/// The network a default template of a TAP kind is built with, in a
/// namespace of its own: an address from the documentation range (every
/// sandbox from it gets its pod's).
pub fn template_config() -> NetworkConfig {
    NetworkConfig::Tap {
        tap: TAP.to_string(),
        address: "192.0.2.2/24".into(),
        gateway: None,
        mac: None,
        rate_limit: None,
    }
}

/// Moves the calling process into the network namespace `netns` (a
/// child's pre-exec step: one system call).
pub fn enter(netns: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) on an open namespace file; no memory is passed.
    match unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Runs `work` on a thread of its own in a new network namespace that
/// holds a TAP named [`TAP`] (persistent, this user's): where a pod's TAP
/// template is built by a child `work` starts and waits for. The
/// namespace and the TAP go once the thread and its children have ended.
pub fn in_new_namespace<T: Send>(work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) takes no pointers; it moves this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::Network(format!(
                    "cannot make a network namespace: {e}"
                )));
            }
            // Closed, so the VMM can attach to it.
            drop(make_tap()?);
            let out = work();
            if let Ok(tap) = Tap::open(TAP) {
                let _ = tap.remove();
            }
            out
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Network("the network thread panicked".into())))
    })
}

fn net_error(netns: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Network(format!("cannot {what} {}: {e}", netns.display()))
}

/// Runs `work` with a netlink handle on a thread of its own that has
/// entered the namespace `netns` (the shim's other threads stay where
/// they are).
fn in_namespace<T, F, W>(netns: &Path, work: W) -> Result<T>
where
    T: Send,
    F: std::future::Future<Output = Result<T>>,
    W: FnOnce(Handle) -> F + Send,
{
    let file = File::open(netns).map_err(|e| net_error(netns, "open the network namespace", e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&file).map_err(|e| net_error(netns, "enter the network namespace", e))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| Error::Network(format!("cannot start netlink: {e}")))?;
            runtime.block_on(async {
                // The socket is made here, in the namespace.
                let (connection, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| net_error(netns, "talk netlink in", e))?;
                tokio::spawn(connection);
                work(handle).await
            })
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Network("the network thread panicked".into())))
    })
}

/// The first interface other than loopback and our TAP with an IPv4
/// address, its MAC and the default gateway through it.
async fn find(handle: &Handle, netns: &Path) -> Result<Option<Found>> {
    let failed = |what: &str, e: rtnetlink::Error| net_error(netns, what, e);
    let mut links = handle.link().get().execute();
    let mut candidates = Vec::new();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(|e| failed("list the links of", e))?
    {
        let (mut name, mut mac, mut mtu) = (None, None, None);
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                _ => {}
            }
        }
        if let (Some(name), Some(mac)) = (name, mac) {
            if name != "lo" && name != TAP && mac != [0; 6] {
                candidates.push((link.header.index, name, mac, mtu));
            }
        }
    }
    let mut addresses = handle.address().get().execute();
    let mut address: Option<(usize, Ipv4Addr, u8)> = None;
    while let Some(a) = addresses
        .try_next()
        .await
        .map_err(|e| failed("list the addresses of", e))?
    {
        let v4 = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
            _ => None,
        });
        let is_candidate = candidates.iter().position(|(i, ..)| *i == a.header.index);
        if let (Some(v4), Some(rank)) = (v4, is_candidate) {
            // The first candidate in link order with an address wins.
            if address.as_ref().is_none_or(|(r, ..)| rank < *r) {
                address = Some((rank, v4, a.header.prefix_len));
            }
        }
    }
    let Some((rank, ip, prefix)) = address else {
        return Ok(None);
    };
    let (index, interface, mac, mtu) = candidates.swap_remove(rank);
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut gateway = None;
    while let Some(r) = routes
        .try_next()
        .await
        .map_err(|e| failed("list the routes of", e))?
    {
        if r.header.destination_prefix_length != 0 {
            continue;
        }
        let via = r.attributes.iter().find_map(|attr| match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
            _ => None,
        });
        let out = r.attributes.iter().find_map(|attr| match attr {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if out == Some(index) && via.is_some() {
            gateway = via;
            break;
        }
    }
    Ok(Some(Found {
        index,
        network: PodNetwork {
            netns: netns.to_path_buf(),
            interface,
            address: format!("{ip}/{prefix}"),
            gateway,
            mac,
            mtu,
        },
    }))
}

/// Removes link `index`'s ingress qdisc and so its filters, if it has one.
async fn remove_ingress(handle: &Handle, index: u32) {
    let mut request = handle.qdisc().del(index as i32);
    let header = &mut request.message_mut().header;
    header.parent = TcHandle::INGRESS;
    header.handle = TcHandle::from(INGRESS);
    let _ = request.execute().await;
}

async fn link_index(handle: &Handle, name: &str) -> Option<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    links
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|l| l.header.index)
}

/// Makes the TAP device (persistent, so the jailed VMM can attach to it
/// without privileges) in the calling thread's namespace.
fn make_tap() -> Result<Tap> {
    let tap = Tap::open(TAP).map_err(|e| Error::Network(e.to_string()))?;
    // SAFETY: geteuid(2) cannot fail.
    let uid = unsafe { libc::geteuid() };
    tap.persist(uid)
        .map_err(|e| Error::Network(e.to_string()))?;
    Ok(tap)
}

/// Brings the TAP up with the interface's MTU and redirects every frame
/// arriving on the interface (index `index`) out of the TAP and back.
async fn join(handle: &Handle, index: u32, network: &PodNetwork) -> Result<()> {
    let interface = network.interface.as_str();
    let tap = link_index(handle, TAP)
        .await
        .ok_or_else(|| Error::Network(format!("the TAP device {TAP} vanished")))?;
    let failed = |what: String| {
        move |e: rtnetlink::Error| {
            Error::Network(format!(
                "cannot {what}: {e}; the host kernel needs tc's ingress qdisc, u32 filter and mirred action (modules sch_ingress, cls_u32, act_mirred)"
            ))
        }
    };
    let mut link = rtnetlink::LinkUnspec::new_with_index(tap).up();
    if let Some(mtu) = network.mtu {
        link = link.mtu(mtu);
    }
    handle
        .link()
        .set(link.build())
        .execute()
        .await
        .map_err(failed(format!("bring {TAP} up")))?;
    for (from, from_name, to) in [(index, interface, tap), (tap, TAP, index)] {
        // A redirect left by a shim that was killed goes first.
        remove_ingress(handle, from).await;
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(failed(format!("add an ingress qdisc to {from_name}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS)
            .protocol(ALL_PROTOCOLS)
            .redirect(to)
            .map_err(failed(format!("make the redirect from {from_name}")))?
            .execute()
            .await
            .map_err(failed(format!("redirect {from_name}'s frames")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_own_namespace_is_never_taken() {
        // The shim's (the test's) own namespace, by any of its names.
        for own in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            assert_eq!(PodNetwork::connect(Path::new(own)).unwrap(), None, "{own}");
        }
        let err = PodNetwork::connect(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}
