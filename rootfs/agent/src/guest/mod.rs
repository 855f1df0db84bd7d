//! The agent inside the guest (Linux only): boot, then serving requests.

mod capabilities;
mod command;
mod container;
mod files;
mod identity;
mod interface;
mod isolation;
mod mount_namespace;
mod pty;
mod server;
mod watch;

use std::io::Write;
use std::process::Command;

/// First line the init prints; `vmm bench` and the tests look for it.
const READY: &str = "vmm-init: ready";
/// Runs the commands the image has no binary for.
const BUSYBOX: &str = "/bin/busybox";
/// PATH for the commands the agent runs.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The value the VMM's boot timer expects.
const BOOT_TIMER_MAGIC: u8 = 123;

/// Mounts a kernel file system, saying why when it fails.
fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    if let Err(err) = vmm_agent::mount::mount(source, target, fstype, libc::MS_NOSUID, "") {
        if err.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("vmm-init: mount {fstype} on {target}: {err}");
        }
    }
}

/// When the VM has a root disk (/dev/vda: the base image and this VM's
/// layer, merged by the VMM), makes it the root file system, moving /dev,
/// /proc and /sys into it.
fn assemble_root() {
    const NEW: &str = "/newroot";
    if !std::path::Path::new("/dev/vda").exists() {
        return;
    }
    let _ = std::fs::create_dir_all(NEW);
    // No lazy inode-table zeroing (ext4lazyinit): it would write zeroes
    // into this VM's layer in the background, and in a VM restored from a
    // template it runs at once (its wait has passed while the snapshot
    // sat): about 1 s of guest CPU at every start here, growing with the
    // template's age. mkfs.ext4 -d wrote every inode the image uses.
    let mounted = vmm_agent::mount::mount("/dev/vda", NEW, "ext4", 0, "noinit_itable")
        .or_else(|_| vmm_agent::mount::mount("/dev/vda", NEW, "ext4", libc::MS_RDONLY, ""));
    if let Err(e) = mounted {
        eprintln!("vmm-init: cannot mount the root disk /dev/vda: {e}; staying in the initramfs");
        return;
    }
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW}{dir}");
        let _ = std::fs::create_dir_all(&target);
        if let Err(e) = vmm_agent::mount::mount(dir, &target, "", libc::MS_MOVE, "") {
            eprintln!("vmm-init: cannot move {dir} into the root disk: {e}");
        }
    }
    let switched = std::env::set_current_dir(NEW)
        .and_then(|_| vmm_agent::mount::mount(".", "/", "", libc::MS_MOVE, ""))
        .and_then(|_| std::os::unix::fs::chroot("."))
        .and_then(|_| std::env::set_current_dir("/"));
    if let Err(e) = switched {
        eprintln!("vmm-init: cannot switch to the root disk: {e}");
        return;
    }
    mount("tmpfs", "/tmp", "tmpfs");
    mount("tmpfs", "/run", "tmpfs");
}

/// Mounts the terminals' file system (/dev/pts, which /dev/ptmx opens
/// terminals in): commands on a terminal (exec with `pty`) and programs
/// that make their own (`script`, Python's `pty`) need it.
fn mount_devpts() {
    let target = "/dev/pts";
    let _ = std::fs::create_dir_all(target);
    let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    if let Err(e) =
        vmm_agent::mount::mount("devpts", target, "devpts", flags, "mode=0620,ptmxmode=0666")
    {
        if e.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("vmm-init: mount devpts on {target}: {e}");
        }
    }
}

/// Mounts the VMM's shared folders: `VMM_SHARES=tag:path[:ro],...`.
fn mount_shares(list: &str) {
    for item in list.split(',').filter(|i| !i.is_empty()) {
        let mut parts = item.split(':');
        let (Some(tag), Some(path)) = (parts.next(), parts.next()) else {
            eprintln!("vmm-init: share {item:?} is not tag:path[:ro]");
            continue;
        };
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if parts.next() == Some("ro") {
            flags |= libc::MS_RDONLY;
        }
        if let Err(e) = std::fs::create_dir_all(path) {
            eprintln!("vmm-init: cannot create {path} for share {tag}: {e}");
            continue;
        }
        if let Err(e) = vmm_agent::mount::mount(tag, path, "virtiofs", flags, "") {
            eprintln!("vmm-init: cannot mount share {tag} on {path}: {e}");
        }
    }
}

/// Points the resolver at the name servers the kernel's DHCP client got
/// (`ip=dhcp` leaves them in /proc/net/pnp); nothing when it got none.
fn write_resolv_conf() {
    let pnp = std::fs::read_to_string("/proc/net/pnp").unwrap_or_default();
    let servers: String = pnp
        .lines()
        .filter(|l| l.starts_with("nameserver ") && !l.ends_with(" 0.0.0.0"))
        .map(|l| format!("{l}\n"))
        .collect();
    if servers.is_empty() {
        return;
    }
    // A symlink (to a resolver daemon's file) would be written through.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    if let Err(e) = std::fs::write("/etc/resolv.conf", servers) {
        eprintln!("vmm-init: cannot write /etc/resolv.conf: {e}");
    }
}

/// Writes the boot-timer magic byte at guest physical address `addr`.
fn write_boot_timer(addr: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")?;
    let page = addr & !0xfff;
    // SAFETY: maps one page of /dev/mem (device memory the VMM provides);
    // the result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            0x1000,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            page as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `ptr` maps a whole page and the offset is below 0x1000; a
    // volatile write makes exactly one MMIO store. The page is unmapped after.
    unsafe {
        ptr.cast::<u8>()
            .add((addr & 0xfff) as usize)
            .write_volatile(BOOT_TIMER_MAGIC);
        libc::munmap(ptr, 0x1000);
    }
    Ok(())
}

