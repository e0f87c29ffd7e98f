//! `paxwasm members list|add|promote|remove|set-voters`: membership changes over the HTTP
//! API (`GET /v1/cluster`, `POST /v1/cluster/members`, `POST
//! /v1/cluster/members/{id}/promote`, `DELETE /v1/cluster/members/{id}`, `PUT
//! /v1/cluster/voters`). Any replica can be the endpoint: followers forward
//! changes to the leader. A change prints the cluster once it is applied.

use std::fmt::Write as _;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::client::{failed, pretty, run, EndpointArgs};

/// List the members, add, promote or remove one, or set the voters in one step.
#[derive(Debug, Args)]
pub struct MembersArgs {
    #[command(subcommand)]
    pub command: MembersCommand,
}

#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// Show voters, learners and a change in progress (GET /v1/cluster).
    List {
        /// The JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Add a non-voting learner: start it first with `paxwasm node` without `--cluster`
    /// (POST /v1/cluster/members).
    Add {
        /// The new member's id (unused in this cluster).
        id: u64,
        /// Its peer address (ip:port, as given to its `--peer`).
        #[arg(long)]
        peer: String,
        /// Its HTTP address (host:port).
        #[arg(long)]
        http: String,
        /// The JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Make a learner a voter through joint consensus; refused while it lags
    /// (POST /v1/cluster/members/ID/promote).
    Promote {
        id: u64,
        /// The JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Remove a voter or learner (DELETE /v1/cluster/members/ID).
    Remove {
        id: u64,
        /// Remove even if fewer than a majority of the remaining voters are running.
        #[arg(long)]
        force: bool,
        /// The JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Make exactly these ids the voters in one joint-consensus change (add several,
    /// remove several, replace a majority); each must be a voter or a caught-up learner
    /// now, voters left out leave the cluster (PUT /v1/cluster/voters).
    SetVoters {
        /// The voters after the change, comma-separated: 4,5,6.
        #[arg(value_delimiter = ',', required = true)]
        ids: Vec<u64>,
        /// Change even if fewer than a majority of the new voters are running.
        #[arg(long)]
        force: bool,
        /// The JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
}

pub fn members(args: MembersArgs) -> ExitCode {
    run(async move {
        let (method, path, body, json, endpoint) = match args.command {
            MembersCommand::List { json, endpoint } => {
                (Method::GET, "/v1/cluster".to_owned(), None, json, endpoint)
            }
            MembersCommand::Add {
                id,
                peer,
                http,
                json,
                endpoint,
            } => (
                Method::POST,
                "/v1/cluster/members".to_owned(),
                Some(json!({ "id": id, "peer": peer, "http": http })),
                json,
                endpoint,
            ),
            MembersCommand::Promote { id, json, endpoint } => (
                Method::POST,
                format!("/v1/cluster/members/{id}/promote"),
                None,
                json,
                endpoint,
            ),
            MembersCommand::Remove {
                id,
                force,
                json,
                endpoint,
            } => (
                Method::DELETE,
                if force {
                    format!("/v1/cluster/members/{id}?force=true")
                } else {
                    format!("/v1/cluster/members/{id}")
                },
                None,
                json,
                endpoint,
            ),
            MembersCommand::SetVoters {
                ids,
                force,
                json,
                endpoint,
            } => (
                Method::PUT,
                if force {
                    "/v1/cluster/voters?force=true".to_owned()
                } else {
                    "/v1/cluster/voters".to_owned()
                },
                Some(json!({ "voters": ids })),
                json,
                endpoint,
            ),
        };
        let headers = if method == Method::GET {
            Vec::new()
        } else {
            endpoint.authorization()?
        };
        let body = body.map_or_else(Bytes::new, |body| Bytes::from(body.to_string()));
        let mut connection = endpoint.connect()?;
        let reply = connection
            .request(method, &path, &headers, body)
            .await
            .map_err(|error| format!("{}: {error}", endpoint.endpoint))?;
        if reply.status != StatusCode::OK {
            return Err(failed(&reply));
        }
        let cluster: Value = serde_json::from_slice(&reply.body)
            .map_err(|error| format!("{path}: not JSON: {error}"))?;
        if json {
            println!("{}", pretty(&cluster));
        } else {
            print!("{}", members_table(&cluster));
        }
        Ok(())
    })
}

/// `ID  ROLE  PEER  HTTP` rows, the leader marked, then the configuration on one line.
fn members_table(cluster: &Value) -> String {
    let leader = cluster["leader"].as_u64();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<10} {:<22} {:<22}",
        "ID", "ROLE", "PEER", "HTTP"
    );
    for member in cluster["members"].as_array().into_iter().flatten() {
        let id = member["id"].as_u64().unwrap_or(0);
        let mark = if Some(id) == leader { "*" } else { "" };
        let _ = writeln!(
            out,
            "{:<6} {:<10} {:<22} {:<22}",
            format!("{id}{mark}"),
            member["role"].as_str().unwrap_or("?"),
            member["peer"].as_str().unwrap_or(""),
            member["http"].as_str().unwrap_or(""),
        );
    }
    let ids = |value: &Value| {
        value
            .as_array()
            .map(|ids| {
                ids.iter()
                    .map(|id| id.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let _ = write!(out, "voters {{{}}}", ids(&cluster["voters"]));
    if cluster["old_voters"].is_array() {
        let _ = write!(
            out,
            " joint with old voters {{{}}}",
            ids(&cluster["old_voters"])
        );
    }
    let _ = writeln!(
        out,
        " learners {{{}}} (* leader)",
        ids(&cluster["learners"])
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_marks_the_leader_and_a_joint_configuration() {
        let cluster = json!({
            "members": [
                {"id": 1, "role": "old-voter", "peer": "127.0.0.1:7101", "http": "127.0.0.1:7001"},
                {"id": 2, "role": "voter", "peer": "127.0.0.1:7102", "http": "127.0.0.1:7002"},
                {"id": 4, "role": "learner", "peer": "127.0.0.1:7104", "http": "127.0.0.1:7004"},
            ],
            "leader": 2,
            "voters": [2],
            "old_voters": [1, 2],
            "learners": [4],
            "joint": true,
        });
        let table = members_table(&cluster);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[2].starts_with("2*     voter "), "{}", lines[2]);
        assert_eq!(
            lines[4],
            "voters {2} joint with old voters {1,2} learners {4} (* leader)"
        );
    }
}
