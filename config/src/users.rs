//! Users of the web UI and the JSON API, and what each may do.
//!
//! A password is hashed (argon2id, a random salt, the PHC string format) before a command
//! carries it: [`hash_passwords`] turns `password=SECRET` into `password_hash=HASH` where the
//! change is made (the command line's local store, or the config server that received the API
//! request), so the raft log, the history and every copy of the store hold the hash only.
//! [`apply`](crate::command::apply) never sees a password and stays free of randomness.
//!
//! Roles: an **admin** may do everything; on a replication set, an **operator** may see its
//! volumes, change them and run operations on them, a **viewer** may see them. A volume in
//! several sets gives a user the highest role any of them grants. Nothing is allowed to a
//! disabled user.

use std::collections::BTreeMap;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use crate::{ConfigError, Kind, Op, ReplicationSet, SetRole, User};

/// The shortest password taken.
pub const PASSWORD_MIN: usize = 8;
/// The longest password taken (argon2 takes any length; a limit bounds the work of a login).
pub const PASSWORD_MAX: usize = 1024;

/// The fields of a volume an operator may change: how it is protected, not where its data goes.
pub const OPERATOR_FIELDS: [&str; 7] =
    ["bwlimit", "retention", "retention_bytes", "check_interval", "snapshot_bytes_limit", "paused", "resync"];

