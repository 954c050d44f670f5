//! The NBD protocol, server side, I/O-free: the fixed-newstyle handshake (option haggling) and the
//! transmission phase's requests and simple replies, as the NBD project's protocol document
//! (proto.md) defines them. The export server (`drv snapshot export`) feeds it bytes and writes
//! what it returns; clients no one here wrote (qemu-img, nbdinfo, nbdcopy, the kernel's
//! nbd-client) are the test of it.
//!
//! ```text
//! S: "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16 (FIXED_NEWSTYLE | NO_ZEROES)
//! C: client flags u32
//! C: "IHAVEOPT" u64 | option u32 | length u32 | data[length]            (repeated)
//! S: 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 | data   (per option)
//!    ... until OPT_GO is acknowledged (or OPT_EXPORT_NAME answered): transmission
//! C: 0x25609513 u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u32 | data (WRITE)
//! S: 0x67446698 u32 | error u32 | cookie u64 | data (READ, when error is 0)
//! ```
//!
//! All integers are big-endian. Limits: an option's data is at most [`OPTION_LIMIT`] bytes (a
//! larger one is answered `ERR_TOO_BIG` and the connection closed: its data is not read), a request
//! at most [`REQUEST_LIMIT`] bytes (the block-size info announces it; a larger WRITE closes the
//! connection, since its payload would have to be read to stay in step).

/// "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Options.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// `NBD_INFO_*` of `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Commands.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const WRITE_ZEROES: u16 = 6;
}

/// Command flags.
pub mod cflag {
    pub const FUA: u16 = 1;
    pub const NO_HOLE: u16 = 1 << 1;
}

/// Error values of simple replies (errno numbers, as the protocol fixes them).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
}

/// Most bytes of one option's data.
pub const OPTION_LIMIT: u32 = 8 << 10;
/// Most bytes one request reads or writes (announced as the maximum block size).
pub const REQUEST_LIMIT: u32 = 32 << 20;
/// The preferred block size announced.
pub const PREFERRED_BLOCK: u32 = 4096;

/// One export: a name, a size, and whether clients may write (to an overlay: never the snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub size: u64,
    pub writable: bool,
    pub description: String,
}

impl Export {
    /// The transmission flags of this export.
    pub fn flags(&self) -> u16 {
        let base = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN;
        if self.writable {
            base | tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES
        } else {
            base | tflag::READ_ONLY
        }
    }
}

/// The server's opening bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What the handshake does next with the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until at least this many bytes (from the start of the input) are there.
    Need(usize),
    /// `consumed` bytes were handled; send `reply`.
    Reply { consumed: usize, reply: Vec<u8> },
    /// Send `reply`, then transmission begins on export `export` (an index).
    Go { consumed: usize, reply: Vec<u8>, export: usize },
    /// Send `reply` (maybe empty), then close: the client aborted, or broke the protocol
    /// (`why` says how, for the log).
    Close { reply: Vec<u8>, why: Option<String> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Done,
}

/// The option haggling of one connection.
#[derive(Clone, Debug)]
pub struct Handshake {
    phase: Phase,
    no_zeroes: bool,
}

