//! virtio-net: being written.
