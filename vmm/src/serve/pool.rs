//! Warm spares: sandboxes started from a template before anyone asks for
//! one, so that a create takes one that is ready. A VM restored from a
//! template runs its first commands far slower than later ones (here about
//! twice: what they use is touched for the first time since the restore),
//! so a spare also runs a command before it is ready (`Registry::
//! start_spare` says which). The pool keeps `per_template` spares of every
//! template a create has asked for (and of `base` from the start); a spare
//! from a template that was rebuilt since is stale and is stopped, not
//! handed out.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

use super::sandboxes::Machine;

/// Which build of a template a spare came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    created_unix: u64,
    build_ms: u64,
}

impl Version {
    pub fn of(t: &crate::template::Template) -> Version {
        Version {
            created_unix: t.record.created_unix,
            build_ms: t.record.build_ms,
        }
    }
}

/// A ready sandbox nobody has yet: its id (its folder is named by it) and
/// its VM.
pub struct Spare {
    pub id: String,
    pub vm: Machine,
    pub version: Version,
}

/// What [`Pool::take`] found.
#[derive(Default)]
pub struct Taken {
    pub spare: Option<Spare>,
    /// Spares of an older build of the template, to stop.
    pub stale: Vec<Spare>,
    /// Replacements to start.
    pub start: usize,
}

/// The spares of one template.
#[derive(Default)]
struct Slot {
    ready: Vec<Spare>,
    starting: usize,
}

#[derive(Default)]
struct State {
    /// Set when the server stops: no more spares start, and one that
    /// comes up then is stopped.
    closed: bool,
    slots: BTreeMap<String, Slot>,
}

/// What `GET /vmm/pool` answers.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    pub per_template: usize,
    pub templates: BTreeMap<String, SlotStatus>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SlotStatus {
    pub ready: usize,
    pub starting: usize,
}

/// The spares of every template.
pub struct Pool {
    per_template: usize,
    state: Mutex<State>,
    /// Bumped on every change, for [`Pool::settled`].
    changed: watch::Sender<()>,
}

