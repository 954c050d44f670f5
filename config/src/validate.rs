//! The rules every configuration entry must satisfy, in one place: each field's range and unit
//! (checked on the typed entry, [`Entry::check`]), and the rules between entries (references,
//! roles, duplicates, paths two entries would share: [`cross_check`]). `ConfigStore::set` applies
//! both before anything is stored, so a configuration that cannot work is refused when it is
//! written, with a message that names the entry, the field, the value as it was given and what is
//! allowed, instead of failing later on a server.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use drv_format::frame::MAX_FRAME_BODY;
use drv_format::layout::{BATCH_HEADER_LEN, DATA_START, MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES, SEGMENT_HEADER_BYTES};
use drv_format::record::{MAX_WRITE_BYTES, RECORD_HEADER_LEN, TAG_LEN};

use crate::{Endpoint, KeyRef, Role, Volume, WrlDef};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// The smallest frame body that carries one Records frame of the largest write: its 16-byte
/// records header, the record's header and tag, and 4 MiB of data.
pub const MIN_FRAME_BYTES: u64 = 16 + RECORD_HEADER_LEN as u64 + TAG_LEN as u64 + MAX_WRITE_BYTES as u64;

/// Sizes in messages: `4096 (4 KiB)`-style, exact.
pub fn human(n: u64) -> String {
    for (unit, name) in [(TIB << 20, "EiB"), (TIB << 10, "PiB"), (TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")]
    {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{} {name}", n / unit);
        }
    }
    format!("{n} bytes")
}

/// Collects what is wrong with one entry. Values are shown as the administrator typed them when
/// this command set them (`raw`), else as stored.
pub struct Check<'a> {
    raw: &'a BTreeMap<String, String>,
    pub problems: Vec<String>,
}

impl<'a> Check<'a> {
    pub fn new(raw: &'a BTreeMap<String, String>) -> Self {
        Check { raw, problems: Vec::new() }
    }

    fn shown(&self, field: &str, value: &dyn std::fmt::Display) -> String {
        match self.raw.get(field) {
            Some(r) => format!("{field}={r}"),
            None => format!("{field}={value}"),
        }
    }

    /// Notes that `field` (holding `value`) `problem`s; `allowed` says what would do.
    pub fn fail(&mut self, field: &str, value: &dyn std::fmt::Display, problem: &str, allowed: &str) {
        let p = format!("{} {problem} (allowed: {allowed})", self.shown(field, value));
        self.problems.push(p);
    }

    /// A size from `min` to `max` bytes, in whole multiples of `unit`.
    fn size(&mut self, field: &str, v: u64, min: u64, max: u64, unit: u64) {
        let allowed = if unit > 1 {
            format!("{} to {}, a multiple of {}", human(min), human(max), human(unit))
        } else {
            format!("{} to {}", human(min), human(max))
        };
        if v < min {
            self.fail(field, &v, &format!("is below the minimum of {}", human(min)), &allowed);
        } else if v > max {
            self.fail(field, &v, &format!("is over the maximum of {}", human(max)), &allowed);
        } else if !v.is_multiple_of(unit) {
            self.fail(field, &v, &format!("is not a multiple of {}", human(unit)), &allowed);
        }
    }

    /// A count from `min` to `max`.
    fn count(&mut self, field: &str, v: u64, min: u64, max: u64) {
        if !(min..=max).contains(&v) {
            self.fail(field, &v, "is out of range", &format!("{min} to {max}"));
        }
    }

    fn absolute_path(&mut self, field: &str, p: &str) {
        if p.is_empty() || !Path::new(p).is_absolute() {
            self.fail(field, &format!("{p:?}"), "is not an absolute path", "an absolute path such as /srv/drv/x");
        }
    }
}

