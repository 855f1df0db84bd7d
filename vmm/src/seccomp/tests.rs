use super::*;

#[test]
fn every_role_compiles_to_a_filter() {
    for role in Role::ALL {
        let filters = compiled(role).unwrap();
        assert!(filters.iter().all(|f| !f.is_empty()), "{}", role.name());
        assert!(role.calls().iter().any(|(name, _)| *name == "futex"));
    }
}

#[test]
fn only_the_spawner_may_start_a_process() {
    for role in Role::ALL {
        let execve = role.calls().iter().any(|(name, _)| *name == "execve");
        assert_eq!(execve, role == Role::Spawner, "{}", role.name());
        assert!(!role.calls().iter().any(|(name, _)| *name == "ptrace"));
    }
}

#[test]
fn the_report_names_the_thread_and_the_call() {
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    report("vcpu", 59, &mut line);
    let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
    assert!(
        text.starts_with("vmm: seccomp: the vcpu thread made"),
        "{text}"
    );
    assert!(text.contains(": execve (59);"), "{text}");
    assert!(text.ends_with('\n'));
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    report("vcpu", 100_000, &mut line);
    let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
    assert!(text.contains("number 100000;"), "{text}");
}

#[test]
fn a_filtered_thread_keeps_working_within_its_role() {
    let worked = std::thread::spawn(|| {
        let (mut r, mut w) = std::io::pipe().unwrap();
        apply(Role::Reseed).unwrap();
        // What the role needs: memory, a pipe's read and write.
        let data = vec![7u8; 1 << 20];
        std::io::Write::write_all(&mut w, &data[..4096]).unwrap();
        let mut back = [0u8; 4096];
        std::io::Read::read_exact(&mut r, &mut back).unwrap();
        back == data[..4096]
    })
    .join()
    .unwrap();
    assert!(worked);
    // Filters are per thread: this one has none.
    assert!(!filtered());
}

/// The roles' lists as docs/security.md prints them, between its markers.
fn markdown() -> String {
    let mut out = String::new();
    for role in Role::ALL {
        out.push_str(&format!(
            "\n#### {}\n\n| call | why |\n|---|---|\n",
            role.name()
        ));
        for (name, why) in role.calls() {
            out.push_str(&format!("| `{name}` | {why} |\n"));
        }
    }
    out
}

#[test]
fn docs_security_lists_every_roles_calls() {
    let docs = include_str!("../../../docs/security.md");
    let begin = "<!-- seccomp roles: begin (vmm/src/seccomp/rules.rs) -->\n";
    let end = "<!-- seccomp roles: end -->";
    let listed = docs
        .split_once(begin)
        .and_then(|(_, rest)| rest.split_once(end))
        .map(|(listed, _)| listed);
    let expected = markdown();
    if listed != Some(expected.as_str()) {
        let path = std::env::temp_dir().join("seccomp-roles.md");
        std::fs::write(&path, &expected).unwrap();
        panic!(
            "docs/security.md's seccomp lists differ from the filters: put {} between its markers",
            path.display()
        );
    }
}

#[test]
fn the_run_client_starts_threads_through_clone_and_never_clone3() {
    let (started, clone3) = std::thread::spawn(|| {
        apply(Role::RunClient).unwrap();
        // SAFETY: clone3 with no arguments: the ENOSYS filter answers
        // before the kernel reads them.
        let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        let clone3 = (rc, std::io::Error::last_os_error().raw_os_error());
        // glibc falls back to clone(CLONE_THREAD | ...), which the filter allows.
        // (It runs under this thread's filter: seccomp filters are inherited.)
        let started = std::thread::spawn(|| true).join().unwrap();
        (started, clone3)
    })
    .join()
    .unwrap();
    assert!(
        started,
        "the thread did not start under its parent's filter"
    );
    assert_eq!(clone3, (-1, Some(libc::ENOSYS)));
}