impl Pool {
    pub fn new(per_template: usize) -> Pool {
        Pool {
            per_template,
            state: Mutex::new(State::default()),
            changed: watch::channel(()).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a ready spare of `template` built as `version`, and counts
    /// its replacement as starting at once (within `room` more VMs).
    pub fn take(&self, template: &str, version: Version, room: usize) -> Taken {
        let mut state = self.state();
        let Some(slot) = state.slots.get_mut(template) else {
            return Taken::default();
        };
        let (fresh, stale): (Vec<_>, Vec<_>) =
            slot.ready.drain(..).partition(|s| s.version == version);
        slot.ready = fresh;
        let spare = slot.ready.pop();
        drop(state);
        let start = match spare {
            Some(_) => self.reserve(template, room),
            None => 0,
        };
        self.changed.send_replace(());
        Taken {
            spare,
            stale,
            start,
        }
    }

    /// How many spares of `template` to start now so that it has its
    /// count, with at most `room` more VMs; counts them as starting.
    pub fn reserve(&self, template: &str, room: usize) -> usize {
        let mut state = self.state();
        if state.closed || self.per_template == 0 {
            return 0;
        }
        let slot = state.slots.entry(template.to_string()).or_default();
        let have = slot.ready.len() + slot.starting;
        let n = self.per_template.saturating_sub(have).min(room);
        slot.starting += n;
        drop(state);
        if n > 0 {
            self.changed.send_replace(());
        }
        n
    }

    /// A spare that started: kept, or given back when the pool is closed
    /// (the caller stops it).
    pub fn put(&self, template: &str, spare: Spare) -> Option<Spare> {
        let mut state = self.state();
        let closed = state.closed;
        let slot = state.slots.entry(template.to_string()).or_default();
        slot.starting = slot.starting.saturating_sub(1);
        let back = match closed {
            true => Some(spare),
            false => {
                slot.ready.push(spare);
                None
            }
        };
        drop(state);
        self.changed.send_replace(());
        back
    }

    /// A spare that did not start.
    pub fn failed(&self, template: &str) {
        if let Some(slot) = self.state().slots.get_mut(template) {
            slot.starting = slot.starting.saturating_sub(1);
        }
        self.changed.send_replace(());
    }

    /// Takes every ready spare of `template`, for the caller to stop, and
    /// keeps none of it until a create asks again.
    pub fn forget(&self, template: &str) -> Vec<Spare> {
        let mut state = self.state();
        let gone = match state.slots.get_mut(template) {
            Some(slot) if slot.starting == 0 => state.slots.remove(template).map(|s| s.ready),
            Some(slot) => Some(std::mem::take(&mut slot.ready)),
            None => None,
        };
        drop(state);
        self.changed.send_replace(());
        gone.unwrap_or_default()
    }

    /// Spares ready or starting, of every template (they count against
    /// the server's limit).
    pub fn count(&self) -> usize {
        let state = self.state();
        state
            .slots
            .values()
            .map(|s| s.ready.len() + s.starting)
            .sum()
    }

    /// Stops the pool (the server stops): its ready spares, for the caller
    /// to stop.
    pub fn close(&self) -> Vec<Spare> {
        let mut state = self.state();
        state.closed = true;
        let all = state
            .slots
            .values_mut()
            .flat_map(|s| s.ready.drain(..))
            .collect();
        drop(state);
        self.changed.send_replace(());
        all
    }

    fn status_of(&self, state: &State) -> Status {
        Status {
            per_template: self.per_template,
            templates: state
                .slots
                .iter()
                .map(|(name, s)| {
                    let counts = SlotStatus {
                        ready: s.ready.len(),
                        starting: s.starting,
                    };
                    (name.clone(), counts)
                })
                .collect(),
        }
    }

    pub fn status(&self) -> Status {
        self.status_of(&self.state())
    }

    /// Waits until no spare is starting; the status at that instant (a
    /// benchmark waits for this, so that a refill does not run beside
    /// what it measures).
    pub async fn settled(&self) -> Status {
        let mut changes = self.changed.subscribe();
        loop {
            {
                let state = self.state();
                if state.slots.values().all(|s| s.starting == 0) {
                    return self.status_of(&state);
                }
            }
            if changes.changed().await.is_err() {
                return self.status();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    const V1: Version = Version {
        created_unix: 1,
        build_ms: 10,
    };
    const V2: Version = Version {
        created_unix: 2,
        build_ms: 10,
    };

    fn spare(id: &str, version: Version) -> Spare {
        Spare {
            id: id.to_string(),
            vm: Machine::new(
                format!("/nonexistent/{id}.sock").into(),
                format!("/nonexistent/{id}.vsock").into(),
                "/nonexistent".into(),
                "/nonexistent".into(),
                None,
            ),
            version,
        }
    }

    #[test]
    fn reserve_tops_up_to_the_count_within_room() {
        let pool = Pool::new(2);
        assert_eq!(pool.reserve("base", 10), 2);
        // Both are starting: nothing more.
        assert_eq!(pool.reserve("base", 10), 0);
        assert!(pool.put("base", spare("a", V1)).is_none());
        pool.failed("base");
        assert_eq!(pool.count(), 1);
        // One ready, one failed: one more, but only if there is room.
        assert_eq!(pool.reserve("base", 0), 0);
        assert_eq!(pool.reserve("base", 5), 1);
        assert_eq!(pool.reserve("other", 1), 1);
        let status = pool.status();
        assert_eq!(status.templates["base"].ready, 1);
        assert_eq!(status.templates["base"].starting, 1);
        assert_eq!(status.templates["other"].starting, 1);
    }

    #[test]
    fn no_pool_starts_nothing() {
        let pool = Pool::new(0);
        assert_eq!(pool.reserve("base", 10), 0);
        assert_eq!(pool.count(), 0);
    }

    #[test]
    fn take_hands_out_only_the_current_build() {
        let pool = Pool::new(2);
        assert_eq!(pool.reserve("base", 10), 2);
        assert!(pool.put("base", spare("old", V1)).is_none());
        assert!(pool.put("base", spare("new", V2)).is_none());
        let taken = pool.take("base", V2, 10);
        assert_eq!(taken.spare.map(|s| s.id).as_deref(), Some("new"));
        let stale: Vec<_> = taken.stale.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(stale, ["old"]);
        // Both replaced, counted as starting in the same step.
        assert_eq!(taken.start, 2);
        assert_eq!(pool.status().templates["base"].starting, 2);
        pool.failed("base");
        pool.failed("base");
        let taken = pool.take("base", V2, 10);
        assert!(taken.spare.is_none() && taken.stale.is_empty());
        // Nothing taken, nothing to replace (a cold create refills after).
        assert_eq!(taken.start, 0);
        assert!(pool.take("never-asked", V1, 10).spare.is_none());
    }

    #[test]
    fn a_forgotten_template_gives_its_spares_back() {
        let pool = Pool::new(1);
        assert_eq!(pool.reserve("snap", 10), 1);
        assert!(pool.put("snap", spare("a", V1)).is_none());
        let gone = pool.forget("snap");
        assert_eq!(gone.len(), 1);
        assert!(!pool.status().templates.contains_key("snap"));
        assert!(pool.forget("never").is_empty());
    }

    #[test]
    fn a_closed_pool_gives_its_spares_back_and_starts_none() {
        let pool = Pool::new(1);
        assert_eq!(pool.reserve("base", 10), 1);
        assert!(pool.put("base", spare("a", V1)).is_none());
        assert_eq!(pool.reserve("other", 10), 1);
        let all = pool.close();
        assert_eq!(all.len(), 1);
        // One that comes up after the close goes back to be stopped.
        assert!(pool.put("other", spare("late", V1)).is_some());
        assert_eq!(pool.reserve("base", 10), 0);
        assert_eq!(pool.count(), 0);
    }

    #[test]
    fn settled_waits_for_starting_spares() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pool = Arc::new(Pool::new(1));
            assert!(pool.settled().await.templates.is_empty());
            assert_eq!(pool.reserve("base", 1), 1);
            let waiter = tokio::spawn({
                let pool = pool.clone();
                async move { pool.settled().await }
            });
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            assert!(pool.put("base", spare("a", V1)).is_none());
            let status = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("settled once the spare is ready")
                .unwrap();
            assert_eq!(status.templates["base"].ready, 1);
        });
    }
}
