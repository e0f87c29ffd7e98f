//! The JSON shapes of the API, built explicitly from the plain `node::handle` types so
//! that no serialization format leaks into the runtime. `docs/notes/api.md` documents
//! each shape; changing one here is changing the public contract.

use serde_json::{json, Value};

use crate::node::handle::{
    AppInfo, CheckpointView, ClusterView, DeployOk, FlipOk, ModuleEvent, PeerView, StatusView,
};

pub fn error(message: &str) -> Value {
    json!({ "error": message })
}

pub fn deploy_ok(ok: &DeployOk) -> Value {
    json!({ "module": ok.module, "index": ok.index })
}

fn module_event(event: &ModuleEvent) -> Value {
    json!({
        "module": event.module,
        "index": event.index,
        "migrated": event.migrated,
        "failed": event.failed,
    })
}

pub fn app(info: &AppInfo) -> Value {
    json!({
        "module": info.module,
        "index": info.index,
        "history": info.history.iter().map(module_event).collect::<Vec<_>>(),
    })
}

fn peer(peer: &PeerView) -> Value {
    json!({
        "id": peer.id,
        "peer": peer.peer,
        "http": peer.http,
        "connected": peer.connected,
        "chosen_index": peer.chosen_index,
        "apply_rules_max": peer.apply_rules_max,
    })
}

pub fn status(status: &StatusView) -> Value {
    let (round, node) = status.ballot;
    json!({
        "id": status.id,
        "role": status.role,
        "membership": status.membership,
        "leader": status.leader,
        "ballot": { "round": round, "node": node },
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "snapshot_index": status.snapshot_index,
        "apply_rules": status.apply_rules,
        "voting": status.voting,
        "module": status.module,
        "state_hash": status.state_hash.as_ref().map(|(index, hash)| json!({ "index": index, "hash": hash })),
        "peers": status.peers.iter().map(peer).collect::<Vec<_>>(),
        "checkpoint": status.checkpoint.as_ref().map(checkpoint),
        "disk": status.disk.as_ref().map(|disk| json!({
            "free_bytes": disk.free_bytes,
            "free_bytes_min": disk.free_bytes_min,
            "low": disk.low,
        })),
    })
}

fn checkpoint(checkpoint: &CheckpointView) -> Value {
    json!({
        "index": checkpoint.index,
        "hash": checkpoint.hash,
        "agreed": checkpoint.agreed,
    })
}

pub fn flip_ok(ok: &FlipOk) -> Value {
    json!({ "applied_index": ok.applied_index })
}

pub fn cluster(cluster: &ClusterView) -> Value {
    json!({
        "members": cluster.members.iter().map(|member| json!({
            "id": member.id,
            "role": member.role,
            "peer": member.peer,
            "http": member.http,
        })).collect::<Vec<_>>(),
        "leader": cluster.leader,
        "voters": cluster.voters,
        "old_voters": cluster.old_voters,
        "learners": cluster.learners,
        "joint": cluster.old_voters.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_newest_checkpoint() {
        let mut view = StatusView {
            id: 2,
            role: "follower".into(),
            membership: "voter".into(),
            leader: Some(1),
            ballot: (1, 1),
            commit_index: 2000,
            applied_index: 2000,
            module: None,
            state_hash: None,
            peers: Vec::new(),
            checkpoint: None,
            disk: None,
            snapshot_index: 1900,
            apply_rules: 2,
            voting: true,
        };
        assert_eq!(status(&view)["checkpoint"], Value::Null);
        view.checkpoint = Some(CheckpointView {
            index: 2000,
            hash: format!("sha256:{:064x}", 7),
            agreed: true,
        });
        assert_eq!(
            status(&view)["checkpoint"],
            json!({ "index": 2000, "hash": format!("sha256:{:064x}", 7), "agreed": true })
        );
    }
}
