//! Frames the user-mode network writes itself (DHCP answers, UDP replies,
//! refusals), and the little DNS reading the egress policy needs.

use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame,
    EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::{FlowKey, DNS, GATEWAY, GUEST, NETMASK};

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;

/// An IPv4 frame from `src` (`src_mac`) to `dst` (`dst_mac`), with `body`
/// emitting the `payload_len` bytes after the IP header.
pub(super) fn ip_frame(
    dst_mac: EthernetAddress,
    src_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    body: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let mut buf = vec![0u8; ETH_LEN + IP_LEN + payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut frame);
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    body(packet.payload_mut());
    buf
}

/// A UDP datagram for the guest.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    guest_mac: EthernetAddress,
    gateway_mac: EthernetAddress,
    src: Ipv4Addr,
    src_port: u16,
    dst: Ipv4Addr,
    dst_port: u16,
    data: &[u8],
) -> Vec<u8> {
    ip_frame(
        guest_mac,
        gateway_mac,
        src,
        dst,
        IpProtocol::Udp,
        UDP_LEN + data.len(),
        |p| {
            UdpRepr { src_port, dst_port }.emit(
                &mut UdpPacket::new_unchecked(p),
                &src.into(),
                &dst.into(),
                data.len(),
                |d| d.copy_from_slice(data),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// A TCP reset answering the guest's SYN of flow `key` (acknowledging up
/// to `ack`): the guest's connect fails at once with "refused".
pub fn tcp_reset(
    guest_mac: EthernetAddress,
    gateway_mac: EthernetAddress,
    (guest_port, dst, dst_port): FlowKey,
    ack: TcpSeqNumber,
) -> Vec<u8> {
    let reply = TcpRepr {
        src_port: dst_port,
        dst_port: guest_port,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(ack),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (dst, GUEST);
    ip_frame(
        guest_mac,
        gateway_mac,
        src,
        dst,
        IpProtocol::Tcp,
        reply.buffer_len(),
        |p| {
            reply.emit(
                &mut TcpPacket::new_unchecked(p),
                &src.into(),
                &dst.into(),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// ICMP "communication administratively prohibited" for a guest packet
/// (`ip` its header, `payload` what followed it).
pub fn icmp_prohibited(
    guest_mac: EthernetAddress,
    gateway_mac: EthernetAddress,
    ip: &Ipv4Repr,
    payload: &[u8],
) -> Vec<u8> {
    let data = &payload[..payload.len().min(8)];
    let reply = Icmpv4Repr::DstUnreachable {
        reason: Icmpv4DstUnreachable::HostProhibited,
        header: *ip,
        data,
    };
    ip_frame(
        guest_mac,
        gateway_mac,
        GATEWAY,
        ip.src_addr,
        IpProtocol::Icmp,
        reply.buffer_len(),
        |p| {
            reply.emit(
                &mut Icmpv4Packet::new_unchecked(p),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// The answer to a guest's DHCP DISCOVER or REQUEST (the UDP payload it
/// sent to port 67), or None for anything else. Every lease is
/// 10.0.2.15/24 with gateway 10.0.2.2 and DNS 10.0.2.3.
pub fn dhcp_reply(
    gateway_mac: EthernetAddress,
    request: &[u8],
    lease_secs: u32,
) -> Option<Vec<u8>> {
    let packet = DhcpPacket::new_checked(request).ok()?;
    let req = DhcpRepr::parse(&packet).ok()?;
    let message_type = match req.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => DhcpMessageType::Ack,
        _ => return None,
    };
    let dns = DNS.octets();
    let extra = [DhcpOption {
        kind: 6, // domain name servers
        data: &dns,
    }];
    let reply = DhcpRepr {
        message_type,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: GUEST,
        server_ip: GATEWAY,
        router: Some(GATEWAY),
        subnet_mask: Some(NETMASK),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(GATEWAY),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: Some(lease_secs),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &extra,
    };
    let mut body = vec![0u8; reply.buffer_len()];
    reply
        .emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
        .ok()?;
    Some(udp_frame(
        EthernetAddress::BROADCAST,
        gateway_mac,
        GATEWAY,
        67,
        Ipv4Addr::BROADCAST,
        68,
        &body,
    ))
}

/// What a DNS answer says about the name that was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// The name in the question, lower case.
    pub name: String,
    /// Its IPv4 addresses with their TTLs (seconds): A records owned by the
    /// name itself or by a name it is an alias of (a CNAME chain starting
    /// at the name, in this answer).
    pub addrs: Vec<(Ipv4Addr, u32)>,
}

/// Reads a DNS answer with one question; None when `msg` is not a
/// well-formed, successful one (RCODE other than 0 included). Records for
/// any other name (out-of-bailiwick extras a server slipped in) are
/// ignored.
pub fn dns_answers(msg: &[u8]) -> Option<DnsAnswer> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(msg.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(msg.get(at..at + 4)?.try_into().ok()?))
    };
    if msg.len() < 12 || msg[2] & 0x80 == 0 || msg[3] & 0x0f != 0 || u16_at(4)? != 1 {
        return None;
    }
    let answers = u16_at(6)?;
    let (name, mut at) = read_name(msg, 12)?;
    let name = name.to_ascii_lowercase();
    at += 4; // qtype, qclass
             // (owner, A address or CNAME target, ttl)
    let mut records: Vec<(String, Result<Ipv4Addr, String>, u32)> = Vec::new();
    for _ in 0..answers.min(64) {
        let (owner, next) = read_name(msg, at)?;
        let (rtype, class) = (u16_at(next)?, u16_at(next + 2)?);
        let ttl = u32_at(next + 4)?;
        let rdlen = usize::from(u16_at(next + 8)?);
        let rdata = msg.get(next + 10..next + 10 + rdlen)?;
        let owner = owner.to_ascii_lowercase();
        match (rtype, class, rdlen) {
            (1, 1, 4) => records.push((
                owner,
                Ok(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
                ttl,
            )),
            (5, 1, _) => {
                let (target, _) = read_name(msg, next + 10)?;
                records.push((owner, Err(target.to_ascii_lowercase()), ttl));
            }
            _ => {}
        }
        at = next + 10 + rdlen;
    }
    // The names the question's name stands for: itself and the targets of
    // CNAMEs reached from it (a chain of at most 8).
    let mut aliases = vec![name.clone()];
    for _ in 0..8 {
        let more: Vec<String> = records
            .iter()
            .filter_map(|(owner, data, _)| match data {
                Err(target) if aliases.contains(owner) && !aliases.contains(target) => {
                    Some(target.clone())
                }
                _ => None,
            })
            .collect();
        if more.is_empty() {
            break;
        }
        aliases.extend(more);
    }
    let addrs = records
        .iter()
        .filter_map(|(owner, data, ttl)| match data {
            Ok(a) if aliases.contains(owner) => Some((*a, *ttl)),
            _ => None,
        })
        .collect();
    Some(DnsAnswer { name, addrs })
}

/// A (possibly compressed) name at `at`: the dotted name and the offset
/// just past it where it was written.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *msg.get(at)?;
        match len {
            0 => {
                return Some((name, end.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let target = usize::from(u16::from_be_bytes([l & 0x3f, *msg.get(at + 1)?]));
                end.get_or_insert(at + 2);
                at = target;
            }
            l if l < 64 => {
                let label = msg.get(at + 1..at + 1 + usize::from(l))?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(&String::from_utf8_lossy(label));
                if name.len() > 255 {
                    return None;
                }
                at += 1 + usize::from(l);
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A DNS answer for `name` with the given addresses (compressed names).
    pub fn answer(name: &str, addrs: &[[u8; 4]]) -> Vec<u8> {
        let mut m = vec![
            0x12,
            0x34,
            0x81,
            0x80,
            0,
            1,
            0,
            addrs.len() as u8,
            0,
            0,
            0,
            0,
        ];
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        for a in addrs {
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            m.extend_from_slice(a);
        }
        m
    }

    /// A resource record owned by the name at offset `owner` (a pointer).
    fn record(owner: u16, rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut r = (0xc000 | owner).to_be_bytes().to_vec();
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(rdata);
        r
    }

    fn labels(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    #[test]
    fn only_records_for_the_asked_name_and_its_aliases_count() {
        // pypi.org CNAME cdn.example.net; cdn.example.net A 1.1.1.1; and an
        // extra A record for bank.example.com slipped into the answer.
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 4, 0, 0, 0, 0];
        m.extend(labels("PyPI.org"));
        m.extend_from_slice(&[0, 1, 0, 1]);
        let cname_at = m.len() + 12;
        m.extend(record(12, 5, 300, &labels("cdn.example.net")));
        m.extend(record(cname_at as u16, 1, 20, &[1, 1, 1, 1]));
        let bank_at = m.len();
        let mut bank = labels("bank.example.com");
        bank.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
        m.extend(bank);
        m.extend(record(bank_at as u16, 1, 60, &[7, 7, 7, 7]));
        let got = dns_answers(&m).unwrap();
        assert_eq!(got.name, "pypi.org");
        assert_eq!(got.addrs, vec![(Ipv4Addr::new(1, 1, 1, 1), 20)]);
        // An error answer (NXDOMAIN) teaches nothing, whatever it carries.
        let mut nx = m.clone();
        nx[3] |= 3;
        assert!(dns_answers(&nx).is_none());
    }

    #[test]
    fn dns_answers_are_read_and_hostile_ones_refused() {
        let m = answer("pypi.org", &[[1, 2, 3, 4], [5, 6, 7, 8]]);
        let got = dns_answers(&m).unwrap();
        assert_eq!(got.name, "pypi.org");
        assert_eq!(
            got.addrs,
            vec![
                (Ipv4Addr::new(1, 2, 3, 4), 60),
                (Ipv4Addr::new(5, 6, 7, 8), 60)
            ]
        );
        // Truncated anywhere: no panic, no answer past the end.
        for cut in 0..m.len() {
            let _ = dns_answers(&m[..cut]);
        }
        // A pointer loop and a pointer past the end.
        let mut looped = m.clone();
        looped[12] = 0xc0;
        looped[13] = 12;
        assert!(dns_answers(&looped).is_none());
        let mut past = m.clone();
        past[13] = 0xff;
        past[12] = 0xc0;
        assert!(dns_answers(&past).is_none());
        // A query (not an answer) teaches nothing.
        let mut query = m;
        query[2] = 0x01;
        assert!(dns_answers(&query).is_none());
    }

    #[test]
    fn dhcp_discover_gets_an_offer_of_the_fixed_lease() {
        let client = EthernetAddress([2, 0, 0, 0, 0, 9]);
        let discover = DhcpRepr {
            message_type: DhcpMessageType::Discover,
            transaction_id: 0x1234,
            secs: 0,
            client_hardware_address: client,
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: true,
            requested_ip: None,
            client_identifier: None,
            server_identifier: None,
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut body = vec![0u8; discover.buffer_len()];
        discover
            .emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
            .unwrap();
        let frame = dhcp_reply(EthernetAddress([2, 0, 0, 0, 0, 1]), &body, 3600).unwrap();
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        let packet = DhcpPacket::new_checked(udp.payload()).unwrap();
        let offer = DhcpRepr::parse(&packet).unwrap();
        assert_eq!(offer.message_type, DhcpMessageType::Offer);
        assert_eq!(offer.transaction_id, 0x1234);
        assert_eq!(offer.your_ip, GUEST);
        assert_eq!(offer.router, Some(GATEWAY));
        assert_eq!(offer.subnet_mask, Some(NETMASK));
        assert_eq!(offer.dns_servers.unwrap().as_slice(), &[DNS]);
        assert!(dhcp_reply(EthernetAddress([2, 0, 0, 0, 0, 1]), &body[..100], 3600).is_none());
    }
}
