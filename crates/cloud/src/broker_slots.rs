//! The embedded broker's bound per device on messages handed over in-process and not yet taken
//! by the sync loop ([`crate::broker::BrokerLimits::max_device_messages_waiting`]).
//!
//! One semaphore per device, made with its first message. A device's entry is only needed
//! while one of its messages waits (a permit, which holds the semaphore) or its connection
//! waits for one; an entry nobody else holds is the same as a fresh one. So the map is swept of
//! such entries whenever it has doubled since the last sweep: it holds about the devices with
//! messages waiting, not every device that ever connected since the start.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Size below which the map is never swept: a small fleet costs nothing to keep.
const MIN_SWEEP_LEN: usize = 1024;

/// Per device (client id), its slots for messages handed over and not yet taken.
#[derive(Debug)]
pub(crate) struct DeviceSlots {
    per_device: usize,
    slots: HashMap<String, Arc<Semaphore>>,
    /// The map's length at which a new entry first sweeps it.
    sweep_at: usize,
}

impl DeviceSlots {
    /// `per_device` slots for each device (at least 1).
    pub(crate) fn new(per_device: usize) -> DeviceSlots {
        DeviceSlots {
            per_device: per_device.max(1),
            slots: HashMap::new(),
            sweep_at: MIN_SWEEP_LEN,
        }
    }

    /// The slots of device `client_id`.
    pub(crate) fn of(&mut self, client_id: &str) -> Arc<Semaphore> {
        if let Some(s) = self.slots.get(client_id) {
            return s.clone();
        }
        if self.slots.len() >= self.sweep_at {
            // Held elsewhere: a message of the device waits (its permit), or its connection
            // waits for a slot. Otherwise the entry is as good as a new one.
            self.slots.retain(|_, s| Arc::strong_count(s) > 1);
            self.slots.shrink_to_fit();
            self.sweep_at = (2 * self.slots.len()).max(MIN_SWEEP_LEN);
        }
        let s = Arc::new(Semaphore::new(self.per_device));
        self.slots.insert(client_id.to_string(), s.clone());
        s
    }

    /// Devices with an entry.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_without_waiting_messages_are_swept_and_held_ones_stay() {
        let mut slots = DeviceSlots::new(2);
        // Ten devices with a message waiting each: their permits hold their entries.
        let held: Vec<_> = (0..10)
            .map(|i| {
                let s = slots.of(&format!("acme/held{i}"));
                (s.clone(), s.try_acquire_owned().expect("a free slot"))
            })
            .collect();
        // A fleet passing through, none of whose messages waits any more.
        for i in 0..10_000 {
            let s = slots.of(&format!("acme/d{i}"));
            assert_eq!(s.available_permits(), 2, "a fresh entry has every slot");
            assert!(
                slots.len() <= MIN_SWEEP_LEN,
                "{} entries after {i} devices",
                slots.len()
            );
        }
        for (i, (s, _permit)) in held.iter().enumerate() {
            let again = slots.of(&format!("acme/held{i}"));
            assert!(
                Arc::ptr_eq(s, &again),
                "device {i}'s entry outlived the sweeps"
            );
            assert_eq!(
                again.available_permits(),
                1,
                "its waiting message still counts"
            );
        }
        // Once the messages are taken, the entries go with the next sweep too.
        drop(held);
        for i in 0..2 * MIN_SWEEP_LEN {
            slots.of(&format!("acme/e{i}"));
        }
        assert!(slots.len() <= MIN_SWEEP_LEN, "{}", slots.len());
    }

    #[test]
    fn a_map_of_devices_all_waiting_grows_and_sweeps_by_doubling() {
        let mut slots = DeviceSlots::new(1);
        let mut permits = Vec::new();
        for i in 0..3 * MIN_SWEEP_LEN {
            let s = slots.of(&format!("acme/d{i}"));
            permits.push(s.try_acquire_owned().expect("a free slot"));
        }
        // Nothing could be swept: every entry holds a waiting message.
        assert_eq!(slots.len(), 3 * MIN_SWEEP_LEN);
        assert!(slots.sweep_at >= slots.len(), "{}", slots.sweep_at);
    }
}