fn parse_addr(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Splits the part of a kernel command line after the first ` -- ` the way
/// the kernel does: on spaces, with double quotes grouping (and removed).
fn command_after_dashes(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut after_dashes = false;
    for c in cmdline.trim_end().chars().chain(std::iter::once(' ')) {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    let word = std::mem::take(&mut current);
                    if after_dashes {
                        words.push(word);
                    } else if word == "--" {
                        after_dashes = true;
                    }
                }
                in_word = false;
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    words
}

/// Starts `argv` with the agent's PATH, the image's defaults and
/// `settings` over them, after `configure` set it up. A bare name the image
/// has no binary for is run as a busybox applet (the initramfs has no link
/// per applet).
pub(crate) fn spawn_command(
    argv: &[String],
    settings: &command::Settings,
    configure: impl Fn(&mut Command),
) -> std::io::Result<std::process::Child> {
    let (program, rest) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"))?;
    let spawn = |program: &str, args: &[String]| {
        let mut cmd = Command::new(program);
        cmd.args(args).env("PATH", PATH);
        command::apply(&mut cmd, settings)?;
        configure(&mut cmd);
        match &settings.isolation {
            Some(i) => i.spawn(|| cmd.spawn()),
            None => cmd.spawn(),
        }
    };
    match spawn(program, rest) {
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && !program.contains('/')
                && settings.root.is_none()
                && std::path::Path::new(BUSYBOX).exists() =>
        {
            spawn(BUSYBOX, argv)
        }
        other => other,
    }
}

pub(crate) fn power_off() -> ! {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    // The VMM has no ACPI; a reboot request (with `reboot=k`, through the
    // i8042 controller) is how the guest ends the VM.
    // SAFETY: reboot(2) with a valid command; it does not return on success.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    eprintln!(
        "vmm-init: reboot failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        // SAFETY: pause(2) has no preconditions; PID 1 must never exit.
        unsafe { libc::pause() };
    }
}

pub fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    if let Some(addr) = std::env::var("VMM_BOOT_TIMER")
        .ok()
        .and_then(|v| parse_addr(&v))
    {
        if let Err(e) = write_boot_timer(addr) {
            eprintln!("vmm-init: cannot write the boot timer: {e}");
        }
    }
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    command::load_defaults();
    assemble_root();
    mount_devpts();
    if let Ok(shares) = std::env::var("VMM_SHARES") {
        mount_shares(&shares);
    }
    if let Err(e) = isolation::set_up_cgroups() {
        eprintln!("vmm-init: {e}");
    }
    if std::env::var_os("VMM_STAGE_MOUNTS").is_some() {
        if let Err(e) = container::stage() {
            eprintln!("vmm-init: {e}");
        }
        // Made now, a template's snapshot holds it (on a thread that has
        // ended before the agent is forked).
        let _ = mount_namespace::base();
    }
    write_resolv_conf();
    if let Err(e) = identity::set_up().and_then(|_| identity::renew()) {
        eprintln!("vmm-init: cannot set the machine id and hostname: {e}");
    }
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    println!("{READY} cpus-online={}", cpus.trim());
    let _ = std::io::stdout().flush();

    let args = command_after_dashes(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Some(program) = args.first() {
        let settings = command::Settings::default();
        match spawn_command(&args, &settings, |_| {}).and_then(|mut child| child.wait()) {
            Ok(s) => println!("vmm-init: command exited: {s}"),
            Err(e) => println!("vmm-init: cannot run {program}: {e}"),
        }
    } else if let Some(port) = std::env::var("VMM_AGENT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        serve_and_reap(port);
    }
    power_off();
}

/// Runs the agent in a child process while PID 1 reaps every process that
/// ends up orphaned (commands' background descendants are reparented to
/// PID 1). The agent waits for its own commands itself. Returns when the
/// agent process ends (then the VM powers off).
fn serve_and_reap(port: u32) {
    // SAFETY: fork(2) while this process has a single thread (the one
    // mount_namespace::base may have started has ended), so the child may
    // run arbitrary code.
    let agent = unsafe { libc::fork() };
    if agent == 0 {
        if let Err(e) = server::serve(port) {
            println!("vmm-init: the agent cannot serve on vsock port {port}: {e}");
        }
        // The agent's shutdown request powers off from the child; any other
        // end of the service ends the VM too.
        power_off();
    }
    if agent < 0 {
        println!(
            "vmm-init: cannot start the agent: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) for any child with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            println!("vmm-init: the agent ended (status {status:#x})");
            return;
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_in_hex_and_decimal() {
        assert_eq!(parse_addr("0xd0000000"), Some(0xd000_0000));
        assert_eq!(parse_addr("4096"), Some(4096));
        assert_eq!(parse_addr("0xzz"), None);
    }

    #[test]
    fn command_is_what_follows_the_dashes() {
        assert!(command_after_dashes("console=ttyS0 noxsave quiet\n").is_empty());
        assert_eq!(
            command_after_dashes("noxsave -- sh -c \"echo hi; nproc\" x\n"),
            vec!["sh", "-c", "echo hi; nproc", "x"]
        );
        assert_eq!(command_after_dashes("a -- b -- c"), vec!["b", "--", "c"]);
    }
}