impl Default for Handshake {
    fn default() -> Self {
        Handshake::new()
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// An option reply: header and `data`.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

impl Handshake {
    pub fn new() -> Handshake {
        Handshake { phase: Phase::ClientFlags, no_zeroes: false }
    }

    /// Takes what the client sent so far (`input`, from the first byte not yet consumed) and says
    /// what to do. Call again with the rest after a `Reply`.
    pub fn step(&mut self, input: &[u8], exports: &[Export]) -> Step {
        match self.phase {
            Phase::ClientFlags => self.client_flags(input),
            Phase::Options => self.option(input, exports),
            Phase::Done => Step::Close { reply: Vec::new(), why: Some("the handshake is over".into()) },
        }
    }

    fn client_flags(&mut self, input: &[u8]) -> Step {
        if input.len() < 4 {
            return Step::Need(4);
        }
        let flags = be_u32(input);
        // An unknown flag, or a client without fixed newstyle: the protocol says close.
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 || flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            self.phase = Phase::Done;
            return Step::Close { reply: Vec::new(), why: Some(format!("client flags {flags:#x} are not ours")) };
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::Options;
        Step::Reply { consumed: 4, reply: Vec::new() }
    }

    fn option(&mut self, input: &[u8], exports: &[Export]) -> Step {
        if input.len() < 16 {
            return Step::Need(16);
        }
        let (magic, option, len) = (be_u64(input), be_u32(&input[8..]), be_u32(&input[12..]));
        if magic != IHAVEOPT {
            self.phase = Phase::Done;
            return Step::Close { reply: Vec::new(), why: Some(format!("option magic {magic:#x}")) };
        }
        if len > OPTION_LIMIT {
            self.phase = Phase::Done;
            let reply = option_reply(option, rep::ERR_TOO_BIG, b"option data over 8 KiB");
            return Step::Close { reply, why: Some(format!("option {option} of {len} bytes")) };
        }
        let end = 16 + len as usize;
        if input.len() < end {
            return Step::Need(end);
        }
        let data = &input[16..end];
        let reply = |kind, msg: &str| Step::Reply { consumed: end, reply: option_reply(option, kind, msg.as_bytes()) };
        match option {
            opt::ABORT => {
                self.phase = Phase::Done;
                Step::Close { reply: option_reply(option, rep::ACK, &[]), why: None }
            }
            opt::LIST if !data.is_empty() => reply(rep::ERR_INVALID, "LIST takes no data"),
            opt::LIST => {
                let mut out = Vec::new();
                for e in exports {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    out.extend(option_reply(option, rep::SERVER, &d));
                }
                out.extend(option_reply(option, rep::ACK, &[]));
                Step::Reply { consumed: end, reply: out }
            }
            opt::EXPORT_NAME => self.export_name(data, end, exports),
            opt::INFO | opt::GO => self.info(option, data, end, exports),
            opt::STARTTLS => reply(rep::ERR_POLICY, "no TLS here: export on a trusted network only"),
            _ => reply(rep::ERR_UNSUP, "option not supported"),
        }
    }

    /// The old way in: no option reply, the export's size and flags, then transmission; an
    /// unknown name closes the connection (the protocol allows nothing else).
    fn export_name(&mut self, data: &[u8], end: usize, exports: &[Export]) -> Step {
        self.phase = Phase::Done;
        let Some(i) = find(exports, data) else {
            return Step::Close {
                reply: Vec::new(),
                why: Some(format!("no export {:?}", String::from_utf8_lossy(data))),
            };
        };
        let mut reply = exports[i].size.to_be_bytes().to_vec();
        reply.extend_from_slice(&exports[i].flags().to_be_bytes());
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        Step::Go { consumed: end, reply, export: i }
    }

    /// `OPT_INFO` / `OPT_GO`: name length u32, name, count u16, count info types u16.
    fn info(&mut self, option: u32, data: &[u8], end: usize, exports: &[Export]) -> Step {
        let invalid =
            |m: &str| Step::Reply { consumed: end, reply: option_reply(option, rep::ERR_INVALID, m.as_bytes()) };
        if data.len() < 6 {
            return invalid("INFO/GO data shorter than its fixed part");
        }
        let name_len = be_u32(data) as usize;
        if data.len() < 4 + name_len + 2 {
            return invalid("the name runs past the option's data");
        }
        let name = &data[4..4 + name_len];
        let count = be_u16(&data[4 + name_len..]) as usize;
        let rest = &data[6 + name_len..];
        if rest.len() != 2 * count {
            return invalid("the information requests do not fill the option's data");
        }
        let Some(i) = find(exports, name) else {
            let m = format!("no export {:?}", String::from_utf8_lossy(name));
            return Step::Reply { consumed: end, reply: option_reply(option, rep::ERR_UNKNOWN, m.as_bytes()) };
        };
        let e = &exports[i];
        let mut out = Vec::new();
        let mut d = info::EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&e.size.to_be_bytes());
        d.extend_from_slice(&e.flags().to_be_bytes());
        out.extend(option_reply(option, rep::INFO, &d));
        let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1, PREFERRED_BLOCK, REQUEST_LIMIT] {
            d.extend_from_slice(&u32::to_be_bytes(v));
        }
        out.extend(option_reply(option, rep::INFO, &d));
        for t in rest.chunks(2).map(be_u16) {
            let (kind, text) = match t {
                info::NAME => (info::NAME, &e.name),
                info::DESCRIPTION => (info::DESCRIPTION, &e.description),
                _ => continue,
            };
            let mut d = kind.to_be_bytes().to_vec();
            d.extend_from_slice(text.as_bytes());
            out.extend(option_reply(option, rep::INFO, &d));
        }
        out.extend(option_reply(option, rep::ACK, &[]));
        if option == opt::GO {
            self.phase = Phase::Done;
            return Step::Go { consumed: end, reply: out, export: i };
        }
        Step::Reply { consumed: end, reply: out }
    }
}