/// Field rules of one kind of entry.
pub trait Entry {
    fn check(&self, c: &mut Check<'_>);
}

impl Entry for Endpoint {
    fn check(&self, c: &mut Check<'_>) {
        if let Err(problem) = check_address(&self.address) {
            c.fail(
                "address",
                &format!("{:?}", self.address),
                &problem.to_string(),
                "HOST:PORT, port 1 to 65535, e.g. 10.0.0.5:7001",
            );
        }
        c.count("max_connections", self.max_connections as u64, 1, 65536);
        c.size("frame_bytes_limit", self.frame_bytes_limit, MIN_FRAME_BYTES, MAX_FRAME_BODY as u64, 1);
        c.size("inflight_bytes_limit", self.inflight_bytes_limit, 4 * MIB, 4 * GIB, 1);
        if let Some(d) = &self.data_dir {
            c.absolute_path("data_dir", d);
        }
        // Half the DR log must hold a whole Records frame beside a segment of slack (the receive
        // side waits for that much room): four frames and 64 MiB are enough for any segment size.
        let min_drlog = (64 * MIB).max((4 * self.frame_bytes_limit).next_multiple_of(MIB));
        c.size("drlog_bytes", self.drlog_bytes, min_drlog, 16 * TIB, MIB);
        // QUIC needs 1200-byte datagrams (1228-byte IP packets); far above jumbo frames s2n-quic's
        // sockets stop carrying the packets (65000 was seen to time out every connection on
        // loopback), so a larger value is refused here rather than there.
        if !(1228..=16384).contains(&self.max_mtu) {
            c.fail(
                "max_mtu",
                &self.max_mtu,
                "is out of range",
                "1228 (QUIC's minimum) to 16384; 9000 suits jumbo-frame networks",
            );
        }
    }
}

impl Entry for crate::ReplicationSet {
    fn check(&self, c: &mut Check<'_>) {
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.volumes {
            if !seen.insert(v) {
                c.fail("volumes", &format!("{v:?}"), "is named twice", "each volume once");
            }
        }
        if self.description.len() > 1024 {
            c.fail("description", &self.description.len(), "characters is too long", "at most 1024 characters");
        }
    }
}

impl Entry for crate::User {
    fn check(&self, c: &mut Check<'_>) {
        if let Err(why) = crate::users::check_hash(&self.password_hash) {
            c.fail("password_hash", &"(hidden)", &why, "an argon2id hash: give password=SECRET or password=-");
        }
    }
}

impl Entry for crate::AlertRule {
    fn check(&self, c: &mut Check<'_>) {
        use crate::AlertCondition::*;
        if !self.over.is_finite() || self.over < 0.0 {
            c.fail("over", &self.over, "is not a threshold", "a number, 0 or more");
        }
        let percent = matches!(self.when, WrlFillPercent | SnapshotStorePercent);
        if percent && self.over > 100.0 {
            c.fail("over", &self.over, "is more than 100 percent", "0 to 100");
        }
        for a in &self.email {
            if !is_mail_address(a) {
                c.fail("email", &format!("{a:?}"), "is not a mail address", "NAME@DOMAIN");
            }
        }
        if self.email.len() > 32 {
            c.fail("email", &self.email.len(), "addresses are too many", "at most 32");
        }
        if self.mail_every < 60 {
            c.fail("mail_every", &self.mail_every, "seconds is too often", "60 s or more");
        }
    }
}

/// `NAME@DOMAIN`, without spaces or angle brackets (the SMTP library checks it again).
pub fn is_mail_address(a: &str) -> bool {
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"<>(),;:\\\"[]@".contains(&b));
    let domain = |d: &str| ok(d) && (d.contains('.') || d == "localhost");
    a.len() <= 254 && a.split_once('@').is_some_and(|(l, d)| ok(l) && domain(d))
}

