//! Opening input files safely: the one place where weights, configs, tokenizer tables, prompt
//! files and case files are opened and read whole.
//!
//! - Only regular files are opened. The kind is checked with `metadata` (symlinks followed) BEFORE
//!   `open`, so a FIFO never blocks and a symlink to `/dev/zero` is refused as a character device;
//!   the file is opened non-blocking and its kind checked again on the open descriptor (the path
//!   may have been swapped in between).
//! - Every whole-file read has a byte limit fitting the file's kind ([`Limit`]); the read stops one
//!   byte past the limit even when the reported size is wrong (procfs files report 0 bytes).
//!
//! Errors name the file, what it was expected to be, and the limit or the kind found.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A refused or failed input file; displays as `PATH: message`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct InputFileError {
    pub path: PathBuf,
    pub msg: String,
}

/// What a file is read as, and the most bytes accepted for it (the real files with a wide
/// margin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// e.g. "prompt file", "config", "vocabulary".
    pub what: &'static str,
    pub max_bytes: u64,
}

const MIB: u64 = 1 << 20;

impl Limit {
    /// `--prompts FILE` (a line per segment).
    pub const PROMPT_FILE: Limit = Limit {
        what: "prompt file",
        max_bytes: MIB,
    };
    /// A part's `config.json` (the real ones are about 2 KB).
    pub const CONFIG_JSON: Limit = Limit {
        what: "JSON config",
        max_bytes: MIB,
    };
    /// CLIP `vocab.json` (the real one is 0.92 MiB).
    pub const VOCAB_JSON: Limit = Limit {
        what: "tokenizer vocabulary",
        max_bytes: 16 * MIB,
    };
    /// CLIP `merges.txt` (the real one is 0.5 MiB).
    pub const MERGES_TXT: Limit = Limit {
        what: "tokenizer merges",
        max_bytes: 16 * MIB,
    };
    /// A golden case file of `verify` (the real one is 72 KiB).
    pub const CASE_FILE: Limit = Limit {
        what: "case file",
        max_bytes: 16 * MIB,
    };
    /// A small system file such as `/proc/meminfo`.
    pub const SYSTEM_FILE: Limit = Limit {
        what: "system file",
        max_bytes: MIB,
    };
}

/// The kind of a file system object, in words ("a directory", "a FIFO", ...).
pub fn kind_of(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        return "a regular file";
    }
    if t.is_dir() {
        return "a directory";
    }
    if t.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The kind of `path` in words when it exists (symlinks followed) but is not a folder
/// (`want_dir`) or not a regular file; None when it is right or absent.
pub fn wrong_kind(path: &Path, want_dir: bool) -> Option<&'static str> {
    let m = std::fs::metadata(path).ok()?;
    let right = if want_dir { m.is_dir() } else { m.is_file() };
    (!right).then(|| kind_of(&m))
}

fn err(path: &Path, msg: String) -> InputFileError {
    InputFileError {
        path: path.to_path_buf(),
        msg,
    }
}

/// Refuses anything but an existing regular file (symlinks followed); `what` names the expected
/// file in the message.
pub fn check_regular(path: &Path, what: &str) -> Result<Metadata, InputFileError> {
    let m = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            match std::fs::symlink_metadata(path) {
                Ok(_) => err(path, format!("{what} is a symbolic link to a missing file")),
                Err(_) => err(path, format!("{what} does not exist")),
            }
        } else {
            err(path, format!("cannot read {what}: {e}"))
        }
    })?;
    if !m.is_file() {
        return Err(err(
            path,
            format!("{what} is {}, expected a regular file", kind_of(&m)),
        ));
    }
    Ok(m)
}

/// Opens a regular file for reading without blocking on FIFOs or devices (see the module doc).
pub fn open_regular(path: &Path, what: &str) -> Result<(File, u64), InputFileError> {
    check_regular(path, what)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The path may have become a FIFO since the check: never block in open.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts
        .open(path)
        .map_err(|e| err(path, format!("cannot open {what}: {e}")))?;
    let m = file
        .metadata()
        .map_err(|e| err(path, format!("cannot read {what}: {e}")))?;
    if !m.is_file() {
        return Err(err(
            path,
            format!("{what} is {}, expected a regular file", kind_of(&m)),
        ));
    }
    Ok((file, m.len()))
}

/// Reads a whole regular file of at most `limit.max_bytes` bytes.
pub fn read_bounded(path: &Path, limit: Limit) -> Result<Vec<u8>, InputFileError> {
    let (file, len) = open_regular(path, limit.what)?;
    let too_big = |size: Option<u64>| {
        let size = size.map(|n| format!(" of {n} bytes")).unwrap_or_default();
        err(
            path,
            format!(
                "{}{size} is over the limit of {} bytes ({} MiB) for a {}",
                limit.what,
                limit.max_bytes,
                limit.max_bytes / MIB,
                limit.what
            ),
        )
    };
    if len > limit.max_bytes {
        return Err(too_big(Some(len)));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(path, format!("cannot read {}: {e}", limit.what)))?;
    if bytes.len() as u64 > limit.max_bytes {
        // The reported size was smaller (procfs, a file growing while read).
        return Err(too_big(None));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, limit: Limit) -> Result<String, InputFileError> {
    String::from_utf8(read_bounded(path, limit)?)
        .map_err(|e| err(path, format!("{} is not UTF-8 text: {e}", limit.what)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit holds where the reported size is wrong: procfs files report 0 bytes.
    #[test]
    fn limit_holds_past_the_reported_size() {
        let p = Path::new("/proc/self/status");
        if !p.exists() {
            eprintln!("SKIPPED: no /proc/self/status");
            return;
        }
        assert_eq!(std::fs::metadata(p).unwrap().len(), 0);
        let small = Limit {
            what: "status file",
            max_bytes: 16,
        };
        let e = read_bounded(p, small).unwrap_err().to_string();
        assert!(
            e.contains("/proc/self/status") && e.contains("over the limit of 16 bytes"),
            "{e}"
        );
        assert!(read_text_bounded(p, Limit::SYSTEM_FILE)
            .unwrap()
            .contains("Name:"));
    }

    /// A regular file over the limit is refused from its size, without reading it.
    #[test]
    fn regular_file_over_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.txt");
        std::fs::write(&p, vec![b'a'; 100]).unwrap();
        let lim = Limit {
            what: "prompt file",
            max_bytes: 99,
        };
        let e = read_bounded(&p, lim).unwrap_err().to_string();
        assert!(
            e.contains("prompt file of 100 bytes is over the limit of 99 bytes"),
            "{e}"
        );
        let ok = Limit {
            max_bytes: 100,
            ..lim
        };
        assert_eq!(read_bounded(&p, ok).unwrap().len(), 100);
    }
}