/// The export named `name`; the empty name is the default export when there is only one.
fn find(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() && exports.len() == 1 {
        return Some(0);
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

/// A transmission request's fixed part (28 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Decodes the fixed part; `None` when the magic is wrong (the connection is out of step:
    /// close it).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be_u32(b) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be_u16(&b[4..]),
            command: be_u16(&b[6..]),
            cookie: be_u64(&b[8..]),
            offset: be_u64(&b[16..]),
            length: be_u32(&b[24..]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// What a checked request asks of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        len: u32,
    },
    /// The request is followed by `len` bytes of data (read them, also to refuse them).
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    Flush,
    Disconnect,
}

/// How a request is answered when it cannot be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refuse {
    /// A simple reply with this error; a WRITE's data is read and dropped first.
    Error(u32),
    /// Close the connection (a WRITE too large to read in step).
    Close,
}

/// Checks `r` against export `e`: what to do, or how to refuse.
pub fn check(r: &Request, e: &Export) -> Result<Action, Refuse> {
    let (offset, len) = (r.offset, r.length);
    let known = cflag::FUA | cflag::NO_HOLE;
    if r.command == cmd::WRITE && len > REQUEST_LIMIT {
        return Err(Refuse::Close);
    }
    if r.flags & !known != 0 {
        return Err(Refuse::Error(errno::EINVAL));
    }
    let in_bounds = offset.checked_add(u64::from(len)).is_some_and(|end| end <= e.size);
    let fua = r.flags & cflag::FUA != 0;
    let write = |a: Action| {
        if !e.writable {
            Err(Refuse::Error(errno::EPERM))
        } else if !in_bounds {
            Err(Refuse::Error(errno::ENOSPC))
        } else {
            Ok(a)
        }
    };
    match r.command {
        cmd::READ if len > REQUEST_LIMIT || !in_bounds => Err(Refuse::Error(errno::EINVAL)),
        cmd::READ => Ok(Action::Read { offset, len }),
        cmd::WRITE => write(Action::Write { offset, len, fua }),
        cmd::WRITE_ZEROES => write(Action::WriteZeroes { offset, len, fua }),
        cmd::TRIM => write(Action::Trim { offset, len }),
        cmd::FLUSH => Ok(Action::Flush),
        cmd::DISC => Ok(Action::Disconnect),
        _ => Err(Refuse::Error(errno::EINVAL)),
    }
}

/// A simple reply's header (a READ's data follows it when `error` is 0).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The client side of the handshake, for `drv restore` (which reads a snapshot from the replica's
/// export): the bytes to send first, then [`ClientHandshake::step`] over what the server sends.
///
/// The client sends its flags and `OPT_GO` for one export at once, without waiting for the
/// greeting (the protocol allows it once the server is known to be fixed newstyle; a server
/// that is not is refused when its greeting arrives).
pub fn client_hello(name: &str) -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

/// What the client learned: the export's size and transmission flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub size: u64,
    pub flags: u16,
}

/// What the client's handshake does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// Nothing to do until at least this many bytes (from the start of the input) are there.
    Need(usize),
    /// `consumed` bytes were handled; go on with the rest.
    Consumed(usize),
    /// The export is open: transmission begins after `consumed` bytes.
    Open { consumed: usize, opened: Opened },
    /// The server refused or broke the protocol.
    Fail(String),
}

/// The client's handshake: the greeting, then option replies to its `OPT_GO`.
#[derive(Clone, Debug, Default)]
pub struct ClientHandshake {
    greeted: bool,
    info: Option<Opened>,
}

impl ClientHandshake {
    pub fn new() -> ClientHandshake {
        ClientHandshake::default()
    }

