# Runs in L1 (tools/arm64-l1.sh): the arm64 guest tests of tests/arm64.rs.
# Each section prints `ARM64-BEGIN name`, its output, then
# `ARM64-END name status=N seconds=S` (L1's clock, /proc/uptime).
now() { read -r up _ < /proc/uptime; echo "$up"; }
section() {
    name="$1"; shift
    echo "ARM64-BEGIN $name"
    start="$(now)"
    "$@" 2>&1
    status=$?
    echo "ARM64-END $name status=$status seconds=$(awk "BEGIN {print $(now) - $start}")"
}
vmm=/work/vmm
# Until the guest agent answers.
wait_agent() {
    i=0
    until $vmm exec --api-socket "$1" -- true 2>/dev/null; do
        i=$((i + 1)); [ $i -lt 600 ] || { echo "no agent on $1"; return 1; }
        sleep 0.2
    done
}

boot() {
    cat > /tmp/boot.json <<'J'
{"kernel": "/work/Image", "initramfs": "/work/initramfs.cpio", "memory_mib": 256, "vcpus": 1}
J
    $vmm launch --config /tmp/boot.json --report /tmp/boot-report.json || return
    cat /tmp/boot-report.json; echo
}

smp() {
    cat > /tmp/smp.json <<'J'
{"kernel": "/work/Image", "initramfs": "/work/initramfs.cpio", "memory_mib": 256, "vcpus": 2}
J
    $vmm launch --config /tmp/smp.json
}

run_on_disk() {
    cat > /tmp/disk.json <<'J'
{"kernel": "/work/Image", "initramfs": "/work/initramfs-minimal.cpio", "memory_mib": 256,
 "rootfs": {"base": "/work/disk.ext4"}}
J
    $vmm run --config /tmp/disk.json --cold -- sh -c 'uname -m; grep " / " /proc/mounts'
}

# One VM for the share, network, snapshot and fork sections.
start_vm() {
    mkdir -p /tmp/share /tmp/www /tmp/kids
    echo "from L1" > /tmp/share/in.txt
    head -c 1048576 /dev/urandom > /tmp/www/blob
    md5sum /tmp/www/blob | cut -d' ' -f1 > /tmp/blob.md5
    busybox httpd -p 127.0.0.1:8088 -h /tmp/www
    cat > /tmp/vm.json <<'J'
{"kernel": "/work/Image", "initramfs": "/work/initramfs-minimal.cpio", "memory_mib": 256,
 "rootfs": {"base": "/work/disk.ext4"},
 "shares": [{"tag": "work", "host_path": "/tmp/share", "guest_path": "/mnt/work"}],
 "network": {"mode": "user", "dns": ["127.0.0.1:53"], "egress": {"default": "deny", "allow": ["10.0.2.2"]}},
 "serial": "/tmp/vm-console.log"}
J
    $vmm launch --config /tmp/vm.json --api-socket /tmp/vm.sock > /tmp/vm.log 2>&1 &
    wait_agent /tmp/vm.sock
}

share() {
    $vmm exec --api-socket /tmp/vm.sock -- sh -c 'cat /mnt/work/in.txt && echo from-guest > /mnt/work/out.txt' || return
    echo "L1 reads: $(cat /tmp/share/out.txt)"
}

net() {
    $vmm exec --api-socket /tmp/vm.sock -- sh -c \
        'ip -4 addr show eth0 | grep -o "inet [0-9./]*"; wget -qO- http://10.0.2.2:8088/blob | md5sum' || return
    echo "L1 md5 $(cat /tmp/blob.md5)"
}

snapshot_restore() {
    $vmm exec --api-socket /tmp/vm.sock -- sh -c \
        '(i=0; while :; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.1; done) >/dev/null 2>&1 &
         until [ -s /tmp/counter ]; do sleep 0.1; done; echo "counter before $(cat /tmp/counter)"' || return
    # Snapshotted while paused; resumed, the VM goes on.
    $vmm pause --api-socket /tmp/vm.sock || return
    $vmm snapshot --api-socket /tmp/vm.sock --out /tmp/snap || return
    $vmm resume --api-socket /tmp/vm.sock || return
    $vmm exec --api-socket /tmp/vm.sock -- sh -c 'a=$(cat /tmp/counter); sleep 0.5; echo "resumed counter $a then $(cat /tmp/counter)"' || return
    $vmm restore --snapshot /tmp/snap --api-socket /tmp/restored.sock --config /tmp/vm.json > /tmp/restored.log 2>&1 &
    wait_agent /tmp/restored.sock || { cat /tmp/restored.log; return 1; }
    $vmm exec --api-socket /tmp/restored.sock -- sh -c \
        'a=$(cat /tmp/counter); sleep 1; b=$(cat /tmp/counter); echo "restored counter $a then $b"'
    status=$?
    $vmm stop --api-socket /tmp/restored.sock
    return $status
}

