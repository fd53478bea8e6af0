//! The ledger's typed errors.

use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;

/// Everything the ledger can report. Nothing here is ever "fixed" by deleting or replacing the
/// database file: a corrupted, foreign, too-new or locked file is reported and left as it is.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The configuration is unusable (zero queue, zero flush interval, bad energy model...).
    #[error("invalid ledger configuration: {0}")]
    Config(String),
    /// An identifier (experiment id, expert uid, currency) is empty, too long or has control
    /// characters.
    #[error("invalid {field}: {reason}")]
    InvalidId {
        /// Which field was refused.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A number is negative, not finite, or out of the accepted range.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidNumber {
        /// Which field was refused.
        field: &'static str,
        /// The refused value (as given).
        value: f64,
        /// Why.
        reason: &'static str,
    },
    /// The event queue (or the request headroom beside it) is full: the event was not recorded
    /// and was counted in [`crate::LedgerHandle::dropped_events`]. Never blocks the caller.
    #[error("ledger queue is full")]
    Busy,
    /// The ledger thread has stopped (after [`crate::LedgerHandle::close`] or a fatal error).
    #[error("ledger is closed")]
    Closed,
    /// Another process holds a lock on the database for longer than the configured
    /// `busy_timeout`. Nothing pending is lost: the ledger retries at its next flush.
    #[error("ledger database {path} is locked by another connection")]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// `PRAGMA quick_check` (or a read) found corruption. The file is left untouched.
    #[error("ledger database {path} is corrupt: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported (truncated to 1 KiB).
        detail: String,
    },
    /// The file at the path is not an SQLite database, or is one that is not a ledger.
    #[error("{path} is not an Apiary ledger database: {detail}")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The database was written by a newer Apiary (its schema version is above ours). The file
    /// is left untouched; upgrade Apiary to open it.
    #[error("ledger database {path} has schema version {found}, this build supports up to {supported}")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// [`crate::SCHEMA_VERSION`].
        supported: i64,
    },
    /// SQLite could not switch the database to write-ahead logging.
    #[error("ledger database {path} cannot use WAL (journal_mode stays {mode})")]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// Any other SQLite failure.
    #[error("ledger database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// A filesystem failure (creating the data folder, starting the thread).
    #[error("ledger i/o on {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing an export failed.
    #[error("writing the export failed: {0}")]
    Write(#[source] std::io::Error),
}

/// Longest `detail` kept in [`LedgerError::Corrupt`].
const MAX_DETAIL: usize = 1024;

pub(crate) fn truncate_detail(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

/// Sorts an SQLite error into the ledger's kinds: busy/locked, corrupt, not a database, other.
pub(crate) fn classify(path: &Path, error: rusqlite::Error) -> LedgerError {
    if let rusqlite::Error::SqliteFailure(failure, message) = &error {
        let detail = || truncate_detail(message.clone().unwrap_or_else(|| error.to_string()));
        match failure.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                return LedgerError::Locked {
                    path: path.to_path_buf(),
                };
            }
            ErrorCode::DatabaseCorrupt => {
                return LedgerError::Corrupt {
                    path: path.to_path_buf(),
                    detail: detail(),
                };
            }
            ErrorCode::NotADatabase => {
                return LedgerError::NotADatabase {
                    path: path.to_path_buf(),
                    detail: detail(),
                };
            }
            _ => {}
        }
    }
    LedgerError::Sqlite {
        path: path.to_path_buf(),
        source: error,
    }
}