    /// Takes what the server sent so far (from the first byte not yet consumed).
    pub fn step(&mut self, input: &[u8]) -> ClientStep {
        if !self.greeted {
            if input.len() < 18 {
                return ClientStep::Need(18);
            }
            if be_u64(input) != NBDMAGIC || be_u64(&input[8..]) != IHAVEOPT {
                return ClientStep::Fail("not an NBD server (no fixed-newstyle greeting)".into());
            }
            if be_u16(&input[16..]) & FLAG_FIXED_NEWSTYLE == 0 {
                return ClientStep::Fail("the NBD server is not fixed newstyle".into());
            }
            self.greeted = true;
            return ClientStep::Consumed(18);
        }
        if input.len() < 20 {
            return ClientStep::Need(20);
        }
        let (magic, option, kind, len) =
            (be_u64(input), be_u32(&input[8..]), be_u32(&input[12..]), be_u32(&input[16..]));
        if magic != REPLY_MAGIC || option != opt::GO {
            return ClientStep::Fail(format!("option reply magic {magic:#x} for option {option}"));
        }
        if len > OPTION_LIMIT {
            return ClientStep::Fail(format!("an option reply of {len} bytes"));
        }
        let end = 20 + len as usize;
        if input.len() < end {
            return ClientStep::Need(end);
        }
        let data = &input[20..end];
        match kind {
            rep::ACK => match self.info {
                Some(opened) => ClientStep::Open { consumed: end, opened },
                None => ClientStep::Fail("the server acknowledged GO without the export's size".into()),
            },
            rep::INFO => {
                if data.len() >= 12 && be_u16(data) == info::EXPORT {
                    self.info = Some(Opened { size: be_u64(&data[2..]), flags: be_u16(&data[10..]) });
                }
                ClientStep::Consumed(end)
            }
            k if k & (1 << 31) != 0 => {
                ClientStep::Fail(format!("the server refused the export ({k:#x}): {}", String::from_utf8_lossy(data)))
            }
            // Other replies are information this client does not need.
            _ => ClientStep::Consumed(end),
        }
    }
}

