//! How warrenctl prints, as rabbitmqctl does: a banner line before a
//! command's output (not with `--quiet`, `--silent`, or a machine-readable
//! formatter), listings as tab-separated rows under a header line (none
//! with `--silent` or `--no-table-headers`, nor for no rows), as a JSON
//! array with values as the API gives them (`--formatter json`), or as CSV
//! (`--formatter csv`). A column a listing does not know is a usage error.

use serde_json::{Map, Value};

use crate::api::Failure;

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Tab-separated, with a header line.
    Table,
    /// A JSON array of objects.
    Json,
    /// Comma-separated values, with a header line.
    Csv,
}

/// What the global flags ask of the output.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    /// The format.
    pub(crate) format: Format,
    /// No banner (`-q`).
    pub(crate) quiet: bool,
    /// No banner and no table headers (`-s`).
    pub(crate) silent: bool,
    /// No table headers (`--no-table-headers`).
    pub(crate) no_headers: bool,
}

impl Output {
    /// Whether the format is for programs (no banner then).
    pub(crate) fn machine_readable(&self) -> bool {
        self.format != Format::Table
    }

    /// Prints the command's banner (rabbitmqctl's "Listing queues ...").
    pub(crate) fn banner(&self, text: &str) {
        if !(self.quiet || self.silent || self.machine_readable()) {
            out!("{text}");
        }
    }

    /// Prints a message a command ends with (`Ping succeeded`); JSON:
    /// `{"message": ...}` as rabbitmqctl's json formatter does. Nothing
    /// with `--silent`.
    pub(crate) fn message(&self, text: &str) {
        if self.silent {
            return;
        }
        match self.format {
            Format::Json => out!("{}", serde_json::json!({ "message": text })),
            _ => out!("{text}"),
        }
    }

    /// Prints `rows` (API objects) in `columns`, or `defaults` when none
    /// were asked for; columns may also be given comma-separated. A column
    /// not in `known` is refused before anything is printed.
    pub(crate) fn rows(
        &self,
        rows: &[Value],
        columns: &[String],
        defaults: &[&str],
        known: &[&str],
    ) -> Result<(), Failure> {
        let columns = chosen_columns(columns, defaults, known)?;
        self.table(rows, &columns);
        Ok(())
    }

    /// The columns a listing prints: those asked for, else `defaults`; a
    /// usage error if one is not in `known` (checked before the banner).
    pub(crate) fn columns(
        &self,
        asked: &[String],
        defaults: &[&str],
        known: &[&str],
    ) -> Result<Vec<String>, Failure> {
        chosen_columns(asked, defaults, known)
    }

    /// Prints `rows` in `columns` (see [`Output::columns`]).
    pub(crate) fn table(&self, rows: &[Value], columns: &[String]) {
        match self.format {
            Format::Json => {
                // One object per line, as rabbitmqctl streams them.
                out!("[");
                for (i, r) in rows.iter().enumerate() {
                    let object: Map<String, Value> =
                        columns.iter().map(|c| (c.clone(), value(r, c))).collect();
                    let sep = if i == 0 { "" } else { "," };
                    out!("{sep}{}", Value::Object(object));
                }
                out!("]");
            }
            Format::Table | Format::Csv => {
                let csv = self.format == Format::Csv;
                let line = |cells: Vec<String>| {
                    if csv {
                        cells
                            .iter()
                            .map(|c| csv_cell(c))
                            .collect::<Vec<_>>()
                            .join(",")
                    } else {
                        cells.join("\t")
                    }
                };
                if !rows.is_empty() && !self.silent && !self.no_headers {
                    out!("{}", line(columns.to_vec()));
                }
                for r in rows {
                    out!(
                        "{}",
                        line(columns.iter().map(|c| text(&value(r, c))).collect())
                    );
                }
            }
        }
    }
}

/// The columns to print: those asked for (split at commas), else the
/// defaults; any unknown is a usage error naming them all (rabbitmqctl's
/// "Info key(s) ... are not supported").
fn chosen_columns(
    asked: &[String],
    defaults: &[&str],
    known: &[&str],
) -> Result<Vec<String>, Failure> {
    let asked: Vec<String> = asked
        .iter()
        .flat_map(|c| c.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    if asked.is_empty() {
        return Ok(defaults.iter().map(|c| (*c).to_owned()).collect());
    }
    let unknown: Vec<&str> = asked
        .iter()
        .map(String::as_str)
        .filter(|c| !known.contains(c))
        .collect();
    if !unknown.is_empty() {
        return Err(Failure::Usage(format!(
            "Info key(s) {} are not supported",
            unknown.join(",")
        )));
    }
    Ok(asked)
}

/// A column of a listing: rabbitmqctl's name and where it is in the
/// API's JSON.
pub(crate) fn value(row: &Value, name: &str) -> Value {
    let v = match name {
        "source_name" => &row["source"],
        "source_kind" => return Value::String("exchange".into()),
        "destination_name" => &row["destination"],
        "destination_kind" => &row["destination_type"],
        "queue_name" => &row["queue"]["name"],
        "channel_pid" => &row["channel_details"]["name"],
        // A channel's "pid" is its name; its connection's, the name of that.
        "pid" if row.get("pid").is_none() => &row["name"],
        "connection" => &row["connection_details"]["name"],
        "user" if row.get("user").is_none() => &row["name"],
        other => &row[other],
    };
    v.clone()
}

/// A value as a table cell: strings bare, lists as `[a, b]`, others as JSON.
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => {
            let items: Vec<String> = a
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes one line to standard output. A reader that went away (`| head`)
/// ends the program quietly instead of panicking as `println!` does.
pub(crate) fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{args}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("cannot write to standard output: {e}");
        std::process::exit(74);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_the_defaults_or_those_asked_and_unknown_ones_are_refused() {
        let known = ["name", "messages", "durable"];
        assert_eq!(
            chosen_columns(&[], &["name", "messages"], &known).unwrap(),
            ["name", "messages"]
        );
        assert_eq!(
            chosen_columns(&["name,durable".into()], &["name"], &known).unwrap(),
            ["name", "durable"]
        );
        let Err(Failure::Usage(e)) =
            chosen_columns(&["name".into(), "bogus".into(), "nope".into()], &[], &known)
        else {
            panic!("unknown columns accepted");
        };
        assert_eq!(e, "Info key(s) bogus,nope are not supported");
    }

    #[test]
    fn csv_cells_are_quoted_when_they_must_be() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn values_keep_their_json_type_and_render_as_cells() {
        let row =
            serde_json::json!({"name": "q", "messages": 3, "durable": true, "tags": ["a", "b"]});
        assert_eq!(value(&row, "messages"), serde_json::json!(3));
        assert_eq!(text(&value(&row, "durable")), "true");
        assert_eq!(text(&value(&row, "tags")), "[a, b]");
        assert_eq!(text(&value(&row, "missing")), "");
    }
}
