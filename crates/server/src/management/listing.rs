//! Listing endpoints as RabbitMQ serves them: `name` filtering (a substring,
//! or with `use_regex=true` a regular expression, both ignoring case),
//! `sort` (a field, dotted for nested ones) and `sort_reverse`, `columns`
//! (dotted paths kept, the rest dropped), and pagination (`page`,
//! `page_size` up to 500, default 100) answered with RabbitMQ's envelope
//! `{items, page, page_count, page_size, filtered_count, item_count,
//! total_count}` (also for `pagination=true` without a page: page 1).
//! Other parameters RabbitMQ takes (`disable_stats`,
//! `enable_queue_totals`, `lengths_age`, `msg_rates_age`) are accepted and
//! change nothing: the figures are cheap here.
//!
//! Items are rendered to JSON one at a time, and only those the answer
//! holds: a page of 100 out of 50,000 queues renders 100 (sorting by a field
//! other than the name renders each item once more to read its key). The
//! answer is written straight to its bytes, never held as one JSON tree, so
//! a request for everything on a huge broker costs about the size of its
//! answer, not several times it.

use std::borrow::Cow;
use std::cmp::Ordering;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ApiError;

/// Most items on one page (RabbitMQ's limit).
const MAX_PAGE_SIZE: usize = 500;
const DEFAULT_PAGE_SIZE: usize = 100;

/// The query parameters of a listing.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListQuery {
    page: Option<String>,
    page_size: Option<String>,
    name: Option<String>,
    use_regex: Option<String>,
    sort: Option<String>,
    sort_reverse: Option<String>,
    columns: Option<String>,
    /// `pagination=true`: the envelope even without `page` (page 1).
    pagination: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn number(v: &Option<String>, what: &str) -> Result<Option<usize>, ApiError> {
    v.as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("{what} must be a positive integer")))
        })
        .transpose()
}

/// How to match names.
enum NameFilter {
    All,
    Contains(String),
    Regex(regex::Regex),
}

impl NameFilter {
    fn matches(&self, name: &str) -> bool {
        match self {
            NameFilter::All => true,
            NameFilter::Contains(needle) => name.to_lowercase().contains(needle),
            NameFilter::Regex(r) => r.is_match(name),
        }
    }
}

/// Answers a listing of `items` (in their default order) as `query` asks:
/// `name_of` gives an item's name for the filter, `render` its JSON.
pub(super) fn respond<T>(
    query: &ListQuery,
    items: Vec<T>,
    name_of: impl Fn(&T) -> Cow<'_, str>,
    render: impl Fn(&T) -> Value,
) -> Result<axum::response::Response, ApiError> {
    let page = number(&query.page, "page")?.or(truthy(&query.pagination).then_some(1));
    let page_size = number(&query.page_size, "page_size")?.unwrap_or(DEFAULT_PAGE_SIZE);
    if page == Some(0) {
        return Err(ApiError::bad_request("page must be greater than 0"));
    }
    if page.is_some() && !(1..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(ApiError::bad_request(format!(
            "page_size must be between 1 and {MAX_PAGE_SIZE}"
        )));
    }
    let filter = match query.name.as_deref().filter(|n| !n.is_empty()) {
        None => NameFilter::All,
        Some(n) if truthy(&query.use_regex) => NameFilter::Regex(
            regex::RegexBuilder::new(n)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| ApiError::bad_request(format!("invalid regular expression: {e}")))?,
        ),
        Some(n) => NameFilter::Contains(n.to_lowercase()),
    };
    let total = items.len();
    let mut items: Vec<T> = items
        .into_iter()
        .filter(|i| filter.matches(&name_of(i)))
        .collect();
    let filtered = items.len();
    let reverse = truthy(&query.sort_reverse);
    match query.sort.as_deref().filter(|s| !s.is_empty()) {
        None => {}
        Some("name") => items.sort_by(|a, b| name_of(a).cmp(&name_of(b))),
        Some(field) => {
            let mut keyed: Vec<(Value, T)> = items
                .into_iter()
                .map(|i| {
                    (
                        lookup(&render(&i), field).cloned().unwrap_or(Value::Null),
                        i,
                    )
                })
                .collect();
            keyed.sort_by(|(a, _), (b, _)| compare(a, b));
            items = keyed.into_iter().map(|(_, i)| i).collect();
        }
    }
    if reverse {
        items.reverse();
    }
    let columns: Option<Vec<&str>> = query.columns.as_deref().filter(|c| !c.is_empty()).map(|c| {
        c.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    });
    let shape = |item: &T| {
        let v = render(item);
        match &columns {
            Some(cols) => project(&v, cols),
            None => v,
        }
    };
    let mut out = Vec::new();
    match page {
        None => write_array(&mut out, items.iter().map(shape))?,
        Some(page) => {
            let page_count = filtered.div_ceil(page_size);
            if page > page_count.max(1) {
                return Err(ApiError::bad_request(format!(
                    "page {page} is out of range: there are {page_count} pages"
                )));
            }
            let start = (page - 1) * page_size;
            let on_page: Vec<&T> = items.iter().skip(start).take(page_size).collect();
            out.extend_from_slice(
                format!(
                    "{{\"filtered_count\":{filtered},\"item_count\":{},\"page\":{page},\"page_count\":{page_count},\"page_size\":{page_size},\"total_count\":{total},\"items\":",
                    on_page.len()
                )
                .as_bytes(),
            );
            write_array(&mut out, on_page.into_iter().map(shape))?;
            out.push(b'}');
        }
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response())
}

/// Writes a JSON array item by item (each item's tree lives only while it
/// is written).
fn write_array(out: &mut Vec<u8>, items: impl Iterator<Item = Value>) -> Result<(), ApiError> {
    out.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, &item).map_err(ApiError::internal)?;
    }
    out.push(b']');
    Ok(())
}

/// A dotted path's value.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

/// RabbitMQ-like ordering of sort keys: numbers by value, strings by text,
/// missing values first.
fn compare(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&y.as_f64().unwrap_or(0.0)),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

/// Keeps only the given dotted paths of an object.
fn project(v: &Value, columns: &[&str]) -> Value {
    let mut out = Map::new();
    for col in columns {
        let Some(found) = lookup(v, col) else {
            continue;
        };
        let mut keys = col.split('.').peekable();
        let mut at = &mut out;
        while let Some(key) = keys.next() {
            if keys.peek().is_none() {
                at.insert(key.to_owned(), found.clone());
                break;
            }
            let next = at
                .entry(key.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            match next {
                Value::Object(m) => at = m,
                _ => break,
            }
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;
    use serde_json::json;

    #[test]
    fn columns_keep_nested_paths() {
        let v = json!({"name": "q", "messages": 3, "message_stats": {"publish": 7, "ack": 1}});
        assert_eq!(
            project(&v, &["name", "message_stats.publish", "missing"]),
            json!({"name": "q", "message_stats": {"publish": 7}})
        );
    }

    #[test]
    fn numbers_sort_by_value_and_missing_first() {
        let mut v = vec![json!(10), json!(9.5), Value::Null, json!(100)];
        v.sort_by(compare);
        assert_eq!(v, vec![Value::Null, json!(9.5), json!(10), json!(100)]);
    }
}
