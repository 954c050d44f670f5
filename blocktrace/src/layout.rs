//! Where the block tracepoints keep their fields, read from tracefs at load time.
//!
//! The raw record of a classic tracepoint is described by its `format` file:
//! ```text
//!     field:dev_t dev;    offset:8;    size:4;    signed:0;
//!     field:sector_t sector;    offset:16;    size:8;    signed:0;
//!     field:char rwbs[10];    offset:34;    size:10;    signed:0;
//! ```
//! Offsets moved between kernels (6.1 has no `ioprio` field before `rwbs`), so they are never
//! hard-coded: the loader parses the file and hands the offsets to the programs as read-only
//! globals.

use drv_ebpf_common::{Layout, RWBS_BYTES};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("tracepoint {tracepoint}: no field {field:?} in its format")]
    MissingField { tracepoint: String, field: &'static str },
    #[error("tracepoint {tracepoint}: field {field:?} has size {size}, expected {expected}")]
    WrongSize { tracepoint: String, field: &'static str, size: u32, expected: String },
}

/// One `field:` line: (name, offset, size).
fn fields(format: &str) -> impl Iterator<Item = (&str, u32, u32)> {
    format.lines().filter_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?.trim();
        // The name is the last word of the declaration, without an array suffix.
        let name = decl.rsplit(' ').next()?.split('[').next()?;
        let num = |key: &str| -> Option<u32> {
            line.split(';').map(str::trim).find_map(|p| p.strip_prefix(key))?.trim().parse().ok()
        };
        Some((name, num("offset:")?, num("size:")?))
    })
}

/// The [`Layout`] of a block tracepoint from the text of its `format` file. `with_error`: the
/// tracepoint has an `error` field (`block_rq_complete`).
pub fn parse(tracepoint: &str, format: &str, with_error: bool) -> Result<Layout, LayoutError> {
    let find = |field: &'static str, sizes: &[u32]| -> Result<u32, LayoutError> {
        let (_, off, size) = fields(format)
            .find(|(n, _, _)| *n == field)
            .ok_or_else(|| LayoutError::MissingField { tracepoint: tracepoint.into(), field })?;
        if !sizes.contains(&size) {
            return Err(LayoutError::WrongSize {
                tracepoint: tracepoint.into(),
                field,
                size,
                expected: format!("{sizes:?}"),
            });
        }
        Ok(off)
    };
    let rwbs_sizes: Vec<u32> = (RWBS_BYTES as u32..=16).collect();
    Ok(Layout {
        dev: find("dev", &[4])?,
        sector: find("sector", &[8])?,
        nr_sector: find("nr_sector", &[4])?,
        rwbs: find("rwbs", &rwbs_sizes)?,
        error: if with_error { find("error", &[4])? } else { u32::MAX },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_6_18: &str = "name: block_rq_issue
ID: 2104
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:char comm[16];\toffset:44;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:60;\tsize:4;\tsigned:0;
";

    const COMPLETE_6_1: &str = "name: block_rq_complete
format:
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:40;\tsize:4;\tsigned:0;
";

    #[test]
    fn offsets_come_from_the_format_file() {
        let l = parse("block_rq_issue", ISSUE_6_18, false).unwrap();
        assert_eq!((l.dev, l.sector, l.nr_sector, l.rwbs, l.error), (8, 16, 24, 34, u32::MAX));
        let l = parse("block_rq_complete", COMPLETE_6_1, true).unwrap();
        assert_eq!((l.dev, l.sector, l.nr_sector, l.rwbs, l.error), (8, 16, 24, 32, 28));
    }

    #[test]
    fn a_missing_or_resized_field_is_named() {
        let e = parse("block_rq_issue", ISSUE_6_18, true).unwrap_err();
        assert_eq!(e, LayoutError::MissingField { tracepoint: "block_rq_issue".into(), field: "error" });
        let odd = ISSUE_6_18.replace("sector_t sector;\toffset:16;\tsize:8", "sector_t sector;\toffset:16;\tsize:4");
        let e = parse("block_rq_issue", &odd, false).unwrap_err();
        assert!(e.to_string().contains("\"sector\" has size 4"), "{e}");
    }
}
