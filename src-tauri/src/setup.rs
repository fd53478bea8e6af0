//! The first run. The node starts paused until the user says otherwise (`NodeConfig::start_paused`),
//! and the dashboard opens the three-step wizard (hardware check → experiment → mode and autostart)
//! until it has been completed once. A marker file in the node's data folder records that, so a new
//! data folder (another user, a reset) gets the wizard again and nothing else does.

use std::io;
use std::path::{Path, PathBuf};

/// The marker's name in the data folder.
pub const MARKER: &str = "setup-done";

/// Whether the first-run wizard has been completed.
#[derive(Debug, Clone)]
pub struct Setup {
    marker: PathBuf,
}

impl Setup {
    /// The wizard's state for the node whose data folder is `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Setup {
            marker: data_dir.join(MARKER),
        }
    }

    /// Whether the wizard has been completed (the marker exists).
    pub fn is_done(&self) -> bool {
        self.marker.exists()
    }

    /// Records that the wizard has been completed (creates the data folder if needed).
    pub fn complete(&self) -> io::Result<()> {
        if let Some(dir) = self.marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        std::fs::write(&self.marker, format!("first-run wizard completed at {at}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_data_folder_needs_the_wizard_and_completing_it_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("not-yet-created");
        let setup = Setup::new(&data);
        assert!(!setup.is_done());
        setup.complete().unwrap();
        assert!(setup.is_done());
        assert!(Setup::new(&data).is_done(), "a later launch sees it");
        let text = std::fs::read_to_string(data.join(MARKER)).unwrap();
        assert!(text.starts_with("first-run wizard completed at 20"), "{text}");
        assert!(
            !Setup::new(dir.path()).is_done(),
            "another data folder starts over"
        );
    }
}
