//! How the `warren` binary logs: human-readable text (colour codes only on a
//! terminal) or JSON lines. Field values are written with their control
//! characters escaped, so that a client-supplied string (a queue name, a
//! user name, a connection name) holding a newline cannot forge a log line:
//! JSON escapes them by itself, the text format escapes them here.

use std::fmt::Write as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt as _;

/// Installs the global subscriber: JSON lines or text, filtered by
/// `WARREN_LOG` (a tracing filter) or else `level`.
pub fn init(json: bool, level: &str) {
    let filter = EnvFilter::try_from_env("WARREN_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colour codes only for a terminal, not for a file or a journal.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt()
            .with_ansi(ansi)
            .fmt_fields(text_fields())
            .with_env_filter(filter)
            .init();
    }
}

/// The text format's fields: `message` bare, the others `name=value`, every
/// value with control characters escaped.
pub fn text_fields()
-> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let raw = format!("{value:?}");
        let mut escaped = String::with_capacity(raw.len());
        for c in raw.chars() {
            if c.is_control() {
                let _ = write!(escaped, "{}", c.escape_default());
            } else {
                escaped.push(c);
            }
        }
        if field.name() == "message" {
            w.write_str(&escaped)
        } else {
            write!(w, "{field}={escaped}")
        }
    })
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_newline_in_a_client_string_cannot_forge_a_log_line() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(text_fields())
            .with_writer(move || writer.clone())
            .finish();
        let name = "q\n2026-01-01T00:00:00Z  INFO server: user admin logged in\r\x1b[31m";
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(queue = %name, "queue declared");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(r"queue=q\n2026"), "{text}");
        assert!(text.contains(r"\r\u{1b}[31m"), "{text}");
        assert!(text.contains("queue declared"), "{text}");
    }
}