fork() {
    $vmm fork --api-socket /tmp/vm.sock --count 1 --dir /tmp/kids || return
    kid="$(ls /tmp/kids/*.api.sock)"
    $vmm exec --api-socket "$kid" -- sh -c 'echo child > /tmp/who; echo "child who=$(cat /tmp/who)"' || return
    $vmm exec --api-socket /tmp/vm.sock -- sh -c 'echo "parent who=$(cat /tmp/who 2>/dev/null || echo none)"'
    status=$?
    $vmm stop --api-socket "$kid" --force
    return $status
}

# Seconds from the start of a command to its L2-MARKER line.
time_to_marker() {
    t0="$(now)"
    "$@" 2>&1 | while IFS= read -r line; do
        case "$line" in
            *"L2-MARKER arch=aarch64 cpus="*) echo "$line"; echo "marker after $(awk "BEGIN {print $(now) - $t0}")" ;;
        esac
    done
}

# Debian's own kernel with busybox as init, under our VMM and under the
# minimal one, three times each, taking turns.
# Two busy vCPUs: a snapshot restored in a new process keeps both
# running (each vCPU's registers, timer and GIC redistributor).
smp_restore() {
    cat > /tmp/smp2.json <<'J'
{"kernel": "/work/Image", "initramfs": "/work/initramfs-minimal.cpio", "memory_mib": 256, "vcpus": 2,
 "rootfs": {"base": "/work/disk.ext4"}, "serial": "/tmp/smp2-console.log"}
J
    $vmm launch --config /tmp/smp2.json --api-socket /tmp/smp2.sock > /tmp/smp2.log 2>&1 &
    wait_agent /tmp/smp2.sock || return
    $vmm exec --api-socket /tmp/smp2.sock -- sh -c \
        '(while :; do :; done) >/dev/null 2>&1 & (while :; do :; done) >/dev/null 2>&1 & echo looping' || return
    $vmm snapshot --api-socket /tmp/smp2.sock --out /tmp/smp2.snap >/dev/null || return
    $vmm stop --api-socket /tmp/smp2.sock --force
    $vmm restore --snapshot /tmp/smp2.snap --api-socket /tmp/smp2r.sock --config /tmp/smp2.json > /tmp/smp2r.log 2>&1 &
    wait_agent /tmp/smp2r.sock || { cat /tmp/smp2r.log; return 1; }
    # Each CPU's user time (field 2 of /proc/stat) goes on.
    $vmm exec --api-socket /tmp/smp2r.sock -- sh -c \
        'echo "online $(cat /sys/devices/system/cpu/online)"; a=$(grep "^cpu[01] " /proc/stat | cut -d" " -f1,2); sleep 1; b=$(grep "^cpu[01] " /proc/stat | cut -d" " -f1,2); echo "before" $a; echo "after" $b'
    status=$?
    $vmm stop --api-socket /tmp/smp2r.sock --force
    return $status
}

debian_image() {
    cat > /tmp/debian.json <<'J'
{"kernel": "/work/debian-Image", "initramfs": "/work/busybox-initramfs.cpio", "memory_mib": 256, "vcpus": 1}
J
    for round in 1 2 3; do
        echo "round $round minimal"
        time_to_marker /work/vmm-minimal /work/debian-Image /work/busybox-initramfs.cpio
        echo "round $round vmm"
        time_to_marker $vmm launch --config /tmp/debian.json
    done
}

section boot boot
section smp smp
section run_on_disk run_on_disk
section start_vm start_vm
section share share
section net net
section snapshot_restore snapshot_restore
section fork fork
$vmm stop --api-socket /tmp/vm.sock; wait
echo "VM log:"; cat /tmp/vm.log
section smp_restore smp_restore
section debian_image debian_image
