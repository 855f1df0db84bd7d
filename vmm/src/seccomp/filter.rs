//! The filters themselves (Linux): building, installing, reporting.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use super::{Error, Result, Role};

#[cfg(all(feature = "seccomp-test-hooks", not(debug_assertions)))]
compile_error!("the seccomp-test-hooks feature is for test builds only, never a release build");

/// The call [`on_sigsys`] makes to end the process: nothing in the VMM
/// makes it otherwise, and the kill filter answers it with
/// SECCOMP_RET_KILL_PROCESS whatever the role's filter says.
const KILL_CALL: i64 = libc::SYS_vhangup;

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

thread_local! {
    /// This thread's role, for the report of a forbidden call (read in the
    /// signal handler: constant-initialised, no destructor).
    static ROLE: Cell<&'static str> = const { Cell::new("unnamed") };
}

/// Installs `role`'s filter on the calling thread, for good.
pub fn apply(role: Role) -> Result<()> {
    install_handler()?;
    let filters = compiled(role)?;
    ROLE.with(|r| r.set(role.name()));
    for filter in filters {
        seccompiler::apply_filter(filter).map_err(|e| Error::Install {
            role: role.name(),
            message: e.to_string(),
        })?;
    }
    #[cfg(feature = "seccomp-test-hooks")]
    forbidden_call_for_tests(role);
    Ok(())
}

/// Test builds only: when `VMM_TEST_FORBIDDEN_SYSCALL` names `role`, the
/// thread makes a call its filter forbids (execve on a vCPU thread, a
/// packet socket elsewhere).
#[cfg(feature = "seccomp-test-hooks")]
fn forbidden_call_for_tests(role: Role) {
    if std::env::var("VMM_TEST_FORBIDDEN_SYSCALL").as_deref() != Ok(role.name()) {
        return;
    }
    // SAFETY: calls that the filter stops before the kernel runs them;
    // their arguments are valid anyway.
    unsafe {
        match role {
            Role::Vcpu => {
                let argv = [c"true".as_ptr(), std::ptr::null()];
                libc::syscall(
                    libc::SYS_execve,
                    c"/bin/true".as_ptr(),
                    argv.as_ptr(),
                    std::ptr::null::<*const libc::c_char>(),
                );
            }
            _ => {
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            }
        }
    }
}

/// Whether the calling thread runs under a seccomp filter (a fork child's
/// threads start under the one its parent's spawner thread had).
pub fn filtered() -> bool {
    // SAFETY: prctl(PR_GET_SECCOMP) reads the calling thread's mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP) == 2 }
}

/// For a thread under an inherited filter: reports of a forbidden call
/// name it `name`.
pub fn name_thread(name: &'static str) -> Result<()> {
    install_handler()?;
    ROLE.with(|r| r.set(name));
    Ok(())
}

/// The kill filter, the role's ENOSYS filter when it has one, and the
/// role's filter, compiled once per role. (Where filters disagree the
/// kernel takes the strictest answer: kill, then trap, then an error.)
fn compiled(role: Role) -> Result<&'static [BpfProgram]> {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<&'static str, &'static [BpfProgram]>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = cache.get(role.name()) {
        return Ok(found);
    }
    let build = |rules, mismatch, matched| -> Result<BpfProgram> {
        SeccompFilter::new(rules, mismatch, matched, ARCH)
            .and_then(BpfProgram::try_from)
            .map_err(|e| Error::Build {
                role: role.name(),
                message: e.to_string(),
            })
    };
    let calls = |calls: &[i64]| -> BTreeMap<i64, Vec<SeccompRule>> {
        calls.iter().map(|&nr| (nr, Vec::new())).collect()
    };
    let mut filters = vec![build(
        calls(&[KILL_CALL]),
        SeccompAction::Allow,
        SeccompAction::KillProcess,
    )?];
    if !role.not_implemented().is_empty() {
        filters.push(build(
            calls(role.not_implemented()),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?);
    }
    filters.push(build(
        role.rules(),
        SeccompAction::Trap,
        SeccompAction::Allow,
    )?);
    let filters: &'static [BpfProgram] = Vec::leak(filters);
    cache.insert(role.name(), filters);
    Ok(filters)
}

/// Installs [`on_sigsys`] for the process, once.
fn install_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is an
        // `extern "C"` function with the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    result.map_err(|errno| Error::Handler(std::io::Error::from_raw_os_error(errno)))
}

/// The line [`on_sigsys`] writes for call `nr` on a thread of `role`.
fn report(role: &str, nr: i64, out: &mut Line) {
    out.push("vmm: seccomp: the ");
    out.push(role);
    out.push(" thread made a system call its filter forbids: ");
    match crate::arch::syscall_names::name(nr) {
        Some(name) => {
            out.push(name);
            out.push(" (");
            out.push_number(nr);
            out.push(")");
        }
        None => {
            out.push("number ");
            out.push_number(nr);
        }
    }
    out.push(
        "; the VMM stops (docs/security.md; --no-seccomp turns filters off, for debugging only)\n",
    );
}

/// A fixed buffer for a line written from a signal handler (no allocation).
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &str) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: i64) {
        if n < 0 {
            self.push("-");
            n = -n;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(std::str::from_utf8(&digits[i..]).unwrap_or("?"));
    }
}

/// SIGSYS from a seccomp trap: reports the call, then ends the process.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS its union holds
    // `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }` after
    // the three ints and padding of the header (offset 16 on 64-bit).
    let nr = unsafe { *info.cast::<u8>().add(16 + 8).cast::<libc::c_int>() };
    let role = ROLE.with(|r| r.get());
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    report(role, i64::from(nr), &mut line);
    // SAFETY: write(2) and a raw syscall are async-signal-safe; the buffer
    // is valid for `line.len` bytes.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(KILL_CALL);
        // Not reached: the kill filter ends the process.
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
