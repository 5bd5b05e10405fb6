//! The offline store repair behind `warren --repair-store`: opens the data
//! directory with [`Store::repair`] (damaged parts go to
//! `<data dir>/quarantine/`), and turns the report into lines an operator
//! reads, with queue names instead of the store's queue ids. The broker is
//! not started; the next ordinary start opens the repaired directory.

use std::collections::HashMap;
use std::path::Path;

use queue_store::{DefKind, Store, StoreError};

use crate::meta::MetaCommand;

/// Repairs the store in `dir` and returns the report, one line each.
pub fn repair_store(dir: &Path) -> Result<Vec<String>, StoreError> {
    let (store, recovered, report) = Store::repair(dir)?;
    let mut names: HashMap<u64, String> = HashMap::new();
    for (kind, key, t) in &recovered.definitions {
        if *kind != DefKind::Queue {
            continue;
        }
        if let Ok(MetaCommand::DeclareQueue { vhost, queue }) =
            MetaCommand::from_definition(*kind, key, t)
        {
            names.insert(
                queue.id,
                format!("queue '{}' in vhost '{vhost}'", queue.name),
            );
        }
    }
    let queue = |id: u64| {
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("undefined queue #{id}"))
    };
    let mut lines = Vec::new();
    if report.is_clean() {
        lines.push(format!("{}: no damage found", dir.display()));
    }
    lines.extend(report.actions.iter().cloned());
    if let Some(q) = &report.quarantine {
        lines.push(format!("damaged parts kept in {}", q.display()));
    }
    let mut lost: HashMap<u64, Vec<u64>> = HashMap::new();
    for &(q, seq, _) in &report.lost_entries {
        lost.entry(q).or_default().push(seq);
    }
    let mut lost: Vec<_> = lost.into_iter().collect();
    lost.sort_unstable();
    for (q, mut seqs) in lost {
        seqs.sort_unstable();
        lines.push(format!(
            "lost {} message(s) of {} (their bodies were in the damaged parts): entries {}",
            seqs.len(),
            queue(q),
            ranges(&seqs)
        ));
    }
    if !report.lost_unattributed.is_empty() {
        lines.push(format!(
            "lost {} message(s) of a queue the damage does not tell (their queue entries were the damaged records): message ids {}",
            report.lost_unattributed.len(),
            report
                .lost_unattributed
                .iter()
                .map(|m| m.0.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !report.orphaned_bodies.is_empty() {
        lines.push(format!(
            "{} stored message(s) no queue refers to any more (their queue entries were in the damaged parts, or a crash left them) were removed: ids {}",
            report.orphaned_bodies.len(),
            report
                .orphaned_bodies
                .iter()
                .map(|m| m.0.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    store.close()?;
    Ok(lines)
}

/// Sorted numbers as ranges: `1-3, 7, 9-10`.
fn ranges(sorted: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(&start) = sorted.get(i) {
        let mut end = start;
        while sorted.get(i + 1) == Some(&(end + 1)) {
            end += 1;
            i += 1;
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn entries_are_listed_as_ranges() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(ranges(&[]), "");
    }
}
