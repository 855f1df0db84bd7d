#!/usr/bin/env bash
# A container on a pod network without Kubernetes: this script does what a
# CNI plugin does for a pod (a network namespace whose eth0 is one end of a
# veth link, with an address and a default route), here towards a second
# namespace standing in for the rest of the cluster, then runs a container
# of the vmm runtime in it with `ctr run --with-ns` (docs/containerd.md,
# "The pod's network"). Run as root, with containerd running, the shim on
# its PATH and busybox pulled:
#
#   ctr image pull docker.io/library/busybox:latest
#   examples/containerd/pod-network.sh
#
# It prints the guest's address, default route and MAC address (eth0's),
# its pings to the peer and the peer's neighbour entry for the pod, then
# removes both namespaces.
set -euo pipefail
image="${IMAGE:-docker.io/library/busybox:latest}"
pod=vmm-example-pod
peer=vmm-example-peer
cleanup() {
    ip netns del "$pod" 2>/dev/null || true
    ip netns del "$peer" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add "$pod"
ip netns add "$peer"
ip -n "$pod" link add name eth0 type veth peer name peer0 netns "$peer"
ip -n "$pod" addr add 10.77.0.2/24 dev eth0
ip -n "$pod" link set eth0 up
ip -n "$pod" link set lo up
ip -n "$pod" route add default via 10.77.0.1
ip -n "$peer" addr add 10.77.0.1/24 dev peer0
ip -n "$peer" link set peer0 up
echo "the pod's eth0: $(ip -n "$pod" -br link show eth0)"

# The container sees eth0's address, route and MAC, and pings the peer.
ctr run --runtime io.containerd.vmm.v2 --with-ns "network:/var/run/netns/$pod" --rm "$image" pod-net1 \
    sh -c 'ip -4 addr show eth0 | grep inet; ip route | grep default; cat /sys/class/net/eth0/address; ping -c 3 10.77.0.1'
echo "the peer's neighbour entry for the pod: $(ip -n "$peer" neigh show 10.77.0.2)"
