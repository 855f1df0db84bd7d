//! virtio-net frames from the guest into the user network (Ethernet, ARP,
//! IPv4, ICMP, UDP, TCP, DHCP, DNS queries) and DNS answers coming back.
//!
//! The egress policy allows nothing, so no frame leaves the machine; DNS
//! queries go to a resolver socket of the target's own on 127.0.0.1,
//! which answers each with the input's answer bytes.
//!
//! Input: the answer's length (u16 LE) and bytes, then driver records
//! (`vmm_fuzz::driver`).
#![no_main]

use std::net::UdpSocket;

use devices::virtio::net::user::policy::EgressPolicy;
use devices::virtio::net::user::{wire, UserNet, UserNetConfig};
use devices::virtio::net::Net;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::driver::{Driver, Input};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let len = usize::from(input.u16());
    let answer = input.bytes(len).to_vec();
    let _ = wire::dns_answers(&answer);

    let resolver = UdpSocket::bind("127.0.0.1:0").expect("a local resolver socket");
    resolver.set_nonblocking(true).expect("non-blocking");
    let config = UserNetConfig {
        guest_mac: GUEST_MAC,
        policy: EgressPolicy {
            default_allow: false,
            allow: Vec::new(),
            deny: Vec::new(),
        },
        dns: vec![resolver.local_addr().expect("its address")],
        port_forwards: Vec::new(),
    };
    let backend = UserNet::new(config).expect("a user network");
    let mut driver = Driver::new(Box::new(Net::new(GUEST_MAC, Box::new(backend))));
    driver.setup();
    driver.run(input);
    // Answer every query that reached the resolver, with the query's id.
    let mut query = [0u8; 1500];
    while let Ok((n, from)) = resolver.recv_from(&mut query) {
        let mut reply = answer.clone();
        if n >= 2 && reply.len() >= 2 {
            reply[..2].copy_from_slice(&query[..2]);
        }
        let _ = resolver.send_to(&reply, from);
    }
    driver.serve_all();
});
