//! loadlab's gRPC contracts: generated tonic clients/servers and prost messages.
#![forbid(unsafe_code)]

/// `loadlab.feed.v1`: posts and the follow graph.
pub mod feed {
    /// Version 1 of the feed contract.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("loadlab.feed.v1");
    }
}

/// `loadlab.timeline.v1`: home and author timelines.
pub mod timeline {
    /// Version 1 of the timeline contract.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("loadlab.timeline.v1");
    }
}

/// `loadlab.presence.v1`: who is online, per user and per channel.
pub mod presence {
    /// Version 1 of the presence contract.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("loadlab.presence.v1");
    }
}

/// `loadlab.runner.v1`: the coordinator protocol of distributed runs.
pub mod runner {
    /// Version 1 of the coordinator protocol.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("loadlab.runner.v1");
    }
}

/// Encoded `FileDescriptorSet` of every loadlab proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/loadlab_descriptor.bin"));
