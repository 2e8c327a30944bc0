//! virtio-blk on the VM's event loop: activation, then one doorbell.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;
use crate::virtio::VirtioDevice;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.base().activate_evt(), EventSet::IN)) {
            log::error!(
                "virtio-blk {}: cannot watch activation: {e}",
                self.drive_id()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.base().activate_evt().as_raw_fd() {
            self.base_mut().watch_queues(ops);
            // Requests may already be waiting (after a restore, or a notify before activation).
            self.process_queue();
        } else if self.base().doorbell(events.fd()).is_some() {
            self.process_queue();
        }
    }
}