impl Entry for crate::MailServer {
    fn check(&self, c: &mut Check<'_>) {
        if let Err(problem) = check_address(&self.address) {
            c.fail(
                "address",
                &format!("{:?}", self.address),
                &problem.to_string(),
                "HOST:PORT, e.g. mail.example.com:587",
            );
        }
        let from = self.from.rsplit_once('<').map_or(self.from.as_str(), |(_, a)| a.trim_end_matches('>'));
        if !is_mail_address(from) {
            c.fail("from", &format!("{:?}", self.from), "is not a mail address", "NAME@DOMAIN or Name <NAME@DOMAIN>");
        }
        for (field, p) in [("password_file", &self.password_file), ("ca_file", &self.ca_file)] {
            if let Some(p) = p {
                c.absolute_path(field, p);
            }
        }
        if self.user.is_some() != self.password_file.is_some() {
            c.fail("user", &format!("{:?}", self.user), "and password_file go together", "both or neither");
        }
        if self.per_hour == 0 {
            c.fail("per_hour", &0, "would send nothing", "1 or more");
        }
    }
}

impl Entry for KeyRef {
    fn check(&self, c: &mut Check<'_>) {
        c.absolute_path("path", &self.path);
    }
}

impl Entry for WrlDef {
    fn check(&self, c: &mut Check<'_>) {
        if self.devices.is_empty() {
            c.fail("devices", &"[]", "names no device", "one or more files or block devices");
        }
        for (i, d) in self.devices.iter().enumerate() {
            c.absolute_path("devices", d);
            if self.devices[..i].contains(d) {
                c.fail("devices", &format!("{d:?}"), "is named twice", "each device once");
            }
        }
        c.size("segment_bytes", self.segment_bytes, MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES, MIB);
        if let Some(cap) = self.capacity_bytes {
            c.size("capacity_bytes", cap, 2 * self.segment_bytes, 1 << 60, 1);
        }
        c.size("cache_bytes_limit", self.cache_bytes_limit, 0, TIB, 1);
        c.size("batch_bytes_limit", self.batch_bytes_limit, 64 * KIB, GIB, 1);
        let min_queue = (MAX_WRITE_BYTES as u64).max(self.batch_bytes_limit);
        c.size("queue_bytes_limit", self.queue_bytes_limit, min_queue, 64 * GIB, 1);
        if let Some(n) = self.device_bytes {
            // Every device holds at least one segment slot after its headers, and the WRL two.
            let min_each = DATA_START + self.segment_bytes;
            let slots = n.saturating_sub(DATA_START) / self.segment_bytes.max(1) * self.devices.len() as u64;
            if n < min_each || slots < 2 {
                let min = if self.devices.len() > 1 { min_each } else { DATA_START + 2 * self.segment_bytes };
                c.fail(
                    "device_bytes",
                    &n,
                    &format!("holds fewer segments of {} than a WRL needs", human(self.segment_bytes)),
                    &format!("{} or more: two segments in all and one per device, after a 64 KiB header", human(min)),
                );
            } else {
                c.size("device_bytes", n, min_each, 1 << 60, 4 * KIB);
            }
        }
    }
}

