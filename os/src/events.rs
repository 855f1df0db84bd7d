//! An event loop with the interface of the rust-vmm `event-manager`
//! crate (the part the VMM uses), over this crate's [`crate::epoll`].
//! `event-manager` is built on Linux's epoll alone; macOS uses this one.
//! On Linux it is built for its tests, which run it over real epoll.
//!
//! Subscribers register descriptors through [`EventOps`]; each wake-up
//! calls the owning subscriber's `process` with the descriptor, the data
//! it registered and the events that came.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

pub use crate::epoll::EventSet;
use crate::epoll::{ControlOperation, Epoll, EpollEvent};

/// What went wrong in the event loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the event loop's poller: {0}")]
    Create(io::Error),
    #[error("cannot wait for events: {0}")]
    Wait(io::Error),
    #[error("cannot change the interest in descriptor {fd}: {source}")]
    Control { fd: RawFd, source: io::Error },
    #[error("descriptor {0} is already watched by a subscriber")]
    FdAlreadyRegistered(RawFd),
    #[error("descriptor {0} is not watched by this subscriber")]
    NotOwned(RawFd),
    #[error("no subscriber has this id")]
    InvalidId,
}

pub type Result<T> = std::result::Result<T, Error>;

/// A subscriber's handle in its manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriberId(u64);

/// A descriptor, the data registered with it and a set of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    fd: RawFd,
    data: u32,
    set: EventSet,
}

impl Events {
    pub fn empty<T: AsRawFd>(source: &T) -> Events {
        Events::empty_raw(source.as_raw_fd())
    }

    pub fn empty_raw(fd: RawFd) -> Events {
        Events::with_data_raw(fd, 0, EventSet::empty())
    }

    pub fn new<T: AsRawFd>(source: &T, set: EventSet) -> Events {
        Events::new_raw(source.as_raw_fd(), set)
    }

    pub fn new_raw(fd: RawFd, set: EventSet) -> Events {
        Events::with_data_raw(fd, 0, set)
    }

    pub fn with_data<T: AsRawFd>(source: &T, data: u32, set: EventSet) -> Events {
        Events::with_data_raw(source.as_raw_fd(), data, set)
    }

    pub fn with_data_raw(fd: RawFd, data: u32, set: EventSet) -> Events {
        Events { fd, data, set }
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn data(&self) -> u32 {
        self.data
    }

    pub fn event_set(&self) -> EventSet {
        self.set
    }

    /// The poller's event: the fd in the low 32 bits, the data above.
    fn epoll_event(&self) -> EpollEvent {
        EpollEvent::new(
            self.set,
            (u64::from(self.data) << 32) | u64::from(self.fd as u32),
        )
    }
}

/// Changes a subscriber makes to what it watches.
pub struct EventOps<'a> {
    epoll: &'a Epoll,
    owners: &'a mut HashMap<RawFd, SubscriberId>,
    id: SubscriberId,
}

impl EventOps<'_> {
    fn ctl(&self, op: ControlOperation, events: &Events) -> Result<()> {
        self.epoll
            .ctl(op, events.fd, events.epoll_event())
            .map_err(|source| Error::Control {
                fd: events.fd,
                source,
            })
    }

    fn check_owner(&self, fd: RawFd) -> Result<()> {
        match self.owners.get(&fd) {
            Some(owner) if *owner == self.id => Ok(()),
            _ => Err(Error::NotOwned(fd)),
        }
    }

    /// Starts watching `events.fd()` for `events.event_set()`.
    pub fn add(&mut self, events: Events) -> Result<()> {
        if self.owners.contains_key(&events.fd) {
            return Err(Error::FdAlreadyRegistered(events.fd));
        }
        self.ctl(ControlOperation::Add, &events)?;
        self.owners.insert(events.fd, self.id);
        Ok(())
    }

    /// Changes the events (and data) watched on a descriptor this
    /// subscriber added.
    pub fn modify(&self, events: Events) -> Result<()> {
        self.check_owner(events.fd)?;
        self.ctl(ControlOperation::Modify, &events)
    }

    /// Stops watching a descriptor this subscriber added.
    pub fn remove(&mut self, events: Events) -> Result<()> {
        self.check_owner(events.fd)?;
        self.ctl(ControlOperation::Delete, &events)?;
        self.owners.remove(&events.fd);
        Ok(())
    }
}

