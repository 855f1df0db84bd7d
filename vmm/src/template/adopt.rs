//! Templates made from a running sandbox (E2B's snapshots, `vmm serve`):
//! its snapshot, taken by its own VMM, becomes a template of the store, so
//! sandboxes start from that instant as from any template.

use std::path::Path;
use std::time::Instant;

use super::SNAPSHOT_DIR;
use super::{check_name, install, io, store, write_record, Error, Record, Result, Template};

/// Makes template `name` (replacing one of that name) of `snapshot`, a
/// snapshot directory of sandbox `sandbox` started from template `from`:
/// the new template keeps `from`'s inputs and configuration. `snapshot` is
/// moved into the store, so it must be on the store's file system.
pub fn adopt(
    snapshot: &Path,
    name: &str,
    from: &Template,
    sandbox: &str,
    memory_bytes: u64,
) -> Result<Template> {
    adopt_in(&store()?, snapshot, name, from, sandbox, memory_bytes)
}

fn adopt_in(
    store: &Path,
    snapshot: &Path,
    name: &str,
    from: &Template,
    sandbox: &str,
    memory_bytes: u64,
) -> Result<Template> {
    let started = Instant::now();
    check_name(name)?;
    // Held until the template is installed: a sweep leaves it alone.
    let (partial, _held) = crate::partial::create(store, name)?;
    let made = (|| {
        let inside = partial.join(SNAPSHOT_DIR);
        std::fs::rename(snapshot, &inside).map_err(|e| match e.raw_os_error() {
            Some(libc::EXDEV) => Error::Io {
                what: "move into the template store (it is on another file system than the runtime folder; set VMM_CACHE_DIR to one on the same)",
                path: snapshot.to_path_buf(),
                source: e,
            },
            _ => io("move into the template store", snapshot)(e),
        })?;
        let record = Record {
            name: name.to_string(),
            created_unix: crate::names::now_unix(),
            build_ms: started.elapsed().as_millis() as u64,
            warmup: Vec::new(),
            inputs: from.record.inputs.clone(),
            config: from.record.config.clone(),
            memory_bytes,
            from_sandbox: Some(sandbox.to_string()),
        };
        write_record(&partial, &record)?;
        install(&partial, &store.join(name), true)?;
        Ok(record)
    })();
    match made {
        Ok(record) => Ok(Template {
            dir: store.join(name),
            record,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_becomes_a_template_that_keeps_its_origins_inputs() {
        let store = tempfile_dir("adopt");
        let from = Template {
            dir: store.join("base"),
            record: super::super::tests::record("base", Path::new("/k"), 128),
        };
        let snap = store.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("state"), b"s").unwrap();
        let t = adopt_in(&store, &snap, "mine", &from, "sbx1", 42).unwrap();
        assert!(t.dir.join(SNAPSHOT_DIR).join("state").exists());
        assert!(!snap.exists(), "moved, not copied");
        let again = Template::open_in(&store, "mine").unwrap();
        assert_eq!(again.record.from_sandbox.as_deref(), Some("sbx1"));
        assert_eq!(again.record.memory_bytes, 42);
        assert_eq!(again.record.inputs, from.record.inputs);
        // Made again under the same name: replaced.
        std::fs::create_dir_all(&snap).unwrap();
        adopt_in(&store, &snap, "mine", &from, "sbx2", 7).unwrap();
        let again = Template::open_in(&store, "mine").unwrap();
        assert_eq!(again.record.from_sandbox.as_deref(), Some("sbx2"));
        // A bad name is refused before anything moves.
        std::fs::create_dir_all(&snap).unwrap();
        assert!(matches!(
            adopt_in(&store, &snap, "a/b", &from, "sbx1", 1),
            Err(Error::BadName(_))
        ));
        assert!(snap.exists());
        let _ = std::fs::remove_dir_all(&store);
    }

    fn tempfile_dir(what: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vmm-{what}-{}-{}",
            std::process::id(),
            crate::runtime::random_hex(4)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