impl Entry for Volume {
    fn check(&self, c: &mut Check<'_>) {
        c.size("size_bytes", self.size_bytes, 512, 1 << 60, 512);
        // A block is shipped as one record: at most the largest write.
        if !self.block_bytes.is_power_of_two() || !(512..=MAX_WRITE_BYTES as u64).contains(&self.block_bytes) {
            c.fail(
                "block_bytes",
                &self.block_bytes,
                "is not a power of two in range",
                "512 bytes to 4 MiB, a power of two",
            );
        }
        if let Some(limit) = self.snapshot_bytes_limit {
            // Room for a batch's worth of blocks at least.
            c.size("snapshot_bytes_limit", limit, 64 * self.block_bytes.max(512), 1 << 60, 1);
        }
        if let Some(limit) = self.retention_bytes {
            c.size("retention_bytes", limit, 64 * self.block_bytes.max(512), 1 << 60, 1);
        }
        if let Some(secs) = self.retention
            && !(60..=366 * 86_400).contains(&secs)
        {
            c.fail("retention", &format!("{secs} s"), "is out of range", "1 minute to 366 days");
        }
        if let Some(secs) = self.check_interval
            && !(60..=366 * 86_400).contains(&secs)
        {
            c.fail("check_interval", &format!("{secs} s"), "is out of range", "1 minute to 366 days");
        }
        if self.replicas.is_empty() {
            c.fail("replicas", &"[]", "names no replica", "one or more replica endpoints");
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if self.replicas[..i].contains(r) {
                c.fail("replicas", &format!("{r:?}"), "is named twice", "each replica once");
            }
        }
        for (r, path) in &self.targets {
            if !self.replicas.contains(r) {
                c.fail(
                    "targets",
                    &format!("{r:?}"),
                    "names a replica this volume does not have",
                    &format!("a target per replica of the volume: {}", self.replicas.join(", ")),
                );
            }
            c.absolute_path("targets", path);
        }
    }
}

/// A serde message in an administrator's words: `expected u32` names a Rust type; say the range.
pub fn plain_serde(msg: &str) -> String {
    let mut out = msg.to_owned();
    for (ty, max) in [("u64", u64::MAX), ("u32", u32::MAX as u64), ("u16", u16::MAX as u64), ("u8", u8::MAX as u64)] {
        out = out.replace(&format!("expected {ty}"), &format!("expected a whole number from 0 to {max}"));
    }
    out
}

/// Targets of `vol` that exist on this host as block devices smaller than the volume (a target
/// file grows to the volume's size; a device cannot). Where the configuration is written on
/// another host than the replica's, the replica checks the same when it starts.
pub fn small_local_targets(vol: &Volume) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    for (r, path) in &vol.targets {
        let is_dev = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let len = is_dev.then(|| {
            std::fs::File::open(path).and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
        });
        if let Some(Ok(len)) = len
            && len < vol.size_bytes
        {
            out.push(format!(
                "its target on {r:?}, {path}, holds {} ({len} bytes), less than size_bytes={} ({} bytes)",
                human(len),
                human(vol.size_bytes),
                vol.size_bytes
            ));
        }
    }
    out
}

/// What is wrong with an address (said after the address: "address X is not HOST:PORT").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("is not HOST:PORT")]
    NotHostPort,
    #[error("has port {0}, not from 1 to 65535")]
    PortRange(u32),
    #[error("has port {0:?}, not a number")]
    PortNotNumber(String),
    #[error("has host {0:?}, not an IPv6 address")]
    BadIpv6(String),
    #[error("has host {0:?}, not an IP address or host name")]
    BadHost(String),
}

/// Whether `a` is `HOST:PORT` with a port from 1 to 65535 and a host that is an IPv4 address, a
/// bracketed IPv6 address or a DNS name. Not resolved: the configuration may be written on a
/// host that cannot resolve the name.
pub fn check_address(a: &str) -> Result<(), AddressError> {
    let Some((host, port)) = a.rsplit_once(':') else { return Err(AddressError::NotHostPort) };
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => {}
        Ok(p) => return Err(AddressError::PortRange(p)),
        Err(_) => return Err(AddressError::PortNotNumber(port.to_owned())),
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().map(|_| ()).map_err(|_| AddressError::BadIpv6(host.to_owned()));
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty()
        || name.len() > 253
        || !name.split('.').all(label_ok)
        || name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(AddressError::BadHost(host.to_owned()));
    }
    Ok(())
}

/// The configuration as the rules between entries see it (typed, by name).
#[derive(Debug, Default, PartialEq)]
pub struct Snapshot {
    pub endpoints: BTreeMap<String, Endpoint>,
    pub keys: BTreeMap<String, KeyRef>,
    pub wrls: BTreeMap<String, WrlDef>,
    pub volumes: BTreeMap<String, Volume>,
    pub sets: BTreeMap<String, crate::ReplicationSet>,
    pub users: BTreeMap<String, crate::User>,
    pub alerts: BTreeMap<String, crate::AlertRule>,
    pub mail: BTreeMap<String, crate::MailServer>,
}

