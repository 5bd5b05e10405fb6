//! What opening a data directory can find wrong with it, and what a repair
//! did about it: [`Damage`] (one damaged part, named by its path: the store
//! refuses to start with it) and [`RepairReport`] (what `--repair-store`
//! moved to quarantine and which messages that lost).
//!
//! The rule behind both: the store never deletes data it cannot explain. A
//! torn tail after a crash (frames newer than the last sync, which nobody was
//! promised) is the only damage open cuts by itself, and even that is moved
//! to `<data dir>/quarantine/`, not deleted. Everything else stops the open
//! until an operator asks for a repair.

use std::path::{Path, PathBuf};

use crate::message::MessageId;

/// One damaged part of a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file (or directory) that is damaged or missing.
    pub path: PathBuf,
    /// What is wrong with it, for an operator.
    pub problem: String,
}

impl Damage {
    pub(crate) fn new(path: &Path, problem: impl Into<String>) -> Damage {
        Damage {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

/// What a repair found and did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// Each damaged part and what was done with it, one line each.
    pub actions: Vec<String>,
    /// Where the damaged parts were moved (None: nothing was moved).
    pub quarantine: Option<PathBuf>,
    /// Queue entries whose message body was lost with the damaged parts:
    /// (queue id, sequence number in that queue, message id). The broker
    /// drops them and names the queues.
    pub lost_entries: Vec<(u64, u64, MessageId)>,
    /// Stored bodies no queue entry refers to any more (their entries were in
    /// the damaged parts); removed like any orphan.
    pub orphaned_bodies: Vec<MessageId>,
    /// Messages whose body was in the damaged parts and whose queue entry
    /// was the damaged record itself: lost, their queue unknown.
    pub lost_unattributed: Vec<MessageId>,
}

impl RepairReport {
    /// Whether the directory needed no repair.
    pub fn is_clean(&self) -> bool {
        self.actions.is_empty()
            && self.lost_entries.is_empty()
            && self.orphaned_bodies.is_empty()
            && self.lost_unattributed.is_empty()
    }
}

/// The quarantine directory for this open: `<data dir>/quarantine/<unix
/// seconds>[-n]`, created when first needed.
#[derive(Debug)]
pub(crate) struct Quarantine {
    root: PathBuf,
    dir: Option<PathBuf>,
}

impl Quarantine {
    pub(crate) fn new(data_dir: &Path) -> Quarantine {
        Quarantine {
            root: data_dir.join("quarantine"),
            dir: None,
        }
    }

    /// The directory, created on first use.
    pub(crate) fn dir(&mut self) -> std::io::Result<&Path> {
        if self.dir.is_none() {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            std::fs::create_dir_all(&self.root)?;
            let mut n = 0u32;
            let dir = loop {
                let name = if n == 0 {
                    secs.to_string()
                } else {
                    format!("{secs}-{n}")
                };
                let candidate = self.root.join(name);
                match std::fs::create_dir(&candidate) {
                    Ok(()) => break candidate,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                    Err(e) => return Err(e),
                }
            };
            self.dir = Some(dir);
        }
        Ok(self.dir.as_deref().unwrap_or(&self.root))
    }

    /// The directory if anything was moved there.
    pub(crate) fn used(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}
