//! What differs between two versions of a component's configuration, change by change: what a
//! running component compares when the config servers send it a newer slice, to apply what it
//! can live and report the rest as waiting for its restart.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::{NodeConfig, VolumeView};

/// One difference between two configurations of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The node's own endpoint (address, limits, data directory).
    Endpoint {
        fields: Vec<String>,
    },
    WrlAdded(String),
    WrlRemoved(String),
    WrlChanged {
        name: String,
        fields: Vec<String>,
    },
    VolumeAdded(String),
    VolumeRemoved(String),
    /// Fields of the volume itself (`retention`, `replicas`, ...), or `key`, `staging`, or
    /// `replica NAME` for what it refers to.
    VolumeChanged {
        name: String,
        fields: Vec<String>,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Endpoint { fields } => write!(f, "endpoint: {}", fields.join(", ")),
            Change::WrlAdded(n) => write!(f, "wrl {n} added"),
            Change::WrlRemoved(n) => write!(f, "wrl {n} removed"),
            Change::WrlChanged { name, fields } => write!(f, "wrl {name}: {}", fields.join(", ")),
            Change::VolumeAdded(n) => write!(f, "volume {n} added"),
            Change::VolumeRemoved(n) => write!(f, "volume {n} removed"),
            Change::VolumeChanged { name, fields } => write!(f, "volume {name}: {}", fields.join(", ")),
        }
    }
}

/// The names of the fields whose values differ (as JSON objects).
pub fn fields<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    let obj = |v: &T| match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m.into_iter().collect::<BTreeMap<String, Value>>(),
        _ => BTreeMap::new(),
    };
    let (a, b) = (obj(old), obj(new));
    let mut out: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    out.dedup();
    out
}

/// How a volume's resolved view changed (empty: not at all).
pub fn volume_fields(old: &VolumeView, new: &VolumeView) -> Vec<String> {
    let mut out = fields(&old.volume, &new.volume);
    if old.key != new.key {
        out.push("key".into());
    }
    if old.wrl != new.wrl {
        out.push(format!("wrl {}", new.wrl_name));
    }
    if old.staging != new.staging {
        out.push("staging".into());
    }
    for (name, ep) in &new.replicas {
        if old.replicas.iter().any(|(n, e)| n == name && e != ep) {
            out.push(format!("replica {name}"));
        }
    }
    out
}

/// Every difference between `old` and `new`, endpoint first, then WRLs, then volumes, by name;
/// [`in_order`] puts them in the order to apply them.
pub fn node_changes(old: &NodeConfig, new: &NodeConfig) -> Vec<Change> {
    let mut out = Vec::new();
    let ep = fields(&old.endpoint, &new.endpoint);
    if !ep.is_empty() {
        out.push(Change::Endpoint { fields: ep });
    }
    let (ow, nw): (BTreeMap<_, _>, BTreeMap<_, _>) =
        (old.wrls.iter().map(|(n, w)| (n, w)).collect(), new.wrls.iter().map(|(n, w)| (n, w)).collect());
    for (n, w) in &nw {
        match ow.get(n) {
            None => out.push(Change::WrlAdded((*n).clone())),
            Some(o) if o != w => out.push(Change::WrlChanged { name: (*n).clone(), fields: fields(*o, *w) }),
            Some(_) => {}
        }
    }
    out.extend(ow.keys().filter(|n| !nw.contains_key(*n)).map(|n| Change::WrlRemoved((*n).clone())));
    let ov: BTreeMap<_, _> = old.volumes.iter().map(|v| (&v.name, v)).collect();
    let nv: BTreeMap<_, _> = new.volumes.iter().map(|v| (&v.name, v)).collect();
    for (n, v) in &nv {
        match ov.get(n) {
            None => out.push(Change::VolumeAdded((*n).clone())),
            Some(o) => {
                let f = volume_fields(o, v);
                if !f.is_empty() {
                    out.push(Change::VolumeChanged { name: (*n).clone(), fields: f });
                }
            }
        }
    }
    out.extend(ov.keys().filter(|n| !nv.contains_key(*n)).map(|n| Change::VolumeRemoved((*n).clone())));
    out
}

/// `changes` in the order to apply them: removals first (a volume renamed keeps its id: the old
/// name goes before the new one comes), then the rest.
pub fn in_order(mut changes: Vec<Change>) -> Vec<Change> {
    changes.sort_by_key(|c| !matches!(c, Change::VolumeRemoved(_) | Change::WrlRemoved(_)));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endpoint, KeyRef, Role, Volume, WrlDef};

    fn endpoint(addr: &str) -> Endpoint {
        serde_json::from_value(serde_json::json!({"role": "replica", "address": addr})).unwrap()
    }

    fn view(name: &str, retention: Option<u64>) -> VolumeView {
        let volume: Volume = serde_json::from_value(serde_json::json!({
            "id": 1, "size_bytes": 1048576, "wrl": "w0", "replicas": ["r1"], "key": "k1"
        }))
        .unwrap();
        let wrl: WrlDef = serde_json::from_value(serde_json::json!({"staging": "s1", "devices": ["/wrl0"]})).unwrap();
        VolumeView {
            name: name.into(),
            volume: Volume { retention, ..volume },
            key: KeyRef { key_id: 1, path: "/k".into() },
            wrl_name: "w0".into(),
            wrl,
            staging: ("s1".into(), endpoint("127.0.0.1:1")),
            replicas: vec![("r1".into(), endpoint("127.0.0.1:2"))],
        }
    }

    #[test]
    fn changes_are_named_one_by_one() {
        let old = NodeConfig {
            name: "r1".into(),
            endpoint: endpoint("127.0.0.1:2"),
            wrls: vec![],
            volumes: vec![view("a", None), view("b", None)],
        };
        assert!(node_changes(&old, &old).is_empty());
        let mut new = old.clone();
        new.endpoint.max_connections = 9;
        new.volumes = vec![view("a", Some(3600)), view("c", None)];
        new.volumes[0].replicas[0].1 = endpoint("127.0.0.1:3");
        let c: Vec<String> = node_changes(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            c,
            ["endpoint: max_connections", "volume a: retention, replica r1", "volume c added", "volume b removed"]
        );
        assert_eq!(new.endpoint.role, Role::Replica);
    }
}