/// What is wrong between entries, as seen from the entry `kind name` just set: its references
/// (existence, roles), and paths it would share with another entry (a WRL device in two WRLs, a
/// replica target of two volumes, a target over a replica's own files). Entries that refer to the
/// one just set are checked too (an endpoint's role may no longer fit them).
pub fn cross_check(s: &Snapshot, kind: crate::Kind, name: &str) -> Vec<String> {
    use crate::Kind;
    let mut out = Vec::new();
    match kind {
        Kind::Endpoint => {
            for (w, def) in s.wrls.iter().filter(|(_, d)| d.staging == name) {
                out.extend(wrl_refs(s, def).into_iter().map(|p| format!("wrl {w:?} runs on it: {p}")));
            }
            for (v, vol) in s.volumes.iter().filter(|(_, v)| v.replicas.iter().any(|r| r == name)) {
                out.extend(volume_refs(s, v, vol).into_iter().map(|p| format!("volume {v:?} replicates to it: {p}")));
            }
        }
        Kind::Wrl => {
            if let Some(def) = s.wrls.get(name) {
                out.extend(wrl_refs(s, def));
                for (v, vol) in s.volumes.iter().filter(|(_, v)| v.wrl == name) {
                    out.extend(volume_refs(s, v, vol).into_iter().map(|p| format!("volume {v:?} logs in it: {p}")));
                }
                for (other, o) in s.wrls.iter().filter(|(n, o)| n.as_str() != name && o.staging == def.staging) {
                    for d in def.devices.iter().filter(|d| o.devices.contains(d)) {
                        out.push(format!("device {d:?} is a device of wrl {other:?} too"));
                    }
                }
            }
        }
        Kind::Volume => {
            if let Some(vol) = s.volumes.get(name) {
                out.extend(volume_refs(s, name, vol));
            }
        }
        Kind::Key => {}
        Kind::Set => {
            for v in s.sets.get(name).map(|x| x.volumes.as_slice()).unwrap_or_default() {
                if !s.volumes.contains_key(v) {
                    out.push(format!("volume {v:?} does not exist"));
                }
            }
        }
        Kind::User => {
            for set in s.users.get(name).map(|u| u.grants.keys().collect::<Vec<_>>()).unwrap_or_default() {
                if !s.sets.contains_key(set) {
                    out.push(format!("set {set:?} does not exist"));
                }
            }
        }
        Kind::Alert => {
            if let Some(a) = s.alerts.get(name) {
                for v in a.volumes.iter().filter(|v| !s.volumes.contains_key(*v)) {
                    out.push(format!("volume {v:?} does not exist"));
                }
                match &a.mail {
                    Some(m) if !s.mail.contains_key(m) => out.push(format!("mail server {m:?} does not exist")),
                    None if !a.email.is_empty() && s.mail.len() != 1 => out.push(format!(
                        "it mails {} but names no mail server, and there are {} (name one: mail=NAME)",
                        a.email.join(", "),
                        s.mail.len()
                    )),
                    _ => {}
                }
            }
        }
        Kind::Mail => {
            // Rules that name no mail server use the only one: a second would silence them.
            if s.mail.len() > 1 {
                for (rule, _) in s.alerts.iter().filter(|(_, a)| a.mail.is_none() && !a.email.is_empty()) {
                    out.push(format!(
                        "alert {rule:?} mails through the only mail server there is; name one in it first (mail=NAME)"
                    ));
                }
            }
        }
    }
    out
}