/// Something the event loop calls when its descriptors have events.
pub trait MutEventSubscriber {
    /// Handles `events`; may change what it watches through `ops`.
    fn process(&mut self, events: Events, ops: &mut EventOps);
    /// Registers the descriptors to watch; called when added.
    fn init(&mut self, ops: &mut EventOps);
}

impl<T: MutEventSubscriber + ?Sized> MutEventSubscriber for Arc<Mutex<T>> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .process(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.lock().unwrap_or_else(|e| e.into_inner()).init(ops);
    }
}

impl<T: MutEventSubscriber + ?Sized> MutEventSubscriber for Box<T> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        (**self).process(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        (**self).init(ops);
    }
}

/// Adding, finding and removing subscribers.
pub trait SubscriberOps {
    type Subscriber: MutEventSubscriber;
    /// Adds a subscriber and calls its `init`.
    fn add_subscriber(&mut self, subscriber: Self::Subscriber) -> SubscriberId;
    /// Removes a subscriber and everything it watches.
    fn remove_subscriber(&mut self, id: SubscriberId) -> Result<Self::Subscriber>;
    fn subscriber_mut(&mut self, id: SubscriberId) -> Result<&mut Self::Subscriber>;
    /// The operations of subscriber `id`, to change what it watches.
    fn event_ops(&mut self, id: SubscriberId) -> Result<EventOps<'_>>;
}

/// Most events one wait returns.
const MAX_READY: usize = 256;

/// The event loop.
pub struct EventManager<T> {
    epoll: Epoll,
    subscribers: HashMap<SubscriberId, T>,
    owners: HashMap<RawFd, SubscriberId>,
    next_id: u64,
    ready: Vec<EpollEvent>,
}

impl<T: MutEventSubscriber> EventManager<T> {
    pub fn new() -> Result<EventManager<T>> {
        Ok(EventManager {
            epoll: Epoll::new().map_err(Error::Create)?,
            subscribers: HashMap::new(),
            owners: HashMap::new(),
            next_id: 0,
            ready: vec![EpollEvent::default(); MAX_READY],
        })
    }

    /// Waits for events without a limit and dispatches them; returns how
    /// many came.
    pub fn run(&mut self) -> Result<usize> {
        self.run_with_timeout(-1)
    }

    /// Waits up to `timeout` ms (-1: no limit) and dispatches what came;
    /// returns how many events came (0 on a timeout or a signal).
    pub fn run_with_timeout(&mut self, timeout: i32) -> Result<usize> {
        let n = match self.epoll.wait(timeout, &mut self.ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(Error::Wait(e)),
        };
        for i in 0..n {
            let event = self.ready[i];
            let fd = event.data() as u32 as RawFd;
            // Removed by an earlier event of this wait: skip it.
            let Some(&id) = self.owners.get(&fd) else {
                continue;
            };
            let Some(subscriber) = self.subscribers.get_mut(&id) else {
                continue;
            };
            let events = Events::with_data_raw(fd, (event.data() >> 32) as u32, event.event_set());
            let mut ops = EventOps {
                epoll: &self.epoll,
                owners: &mut self.owners,
                id,
            };
            subscriber.process(events, &mut ops);
        }
        Ok(n)
    }
}

impl<T: MutEventSubscriber> SubscriberOps for EventManager<T> {
    type Subscriber = T;

    fn add_subscriber(&mut self, mut subscriber: T) -> SubscriberId {
        let id = SubscriberId(self.next_id);
        self.next_id += 1;
        let mut ops = EventOps {
            epoll: &self.epoll,
            owners: &mut self.owners,
            id,
        };
        subscriber.init(&mut ops);
        self.subscribers.insert(id, subscriber);
        id
    }

