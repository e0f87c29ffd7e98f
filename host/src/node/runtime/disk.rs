//! Free disk space: a replica whose data directory runs low on space steps out of
//! everything that writes, before a full disk would stop it.
//!
//! A write the store cannot complete is fail-stop (the process aborts, see
//! `storage`): continuing after it could acknowledge what is not durable. So the
//! replica watches the free space of its data directory's filesystem (every
//! `NodeConfig::disk_check_interval_ms`) and, below `disk_free_bytes_min`, stops
//! taking part in writes while it keeps serving:
//! - the front end answers commands, deploys and membership changes with 507
//!   (`service.rs`);
//! - the messages that make a replica write are dropped as if the network had lost
//!   them: incoming `Prepare`, `Accept`, `Chosen` and forwarded commands, incoming
//!   snapshot offers and chunks; outgoing `PreVote`, `Prepare`, `Accept` and
//!   `Heartbeat`, and incoming `PreVoteReply` and `Promise`, so the replica neither
//!   campaigns nor goes on leading (its followers stop hearing from it and elect
//!   another leader, whose heartbeats it still receives); local snapshots wait.
//!
//! What still writes, and is small: a leader that goes low accepts, locally, the
//! commands already queued (never chosen without a quorum; the next leader fills
//! those slots with no-ops); a heartbeat can move the durable chosen index; and a
//! cluster of one voter sends itself its campaign inside the core, so it still elects
//! itself (a promise and a no-op). Before a snapshot is written or received, the free
//! space must also cover its size (`room_for`): the gap between this threshold and a
//! really full disk is smaller than a large snapshot.
//!
//! Why this is safe: Paxos tolerates the loss of any message, and the simulator
//! checks the core under message loss; nothing here reaches inside the core. Reads
//! (`stale` anywhere, `lease`/`linearizable` once another replica leads), status and
//! metrics go on. When the free space is back above the threshold (plus an eighth,
//! so a replica at the edge does not flap), the replica catches up like one that was
//! cut off: from the leader's log or a snapshot.

use crate::node::transfer::TransferMessage;
use crate::paxos::Message;

/// Whether this replica is low on disk space, and what it last measured.
#[derive(Clone, Debug)]
pub(crate) struct DiskWatch {
    /// Below this many free bytes the replica is low (0: never).
    pub free_bytes_min: u64,
    /// Free bytes at the last check (`None`: not measured yet, or the filesystem
    /// could not be asked).
    pub free_bytes: Option<u64>,
    pub low: bool,
    /// Test hook (`POST /v1/debug/disk-free`): pretend this many bytes are free.
    pub pretend_free_bytes: Option<u64>,
    /// The last attempt to measure failed (logged once per failing spell).
    pub measure_failing: bool,
}

/// A change of `DiskWatch::low`, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DiskChange {
    BecameLow,
    Recovered,
}

impl DiskWatch {
    pub fn new(free_bytes_min: u64) -> DiskWatch {
        DiskWatch {
            free_bytes_min,
            free_bytes: None,
            low: false,
            pretend_free_bytes: None,
            measure_failing: false,
        }
    }

    /// Records a measurement (`None`: the filesystem could not be asked, which keeps
    /// the previous verdict) and says whether the verdict changed.
    pub fn observe(&mut self, measured: Option<u64>) -> Option<DiskChange> {
        let free = self.pretend_free_bytes.or(measured)?;
        self.free_bytes = Some(free);
        let recovered_at = self
            .free_bytes_min
            .saturating_add((self.free_bytes_min / 8).max(1));
        if !self.low && free < self.free_bytes_min {
            self.low = true;
            Some(DiskChange::BecameLow)
        } else if self.low && free >= recovered_at {
            self.low = false;
            Some(DiskChange::Recovered)
        } else {
            None
        }
    }

    /// Whether `bytes` more can be written without going below the threshold, by the
    /// last measurement (at most one check interval old). Always true with the check
    /// off or before the first measurement.
    pub fn room_for(&self, bytes: u64) -> bool {
        match self.free_bytes {
            Some(free) if self.free_bytes_min > 0 => {
                !self.low && free >= self.free_bytes_min.saturating_add(bytes)
            }
            _ => true,
        }
    }

    /// Why commands are refused here, for the 507 body.
    pub fn reason(&self) -> String {
        format!(
            "the disk of this replica is nearly full ({} bytes free, below --disk-free-bytes-min {}): \
             it refuses writes until space is freed; reads still work",
            self.free_bytes.unwrap_or(0),
            self.free_bytes_min
        )
    }

    /// An incoming consensus message to drop while low: handling it would write.
    pub fn drops_inbound(&self, msg: &Message) -> bool {
        self.low
            && matches!(
                msg,
                Message::Prepare { .. }
                    | Message::Accept { .. }
                    | Message::Chosen { .. }
                    | Message::Forward { .. }
                    // Answers to a campaign started before the disk ran low: the
                    // replica must not win it now.
                    | Message::PreVoteReply { .. }
                    | Message::Promise { .. }
            )
    }

    /// An outgoing consensus message to drop while low: campaigning and leading
    /// would make this replica write.
    pub fn drops_outbound(&self, msg: &Message) -> bool {
        self.low && leads_or_campaigns(msg)
    }