fn endpoint_role(s: &Snapshot, n: &str, role: Role) -> Option<String> {
    match s.endpoints.get(n) {
        None => Some(format!("endpoint {n:?} does not exist")),
        Some(ep) if ep.role != role => Some(format!("endpoint {n:?} has role {}, expected {}", ep.role, role)),
        Some(_) => None,
    }
}

fn wrl_refs(s: &Snapshot, def: &WrlDef) -> Vec<String> {
    endpoint_role(s, &def.staging, Role::Staging).into_iter().collect()
}

/// Where volume `name` lives on replica `r` (its configured target, or the default image).
fn target_of(s: &Snapshot, name: &str, vol: &Volume, r: &str) -> Option<String> {
    vol.targets.get(r).cloned().or_else(|| {
        let dir = s.endpoints.get(r)?.data_dir.as_ref()?;
        Some(Path::new(dir).join(format!("{name}.img")).display().to_string())
    })
}

/// The largest write one record of a WRL with `segment_bytes` segments holds (a batch of one
/// record must fit a segment; `LogCore::record_bytes_limit`).
pub fn record_bytes_limit(segment_bytes: u64) -> u64 {
    let overhead = SEGMENT_HEADER_BYTES + BATCH_HEADER_LEN as u64 + RECORD_HEADER_LEN as u64 + TAG_LEN as u64;
    segment_bytes.saturating_sub(overhead).min(MAX_WRITE_BYTES as u64)
}

fn volume_refs(s: &Snapshot, name: &str, vol: &Volume) -> Vec<String> {
    let mut out = Vec::new();
    match s.wrls.get(&vol.wrl) {
        None => out.push(format!("wrl {:?} does not exist", vol.wrl)),
        Some(w) if vol.block_bytes > record_bytes_limit(w.segment_bytes) => out.push(format!(
            "block_bytes={} is larger than one record of wrl {:?} holds ({} bytes with its {} segments): a resync ships a block as one record",
            vol.block_bytes,
            vol.wrl,
            record_bytes_limit(w.segment_bytes),
            human(w.segment_bytes)
        )),
        Some(_) => {}
    }
    if !s.keys.contains_key(&vol.key) {
        out.push(format!("key {:?} does not exist", vol.key));
    }
    for r in &vol.replicas {
        if let Some(p) = endpoint_role(s, r, Role::Replica) {
            out.push(p);
            continue;
        }
        let Some(target) = target_of(s, name, vol, r) else { continue };
        if let Some(dir) = s.endpoints.get(r).and_then(|e| e.data_dir.as_ref()) {
            for own in ["drlog", "lock"] {
                if Path::new(&target) == Path::new(dir).join(own) {
                    out.push(format!("its target on {r:?}, {target}, is the replica's own {own} file"));
                }
            }
        }
        for (other, o) in s.volumes.iter().filter(|(n, o)| n.as_str() != name && o.replicas.contains(r)) {
            if target_of(s, other, o, r).as_deref() == Some(target.as_str()) {
                out.push(format!("its target on {r:?}, {target}, is the target of volume {other:?} too"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in ["10.0.0.5:7001", "localhost:1", "[::1]:65535", "stg-1.example.org:7001"] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("nonsense", "not HOST:PORT"),
            ("10.0.0.5:99999", "port 99999"),
            ("10.0.0.5:0", "port 0"),
            (":7001", "host \"\""),
            ("[zz]:7001", "not an IPv6"),
            ("a_b:7001", "not an IP address or host name"),
            ("300.1.1.1:7001", "not an IP address or host name"),
        ] {
            let e = check_address(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn plain_words_for_types() {
        assert_eq!(
            plain_serde("invalid type: string \"abc\", expected u32"),
            "invalid type: string \"abc\", expected a whole number from 0 to 4294967295"
        );
        assert_eq!(
            plain_serde("invalid value: integer `70000`, expected u16"),
            "invalid value: integer `70000`, expected a whole number from 0 to 65535"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(1000), "1000 bytes");
        assert_eq!(human(3 << 10), "3 KiB");
    }
}