/// A simple reply's header: (error, cookie); `None` when the magic is wrong.
pub fn decode_simple_reply(b: &[u8; 16]) -> Option<(u32, u64)> {
    (be_u32(b) == SIMPLE_REPLY_MAGIC).then(|| (be_u32(&b[4..]), be_u64(&b[8..])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exports() -> Vec<Export> {
        vec![
            Export { name: "vol1@daily".into(), size: 1 << 30, writable: false, description: "a snapshot".into() },
            Export { name: "vol1@test".into(), size: 1 << 20, writable: true, description: String::new() },
        ]
    }

    fn option(o: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn info_data(name: &str, wants: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(wants.len() as u16).to_be_bytes());
        for w in wants {
            d.extend_from_slice(&w.to_be_bytes());
        }
        d
    }

    /// The option replies in `b`: (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be_u64(b), REPLY_MAGIC);
            let len = be_u32(&b[16..]) as usize;
            out.push((be_u32(&b[8..]), be_u32(&b[12..]), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    fn started() -> Handshake {
        let mut h = Handshake::new();
        assert_eq!(h.step(&[0, 0], &exports()), Step::Need(4));
        let s = h.step(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes(), &exports());
        assert_eq!(s, Step::Reply { consumed: 4, reply: Vec::new() });
        h
    }

    #[test]
    fn greeting_is_fixed_newstyle_without_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g[16..]), 3);
    }

    #[test]
    fn list_info_and_go() {
        let mut h = started();
        let s = h.step(&option(opt::LIST, &[]), &exports());
        let Step::Reply { reply, .. } = s else { panic!("{s:?}") };
        let r = replies(&reply);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].1, &r[0].2[4..]), (rep::SERVER, &b"vol1@daily"[..]));
        assert_eq!(r[2].1, rep::ACK);
        // INFO for an unknown export, then one that asks for its name.
        let s = h.step(&option(opt::INFO, &info_data("nope", &[])), &exports());
        let Step::Reply { reply, .. } = s else { panic!("{s:?}") };
        assert_eq!(replies(&reply)[0].1, rep::ERR_UNKNOWN);
        let s = h.step(&option(opt::INFO, &info_data("vol1@daily", &[info::NAME])), &exports());
        let Step::Reply { reply, .. } = s else { panic!("{s:?}") };
        let r = replies(&reply);
        assert_eq!(be_u16(&r[0].2), info::EXPORT);
        assert_eq!(be_u64(&r[0].2[2..]), 1 << 30);
        assert_eq!(be_u16(&r[0].2[10..]) & tflag::READ_ONLY, tflag::READ_ONLY);
        assert_eq!(be_u16(&r[1].2), info::BLOCK_SIZE);
        assert_eq!((be_u16(&r[2].2), &r[2].2[2..]), (info::NAME, &b"vol1@daily"[..]));
        assert_eq!(r.last().unwrap().1, rep::ACK);
        // Unsupported options are refused, the haggling goes on; GO starts transmission.
        let s = h.step(&option(opt::STRUCTURED_REPLY, &[]), &exports());
        let Step::Reply { reply, .. } = s else { panic!("{s:?}") };
        assert_eq!(replies(&reply)[0].1, rep::ERR_UNSUP);
        let s = h.step(&option(opt::GO, &info_data("vol1@test", &[])), &exports());
        let Step::Go { export, reply, .. } = s else { panic!("{s:?}") };
        assert_eq!(export, 1);
        assert_eq!(replies(&reply).last().unwrap().1, rep::ACK);
    }

    #[test]
    fn the_empty_name_is_the_only_export_and_export_name_answers_without_a_header() {
        let one = &exports()[..1];
        let mut h = Handshake::new();
        h.step(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes(), one);
        let s = h.step(&option(opt::EXPORT_NAME, b""), one);
        let Step::Go { reply, export: 0, .. } = s else { panic!("{s:?}") };
        assert_eq!(reply.len(), 8 + 2 + 124, "zeroes: the client did not ask for none");
        assert_eq!(be_u64(&reply), 1 << 30);
        // Two exports: the empty name is no export.
        let mut h = started();
        let s = h.step(&option(opt::GO, &info_data("", &[])), &exports());
        let Step::Reply { reply, .. } = s else { panic!("{s:?}") };
        assert_eq!(replies(&reply)[0].1, rep::ERR_UNKNOWN);
    }

    #[test]
    fn broken_clients_are_closed_or_refused() {
        let mut h = Handshake::new();
        assert!(matches!(h.step(&0u32.to_be_bytes(), &exports()), Step::Close { .. }), "no fixed newstyle");
        let mut h = started();
        let mut bad = option(opt::LIST, &[]);
        bad[0] ^= 1;
        assert!(matches!(h.step(&bad, &exports()), Step::Close { .. }), "bad option magic");
        let mut h = started();
        let big = option(opt::GO, &vec![0; OPTION_LIMIT as usize + 1]);
        let Step::Close { reply, .. } = h.step(&big, &exports()) else { panic!() };
        assert_eq!(replies(&reply)[0].1, rep::ERR_TOO_BIG);
        let mut h = started();
        let s = h.step(&option(opt::GO, &[0, 0, 0, 9, b'x']), &exports());
        let Step::Reply { reply, .. } = s else { panic!("{s:?}") };
        assert_eq!(replies(&reply)[0].1, rep::ERR_INVALID);
        let s = h.step(&option(opt::ABORT, &[]), &exports());
        let Step::Close { reply, why: None } = s else { panic!("{s:?}") };
        assert_eq!(replies(&reply)[0].1, rep::ACK);
        // A partial option waits for the rest.
        let mut h = started();
        let whole = option(opt::INFO, &info_data("vol1@daily", &[]));
        assert_eq!(h.step(&whole[..20], &exports()), Step::Need(whole.len()));
    }

    #[test]
    fn requests_are_checked_against_the_export() {
        let (ro, rw) = (&exports()[0], &exports()[1]);
        let r = |command, offset, length| Request { flags: 0, command, cookie: 7, offset, length };
        assert_eq!(Request::decode(&r(cmd::READ, 4096, 512).encode()), Some(r(cmd::READ, 4096, 512)));
        assert_eq!(check(&r(cmd::READ, 0, 4096), ro), Ok(Action::Read { offset: 0, len: 4096 }));
        assert_eq!(check(&r(cmd::READ, (1 << 30) - 10, 20), ro), Err(Refuse::Error(errno::EINVAL)));
        assert_eq!(check(&r(cmd::READ, u64::MAX, 20), ro), Err(Refuse::Error(errno::EINVAL)));
        assert_eq!(check(&r(cmd::WRITE, 0, 512), ro), Err(Refuse::Error(errno::EPERM)));
        assert_eq!(check(&r(cmd::WRITE, 0, 512), rw), Ok(Action::Write { offset: 0, len: 512, fua: false }));
        assert_eq!(check(&r(cmd::WRITE, 1 << 20, 512), rw), Err(Refuse::Error(errno::ENOSPC)));
        assert_eq!(check(&r(cmd::WRITE, 0, REQUEST_LIMIT + 1), rw), Err(Refuse::Close));
        assert_eq!(check(&r(cmd::TRIM, 0, 4096), ro), Err(Refuse::Error(errno::EPERM)));
        assert_eq!(check(&r(cmd::FLUSH, 0, 0), ro), Ok(Action::Flush));
        assert_eq!(check(&r(cmd::DISC, 0, 0), ro), Ok(Action::Disconnect));
        assert_eq!(check(&r(99, 0, 0), ro), Err(Refuse::Error(errno::EINVAL)));
        let fua = Request { flags: cflag::FUA, ..r(cmd::WRITE_ZEROES, 0, 4096) };
        assert_eq!(check(&fua, rw), Ok(Action::WriteZeroes { offset: 0, len: 4096, fua: true }));
        let odd = Request { flags: 1 << 9, ..r(cmd::READ, 0, 1) };
        assert_eq!(check(&odd, ro), Err(Refuse::Error(errno::EINVAL)));
        let mut bad = r(cmd::READ, 0, 1).encode();
        bad[0] = 0;
        assert_eq!(Request::decode(&bad), None);
        assert_eq!(&simple_reply(7, 5)[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5]);
    }

    /// The client's handshake against this server's: the size and flags of the export asked
    /// for; an unknown name fails with the server's message.
    #[test]
    fn the_client_opens_an_export_of_the_server() {
        fn run(name: &str) -> ClientStep {
            let mut server = Handshake::new();
            let mut from_client = client_hello(name);
            let mut from_server = greeting().to_vec();
            let mut client = ClientHandshake::new();
            for _ in 0..10 {
                match server.step(&from_client, &exports()) {
                    Step::Reply { consumed, reply } | Step::Go { consumed, reply, .. } => {
                        from_client.drain(..consumed);
                        from_server.extend(reply);
                    }
                    Step::Need(_) | Step::Close { .. } => {}
                }
                loop {
                    match client.step(&from_server) {
                        ClientStep::Consumed(n) => drop(from_server.drain(..n)),
                        ClientStep::Need(_) => break,
                        done => return done,
                    }
                }
            }
            panic!("no end")
        }
        let want = Opened { size: 1 << 20, flags: exports()[1].flags() };
        assert!(matches!(run("vol1@test"), ClientStep::Open { opened, .. } if opened == want));
        assert!(matches!(run("nope"), ClientStep::Fail(m) if m.contains("no export")));
    }

    proptest! {
        /// The client's handshake takes any server bytes without panicking, and never reads
        /// past what it asked for.
        #[test]
        fn the_client_handshake_takes_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..200), real in any::<bool>()) {
            let mut input = if real { greeting().to_vec() } else { Vec::new() };
            input.extend(b);
            let mut c = ClientHandshake::new();
            for _ in 0..50 {
                match c.step(&input) {
                    ClientStep::Consumed(n) => { prop_assert!(n <= input.len()); input.drain(..n); }
                    ClientStep::Open { consumed, .. } => { prop_assert!(consumed <= input.len()); break; }
                    ClientStep::Need(n) => { prop_assert!(n > input.len()); break; }
                    ClientStep::Fail(_) => break,
                }
            }
        }

        /// Whatever a client sends, the handshake never panics, never consumes more than it was
        /// given and never asks for fewer bytes than it has.
        #[test]
        fn the_handshake_takes_any_bytes(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..12), real_start in any::<bool>()) {
            let ex = exports();
            let mut h = Handshake::new();
            let mut buf: Vec<u8> = Vec::new();
            if real_start {
                buf.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
                buf.extend(option(opt::INFO, &info_data("vol1@daily", &[])));
            }
            for c in chunks {
                buf.extend(c);
                loop {
                    match h.step(&buf, &ex) {
                        Step::Need(n) => { prop_assert!(n > buf.len()); break; }
                        Step::Reply { consumed, .. } => { prop_assert!(consumed <= buf.len()); buf.drain(..consumed); }
                        Step::Go { .. } | Step::Close { .. } => return Ok(()),
                    }
                }
            }
        }

        #[test]
        fn requests_decode_and_check_without_panic(b in any::<[u8; REQUEST_LEN]>(), writable in any::<bool>()) {
            let e = Export { name: "x".into(), size: 1 << 20, writable, description: String::new() };
            if let Some(r) = Request::decode(&b) {
                prop_assert_eq!(Request::decode(&r.encode()), Some(r));
                let _ = check(&r, &e);
            }
        }
    }
}