    /// An incoming snapshot-transfer message to drop while low: receiving a snapshot
    /// writes it. Serving a peer's `Request` or `Fetch` only reads.
    pub fn drops_transfer(&self, message: &TransferMessage) -> bool {
        self.low
            && matches!(
                message,
                TransferMessage::Offer { .. } | TransferMessage::Chunk { .. }
            )
    }
}

/// A message only a campaigning or leading replica sends: without them it neither
/// wins an election nor keeps its followers, who elect another leader.
pub(crate) fn leads_or_campaigns(msg: &Message) -> bool {
    matches!(
        msg,
        Message::PreVote { .. }
            | Message::Prepare { .. }
            | Message::Accept { .. }
            | Message::Heartbeat { .. }
    )
}

/// Free bytes on the filesystem holding `dir`, for an unprivileged process.
pub(crate) fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::{DiskChange, DiskWatch};
    use crate::node::snapshot::SnapshotId;
    use crate::node::transfer::TransferMessage;
    use crate::paxos::{Ballot, Message};

    #[test]
    fn low_below_the_minimum_and_back_only_an_eighth_above_it() {
        let mut disk = DiskWatch::new(800);
        assert_eq!(disk.observe(Some(10_000)), None);
        assert!(!disk.low);
        assert_eq!(disk.observe(Some(799)), Some(DiskChange::BecameLow));
        assert_eq!(disk.observe(Some(500)), None);
        assert_eq!(disk.observe(Some(899)), None, "not yet an eighth above");
        assert!(disk.low);
        assert_eq!(disk.observe(Some(900)), Some(DiskChange::Recovered));
        assert_eq!(disk.free_bytes, Some(900));
        // A filesystem that cannot be asked keeps the verdict.
        assert_eq!(disk.observe(Some(1)), Some(DiskChange::BecameLow));
        assert_eq!(disk.observe(None), None);
        assert!(disk.low);
    }

    #[test]
    fn a_zero_minimum_is_never_low_and_the_test_hook_overrides_the_measurement() {
        let mut disk = DiskWatch::new(0);
        assert_eq!(disk.observe(Some(0)), None);
        assert!(!disk.low);
        let mut disk = DiskWatch::new(1 << 20);
        disk.pretend_free_bytes = Some(0);
        assert_eq!(disk.observe(Some(u64::MAX)), Some(DiskChange::BecameLow));
        assert_eq!(disk.free_bytes, Some(0));
        assert!(disk.reason().contains("0 bytes free"), "{}", disk.reason());
        disk.pretend_free_bytes = None;
        assert_eq!(disk.observe(Some(u64::MAX)), Some(DiskChange::Recovered));
    }

    #[test]
    fn while_low_only_the_messages_that_write_are_dropped() {
        let ballot = Ballot { round: 3, node: 1 };
        let writes_in = [
            Message::Prepare {
                ballot,
                first_slot: 1,
            },
            Message::Chosen {
                ballot,
                entries: Vec::new(),
                chosen_index: 4,
            },
        ];
        let campaigns_out = [
            Message::PreVote { round: 4 },
            Message::Heartbeat {
                ballot,
                seq: 1,
                chosen_index: 4,
            },
        ];
        let harmless = [
            Message::Reject { promised: ballot },
            Message::Accepted { ballot, slot: 2 },
            Message::HeartbeatAck {
                ballot,
                seq: 1,
                chosen_index: 4,
            },
            Message::Learned {
                ballot,
                chosen_index: 4,
            },
        ];
        let id = SnapshotId {
            slot: 10,
            sha256: [7; 32],
            file_bytes: 100,
        };
        let mut disk = DiskWatch::new(100);
        for msg in writes_in.iter().chain(&campaigns_out).chain(&harmless) {
            assert!(!disk.drops_inbound(msg) && !disk.drops_outbound(msg));
        }
        assert!(!disk.drops_transfer(&TransferMessage::Offer { id }));
        assert!(disk.room_for(0), "not measured yet");
        disk.observe(Some(1000));
        assert!(disk.room_for(900) && !disk.room_for(901));
        disk.observe(Some(0));
        assert!(!disk.room_for(0));
        for msg in [
            Message::PreVoteReply {
                round: 4,
                granted: true,
                promised: ballot,
            },
            Message::Promise {
                ballot,
                first_slot: 1,
                entries: Vec::new(),
            },
        ] {
            assert!(disk.drops_inbound(&msg), "{msg:?}");
        }
        for msg in &writes_in {
            assert!(disk.drops_inbound(msg), "{msg:?}");
        }
        for msg in &campaigns_out {
            assert!(disk.drops_outbound(msg), "{msg:?}");
        }
        // A heartbeat still comes in: it is how a low leader learns its successor.
        assert!(!disk.drops_inbound(&campaigns_out[1]));
        for msg in &harmless {
            assert!(
                !disk.drops_inbound(msg) && !disk.drops_outbound(msg),
                "{msg:?}"
            );
        }
        assert!(disk.drops_transfer(&TransferMessage::Offer { id }));
        assert!(disk.drops_transfer(&TransferMessage::Chunk {
            id,
            offset: 0,
            data: vec![1],
        }));
        assert!(!disk.drops_transfer(&TransferMessage::Request { slot_min: 1 }));
        assert!(!disk.drops_transfer(&TransferMessage::Fetch {
            id,
            offset: 0,
            resend: false,
        }));
    }
}