/// Hashes `password` (argon2id, a random salt).
pub fn hash(password: &str) -> Result<String, String> {
    let n = password.chars().count();
    if n < PASSWORD_MIN || password.len() > PASSWORD_MAX {
        return Err(format!(
            "a password has at least {PASSWORD_MIN} characters and at most {PASSWORD_MAX} bytes (this one: {n} characters, {} bytes)",
            password.len()
        ));
    }
    Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `h` is an argon2id hash in the PHC string format.
pub fn check_hash(h: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(h).map_err(|e| format!("is not a PHC password hash ({e})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!("is a {} hash, not argon2id", parsed.algorithm));
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("has no salt or no hash".into());
    }
    Ok(())
}

/// Whether `password` is `user`'s (a disabled user has none).
pub fn verify(user: &User, password: &str) -> bool {
    !user.disabled
        && password.len() <= PASSWORD_MAX
        && Argon2::default().verify_password(password.as_bytes(), user.password_hash.as_str()).is_ok()
}

/// Whether `ops` set a user's password (what [`hash_passwords`] replaces).
pub fn has_password(ops: &[Op]) -> bool {
    ops.iter().any(|op| match op {
        Op::Set { kind: Kind::User, assignments, .. } => assignments.iter().any(|a| is_password(a)),
        _ => false,
    })
}

/// A `password=...` assignment, its field name read as `set` reads it (trimmed).
pub(crate) fn is_password(a: &str) -> bool {
    a.split_once('=').is_some_and(|(k, _)| k.trim() == "password")
}

/// Replaces each `password=SECRET` of a user's `set` in `ops` by `password_hash=HASH`.
pub fn hash_passwords(ops: &mut [Op]) -> Result<(), ConfigError> {
    for op in ops {
        let Op::Set { kind: Kind::User, name, assignments, .. } = op else { continue };
        for a in assignments.iter_mut() {
            // The value exactly as given.
            let Some((_, secret)) = a.split_once('=').filter(|_| is_password(a)) else { continue };
            let h =
                hash(secret).map_err(|reason| ConfigError::Invalid { kind: Kind::User, name: name.clone(), reason })?;
            *a = format!("password_hash={h}");
        }
    }
    Ok(())
}

/// What a user asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// See a volume, its status, snapshots and history.
    View,
    /// Change a volume's entry, or run an operation on it (pause, resync, snapshot, check).
    Operate,
    /// Anything else: users, sets, endpoints, keys, WRLs, new volumes, config servers.
    Administer,
}

/// The highest role `user` has on `volume` through the sets that hold it.
pub fn role_on(user: &User, sets: &BTreeMap<String, ReplicationSet>, volume: &str) -> Option<SetRole> {
    user.grants
        .iter()
        .filter(|(set, _)| sets.get(*set).is_some_and(|s| s.volumes.iter().any(|v| v == volume)))
        .map(|(_, role)| *role)
        .max()
}

/// Whether `user` may do `action` (on `volume`, for `View` and `Operate`).
pub fn may(user: &User, sets: &BTreeMap<String, ReplicationSet>, action: Action, volume: Option<&str>) -> bool {
    if user.disabled {
        return false;
    }
    if user.admin {
        return true;
    }
    let role = volume.and_then(|v| role_on(user, sets, v));
    match action {
        Action::View => role.is_some(),
        Action::Operate => role == Some(SetRole::Operator),
        Action::Administer => false,
    }
}

/// Whether `user` may make the change `ops` (read against the entries as they are now:
/// `volumes`, `sets`): an admin any; an operator only changes to volumes that exist and that a
/// set of theirs holds, and never their set membership, replicas, WRL, key or id (those move
/// data between places an admin chose). Says which op is refused and why.
pub fn may_change(
    user: &User,
    sets: &BTreeMap<String, ReplicationSet>,
    volumes: &std::collections::BTreeSet<String>,
    ops: &[Op],
) -> Result<(), String> {
    if user.disabled {
        return Err("the user is disabled".into());
    }
    if user.admin {
        return Ok(());
    }
    for op in ops {
        let Op::Set { kind: Kind::Volume, name, assignments, .. } = op else {
            return Err(format!("{op}: only an admin may change that (operators change volumes of their sets)"));
        };
        if !volumes.contains(name) {
            return Err(format!("{op}: only an admin may create a volume"));
        }
        if role_on(user, sets, name) != Some(SetRole::Operator) {
            return Err(format!("{op}: volume {name:?} is in no set this user operates"));
        }
        for a in assignments {
            let field = a.split_once('=').map_or(a.as_str(), |(f, _)| f).trim();
            if !OPERATOR_FIELDS.contains(&field) {
                return Err(format!(
                    "{op}: only an admin may change {field} (an operator may change {})",
                    OPERATOR_FIELDS.join(", ")
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(admin: bool, grants: &[(&str, SetRole)]) -> User {
        User {
            password_hash: hash("correct horse").unwrap(),
            admin,
            grants: grants.iter().map(|(s, r)| (s.to_string(), *r)).collect(),
            disabled: false,
        }
    }

    fn sets() -> BTreeMap<String, ReplicationSet> {
        let s =
            |v: &[&str]| ReplicationSet { volumes: v.iter().map(|x| x.to_string()).collect(), ..Default::default() };
        [("a".to_string(), s(&["v1", "v2"])), ("b".to_string(), s(&["v2", "v3"]))].into_iter().collect()
    }

    #[test]
    fn passwords_are_hashed_and_checked() {
        let u = user(false, &[]);
        assert!(check_hash(&u.password_hash).is_ok(), "{}", u.password_hash);
        assert!(u.password_hash.starts_with("$argon2id$"));
        assert!(verify(&u, "correct horse"));
        assert!(!verify(&u, "correct hors"));
        assert!(!verify(&User { disabled: true, ..u.clone() }, "correct horse"), "disabled");
        assert!(hash("short").unwrap_err().contains("at least 8 characters"));
        assert!(hash("ééééé").unwrap_err().contains("5 characters, 10 bytes"));
        assert!(check_hash("plain").is_err());
        assert!(check_hash("$2b$12$abcdefghijklmnopqrstuv").is_err(), "bcrypt is refused");
        let mut ops = vec![Op::Set {
            kind: Kind::User,
            name: "alice".into(),
            assignments: vec!["password=correct horse".into(), "admin=true".into()],
            if_version: None,
        }];
        hash_passwords(&mut ops).unwrap();
        let Op::Set { assignments, .. } = &ops[0] else { unreachable!() };
        assert!(assignments[0].starts_with("password_hash=$argon2id$"), "{assignments:?}");
        assert!(!assignments.iter().any(|a| a.contains("correct horse")), "the password is gone");
    }

    /// Every role on its own sets and on others' (the rule the API and the UI both ask).
    #[test]
    fn roles_by_set() {
        let s = sets();
        let admin = user(true, &[]);
        let op_a = user(false, &[("a", SetRole::Operator)]);
        let view_b = user(false, &[("b", SetRole::Viewer), ("a", SetRole::Viewer)]);
        for v in ["v1", "v2", "v3", "v9"] {
            assert!(may(&admin, &s, Action::Operate, Some(v)));
        }
        assert!(may(&admin, &s, Action::Administer, None));
        assert!(may(&op_a, &s, Action::Operate, Some("v1")));
        assert!(may(&op_a, &s, Action::Operate, Some("v2")), "v2 is in a and b: the highest role counts");
        assert!(!may(&op_a, &s, Action::View, Some("v3")));
        assert!(!may(&op_a, &s, Action::Administer, None));
        assert!(may(&view_b, &s, Action::View, Some("v3")));
        assert!(!may(&view_b, &s, Action::Operate, Some("v3")));
        assert!(!may(&User { disabled: true, ..admin.clone() }, &s, Action::View, Some("v1")));

        let vols: std::collections::BTreeSet<String> = ["v1", "v2", "v3"].map(String::from).into();
        let set = |name: &str, a: &str| Op::Set {
            kind: Kind::Volume,
            name: name.into(),
            assignments: vec![a.into()],
            if_version: None,
        };
        assert!(may_change(&op_a, &s, &vols, &[set("v1", "bwlimit=10M")]).is_ok());
        assert!(may_change(&op_a, &s, &vols, &[set("v3", "bwlimit=10M")]).unwrap_err().contains("no set"));
        assert!(may_change(&op_a, &s, &vols, &[set("v1", "replicas=[\"r9\"]")]).unwrap_err().contains("replicas"));
        let moved = may_change(&op_a, &s, &vols, &[set("v1", "targets={\"r1\":\"/dev/sda\"}")]);
        assert!(moved.unwrap_err().contains("only an admin may change targets"));
        assert!(may_change(&op_a, &s, &vols, &[set("v1", " retention = 1h")]).is_ok(), "as set() reads it");
        let mut ops = vec![Op::Set {
            kind: Kind::User,
            name: "eve".into(),
            assignments: vec![" password =correct horse".into()],
            if_version: None,
        }];
        assert!(ops[0].to_string().contains("password=(hidden)") && !ops[0].to_string().contains("horse"));
        hash_passwords(&mut ops).unwrap();
        assert!(!format!("{ops:?}").contains("horse"), "a spaced field name is hashed too");
        assert!(!has_password(&ops), "nothing left to hash");
        assert!(may_change(&op_a, &s, &vols, &[set("v7", "size_bytes=1G")]).unwrap_err().contains("create"));
        let del = Op::Delete { kind: Kind::Volume, name: "v1".into(), if_version: None };
        assert!(may_change(&op_a, &s, &vols, std::slice::from_ref(&del)).unwrap_err().contains("only an admin"));
        assert!(may_change(&view_b, &s, &vols, &[set("v1", "bwlimit=1M")]).is_err());
        assert!(may_change(&admin, &s, &vols, &[del]).is_ok());
    }
}