    fn remove_subscriber(&mut self, id: SubscriberId) -> Result<T> {
        let subscriber = self.subscribers.remove(&id).ok_or(Error::InvalidId)?;
        let fds: Vec<RawFd> = self
            .owners
            .iter()
            .filter(|(_, owner)| **owner == id)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in fds {
            self.owners.remove(&fd);
            // The descriptor may be closed already: nothing to remove then.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        Ok(subscriber)
    }

    fn subscriber_mut(&mut self, id: SubscriberId) -> Result<&mut T> {
        self.subscribers.get_mut(&id).ok_or(Error::InvalidId)
    }

    fn event_ops(&mut self, id: SubscriberId) -> Result<EventOps<'_>> {
        if !self.subscribers.contains_key(&id) {
            return Err(Error::InvalidId);
        }
        Ok(EventOps {
            epoll: &self.epoll,
            owners: &mut self.owners,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventFd, EFD_NONBLOCK};

    /// Counts its event's wake-ups; stops watching after `limit`.
    struct Counter {
        event: EventFd,
        data: u32,
        seen: Vec<(u32, bool)>,
        limit: usize,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            assert_eq!(events.fd(), self.event.as_raw_fd());
            let _ = self.event.read();
            self.seen
                .push((events.data(), events.event_set().contains(EventSet::IN)));
            if self.seen.len() == self.limit {
                ops.remove(events).unwrap();
            }
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::with_data(&self.event, self.data, EventSet::IN))
                .unwrap();
        }
    }

    fn counter(data: u32, limit: usize) -> Arc<Mutex<Counter>> {
        Arc::new(Mutex::new(Counter {
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
            data,
            seen: Vec::new(),
            limit,
        }))
    }

    #[test]
    fn events_reach_their_subscriber_with_their_data() {
        let mut em = EventManager::<Arc<Mutex<Counter>>>::new().unwrap();
        let a = counter(7, 2);
        let b = counter(9, 10);
        em.add_subscriber(a.clone());
        let b_id = em.add_subscriber(b.clone());
        // Nothing ready: a zero timeout returns at once.
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
        a.lock().unwrap().event.write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(a.lock().unwrap().seen, vec![(7, true)]);
        assert!(b.lock().unwrap().seen.is_empty());
        b.lock().unwrap().event.write(1).unwrap();
        a.lock().unwrap().event.write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 2);
        assert_eq!(b.lock().unwrap().seen, vec![(9, true)]);
        // `a` removed itself after its second event: no more for it.
        a.lock().unwrap().event.write(1).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
        assert_eq!(a.lock().unwrap().seen.len(), 2);
        // Removing `b` stops its events too.
        em.remove_subscriber(b_id).unwrap();
        b.lock().unwrap().event.write(1).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
        assert!(matches!(em.remove_subscriber(b_id), Err(Error::InvalidId)));
    }

    #[test]
    fn a_descriptor_has_one_owner() {
        let mut em = EventManager::<Arc<Mutex<Counter>>>::new().unwrap();
        let a = counter(1, 10);
        let a_id = em.add_subscriber(a.clone());
        let b_id = em.add_subscriber(counter(2, 10));
        let fd = a.lock().unwrap().event.as_raw_fd();
        let mut ops = em.event_ops(b_id).unwrap();
        assert!(matches!(
            ops.add(Events::new_raw(fd, EventSet::IN)),
            Err(Error::FdAlreadyRegistered(f)) if f == fd
        ));
        assert!(matches!(
            ops.modify(Events::new_raw(fd, EventSet::OUT)),
            Err(Error::NotOwned(f)) if f == fd
        ));
        assert!(matches!(
            ops.remove(Events::new_raw(fd, EventSet::IN)),
            Err(Error::NotOwned(_))
        ));
        // The owner may change its data.
        em.event_ops(a_id)
            .unwrap()
            .modify(Events::with_data_raw(fd, 5, EventSet::IN))
            .unwrap();
        a.lock().unwrap().event.write(1).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(a.lock().unwrap().seen, vec![(5, true)]);
    }
}
