//! Policies, as RabbitMQ's `set_policy`: a name, a regular expression on
//! queue names, what it applies to, a priority and a definition of optional
//! arguments. The highest-priority matching policy applies to a queue; its
//! keys merge with the queue's own arguments the way RabbitMQ merges them —
//! limits and TTLs take the lower of the two, the other keys yield to the
//! queue's argument. Changing a policy re-applies it to live queues at once.
//!
//! Supported keys: `message-ttl`, `expires`, `max-length`,
//! `max-length-bytes`, `delivery-limit` (the lower value wins), `overflow`,
//! `dead-letter-exchange`, `dead-letter-routing-key`, `consumer-timeout`,
//! `dead-letter-strategy` (quorum queues) (the queue's argument wins), and `queue-mode`, `max-in-memory-length`,
//! `max-in-memory-bytes` (accepted, no effect); for exchanges,
//! `alternate-exchange` (the exchange's own argument wins).
//!
//! Operator policies (RabbitMQ's `set_operator_policy`) are the same records
//! of [`PolicyKind::Operator`], limited to the limit keys. A queue gets the
//! highest-priority policy and the highest-priority operator policy that
//! match it; where both set a key the lower value wins ([`effective`]), and
//! the result merges with the queue's own arguments as above — so an
//! operator's cap holds whatever the users' policies and arguments say.

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use bytes::Bytes;
use regex::Regex;
use serde_json::{Map, Value};

/// What a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    /// Queues only.
    Queues,
    /// Exchanges only.
    Exchanges,
    /// Both.
    All,
}

impl ApplyTo {
    /// Parses RabbitMQ's `apply-to` value.
    pub fn parse(s: &str) -> Option<ApplyTo> {
        match s {
            "queues" => Some(ApplyTo::Queues),
            "exchanges" => Some(ApplyTo::Exchanges),
            "all" => Some(ApplyTo::All),
            _ => None,
        }
    }

    /// RabbitMQ's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::All => "all",
        }
    }
}

/// Whether a policy is a user's or an operator's (RabbitMQ keeps them apart:
/// the same name may be both, and each kind has its own listing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    /// A policy (`set_policy`, `/api/policies`).
    User,
    /// An operator policy (`set_operator_policy`, `/api/operator-policies`):
    /// caps on the limit keys that users' policies cannot lift.
    Operator,
}

impl PolicyKind {
    /// How logs and messages call it.
    pub fn noun(self) -> &'static str {
        match self {
            PolicyKind::User => "policy",
            PolicyKind::Operator => "operator policy",
        }
    }
}

/// One policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// A user's or an operator's.
    pub kind: PolicyKind,
    /// Name (unique in its vhost among its kind).
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// The pattern as given.
    pub pattern: String,
    regex: Regex,
    /// What it applies to.
    pub apply_to: ApplyTo,
    /// Higher wins.
    pub priority: i64,
    /// The definition as given.
    pub definition: Map<String, Value>,
}

/// Keys whose policy value and queue argument combine by taking the lower.
const MIN_KEYS: [&str; 5] = [
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "delivery-limit",
];
/// The keys an operator policy may set (RabbitMQ 3.10's
/// `operator_policy_validator`s): limits only, each merged by taking the
/// lower value.
const OPERATOR_KEYS: [&str; 7] = [
    "expires",
    "message-ttl",
    "max-length",
    "max-length-bytes",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "delivery-limit",
];
/// Keys where the queue's own argument wins.
const ARG_KEYS: [&str; 5] = [
    "overflow",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "consumer-timeout",
    "dead-letter-strategy",
];

/// RabbitMQ 3.x's mirrored-queue policy keys, with RabbitMQ 3.10's
/// validation: in a cluster a durable classic queue `ha-mode` matches is
/// replicated (`Vhost::mirrored_members`).
const MIRRORING_KEYS: [&str; 6] = [
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "ha-sync-batch-size",
];

/// A JSON value as RabbitMQ's validation messages print it (an Erlang term).
fn erlang_term(v: &Value) -> String {
    match v {
        Value::String(s) => format!("<<\"{s}\">>"),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(erlang_term).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// RabbitMQ 3.10's validation of the mirrored-queue keys, in its words
/// (recorded in `tests/data/rabbitmq_3_10_ha_policies.md`).
fn check_mirroring(definition: &Map<String, Value>) -> Result<(), String> {
    let mode = definition.get("ha-mode");
    let params = definition.get("ha-params");
    if mode.is_none()
        && ["ha-params", "ha-sync-mode", "ha-promote-on-shutdown"]
            .iter()
            .any(|k| definition.contains_key(*k))
    {
        return Err(
            "ha-mode must be specified to specify ha-params, ha-sync-mode or ha-promote-on-shutdown"
                .into(),
        );
    }
    if let Some(mode) = mode {
        let given = params.map_or_else(|| "none".to_owned(), erlang_term);
        match mode.as_str() {
            Some("all") if params.is_some() => {
                return Err("ha-mode=\"all\" does not take parameters".into());
            }
            Some("all") => {}
            Some("exactly") => {
                if params.and_then(Value::as_i64).is_none_or(|n| n <= 0) {
                    return Err(format!(
                        "ha-mode=\"exactly\" takes an integer, {given} given"
                    ));
                }
            }
            Some("nodes") => {
                if !params.is_some_and(Value::is_array) {
                    return Err(format!("ha-mode=\"nodes\" takes a list, {given} given"));
                }
            }
            _ => {
                return Err(format!(
                    "{} is not a valid ha-mode value",
                    erlang_term(mode)
                ));
            }
        }
    }
    if let Some(v) = definition.get("ha-sync-mode") {
        if !matches!(v.as_str(), Some("manual" | "automatic")) {
            return Err(format!(
                "ha-sync-mode must be \"manual\" or \"automatic\", got {}",
                erlang_term(v)
            ));
        }
    }
    for key in ["ha-promote-on-shutdown", "ha-promote-on-failure"] {
        if let Some(v) = definition.get(key) {
            if !matches!(v.as_str(), Some("always" | "when-synced")) {
                return Err(format!(
                    "{key} must be \"always\" or \"when-synced\", got {}",
                    erlang_term(v)
                ));
            }
        }
    }
    if let Some(v) = definition.get("ha-sync-batch-size") {
        if v.as_i64().is_none_or(|n| n <= 0) {
            return Err(format!(
                "ha-sync-batch-size takes an integer greater than 0, {} given",
                erlang_term(v)
            ));
        }
    }
    Ok(())
}

/// RabbitMQ's words for a key in "X is not a valid ..." (`rabbit_policies`).
fn value_noun(key: &str) -> &str {
    match key {
        "message-ttl" => "message TTL",
        "expires" => "queue expiry",
        "max-length" => "maximum length",
        "max-length-bytes" => "maximum length in bytes",
        "max-in-memory-length" | "max-in-memory-bytes" => "maximum memory in bytes",
        "delivery-limit" => "delivery limit",
        "overflow" => "overflow value",
        "queue-mode" => "queue-mode value",
        "dead-letter-exchange" => "dead letter exchange name",
        "dead-letter-routing-key" => "dead letter routing key",
        "alternate-exchange" => "alternate exchange name",
        "queue-leader-locator" => "queue leader locator value",
        "dead-letter-strategy" => "dead letter strategy",
        other => other,
    }
}

impl Policy {
    /// Validates and builds a policy (RabbitMQ's validation wording where it
    /// has one).
    pub fn new(
        vhost: &str,
        name: &str,
        pattern: &str,
        apply_to: ApplyTo,
        priority: i64,
        definition: Map<String, Value>,
    ) -> Result<Policy, String> {
        Policy::of_kind(
            PolicyKind::User,
            vhost,
            name,
            pattern,
            apply_to,
            priority,
            definition,
        )
    }

    /// Validates and builds a policy of `kind`: an operator policy takes
    /// only [`OPERATOR_KEYS`], in RabbitMQ's words otherwise.
    pub fn of_kind(
        kind: PolicyKind,
        vhost: &str,
        name: &str,
        pattern: &str,
        apply_to: ApplyTo,
        priority: i64,
        definition: Map<String, Value>,
    ) -> Result<Policy, String> {
        let regex = Regex::new(pattern).map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
        if definition.is_empty() {
            return Err("Validation failed\n\nno policy provided".into());
        }
        let unrecognised = |key: &str, value: &Value| {
            format!(
                "Validation failed\n\n[{{<<\"{key}\">>,{}}}] are not recognised policy settings",
                erlang_term(value)
            )
        };
        if kind == PolicyKind::Operator {
            if let Some((key, value)) = definition
                .iter()
                .find(|(k, _)| !OPERATOR_KEYS.contains(&k.as_str()))
            {
                return Err(unrecognised(key, value));
            }
        }
        check_mirroring(&definition).map_err(|e| format!("Validation failed\n\n{e}"))?;
        for (key, value) in &definition {
            let ok = match key.as_str() {
                k if MIN_KEYS.contains(&k)
                    || k == "consumer-timeout"
                    || k.starts_with("max-in-memory-") =>
                {
                    value.as_u64().is_some() && (k != "expires" || value.as_u64() != Some(0))
                }
                "overflow" => matches!(
                    value.as_str(),
                    Some("drop-head" | "reject-publish" | "reject-publish-dlx")
                ),
                "dead-letter-exchange" | "dead-letter-routing-key" => value.is_string(),
                "dead-letter-strategy" => {
                    matches!(value.as_str(), Some("at-most-once" | "at-least-once"))
                }
                "queue-mode" => matches!(value.as_str(), Some("default" | "lazy")),
                "alternate-exchange" => value.is_string(),
                // Where a new queue goes in a cluster (`Vhost::placement`).
                "queue-leader-locator" => {
                    matches!(value.as_str(), Some("client-local" | "balanced"))
                }
                "queue-master-locator" => matches!(
                    value.as_str(),
                    Some("client-local" | "min-masters" | "random")
                ),
                // RabbitMQ 3.x's mirrored-queue keys (checked above).
                k if MIRRORING_KEYS.contains(&k) => true,
                other => return Err(unrecognised(other, value)),
            };
            if !ok {
                return Err(format!(
                    "Validation failed\n\n{} is not a valid {}",
                    erlang_term(value),
                    value_noun(key)
                ));
            }
        }
        let policy = Policy {
            kind,
            name: name.to_owned(),
            vhost: vhost.to_owned(),
            pattern: pattern.to_owned(),
            regex,
            apply_to,
            priority,
            definition,
        };
        // What the queue arguments would refuse (a TTL too large, a
        // dead-letter routing key without an exchange) is refused here too.
        queue_store::QueueArgs::parse(&policy.merge_into(&FieldTable::new()), name, vhost)
            .map_err(|e| format!("Validation failed\n\n{e}"))?;
        Ok(policy)
    }

    /// Whether it applies to the exchange called `exchange`.
    pub fn matches_exchange(&self, exchange: &str) -> bool {
        self.apply_to != ApplyTo::Queues && self.regex.is_match(exchange)
    }

    /// The alternate exchange it gives exchanges, if any.
    pub fn alternate_exchange(&self) -> Option<ShortStr> {
        self.definition
            .get("alternate-exchange")
            .and_then(Value::as_str)
            .and_then(|s| ShortStr::try_from(s).ok())
    }

    /// Whether it applies to the queue called `queue`.
    pub fn matches_queue(&self, queue: &str) -> bool {
        self.apply_to != ApplyTo::Exchanges && self.regex.is_match(queue)
    }

    /// The queue's arguments with this policy merged in.
    pub fn merge_into(&self, declared: &FieldTable) -> FieldTable {
        merge_into(&self.definition, declared)
    }

    /// The definition record persisted for it.
    pub fn record(&self) -> FieldTable {
        let s = ShortStr::from_static;
        [
            (s("vhost"), FieldValue::from(self.vhost.as_str())),
            (s("name"), FieldValue::from(self.name.as_str())),
            (s("pattern"), FieldValue::from(self.pattern.as_str())),
            (s("apply-to"), FieldValue::from(self.apply_to.as_str())),
            (s("priority"), FieldValue::I64(self.priority)),
            (
                s("definition"),
                FieldValue::from(Value::Object(self.definition.clone()).to_string().as_str()),
            ),
        ]
        .into_iter()
        .collect()
    }

    /// Rebuilds a policy of `kind` from its record.
    pub fn from_record(t: &FieldTable, kind: PolicyKind) -> Option<Policy> {
        let text = |k: &str| t.get(k).and_then(FieldValue::as_str);
        let definition = match serde_json::from_str(text("definition")?).ok()? {
            Value::Object(m) => m,
            _ => return None,
        };
        Policy::of_kind(
            kind,
            text("vhost")?,
            text("name")?,
            text("pattern")?,
            ApplyTo::parse(text("apply-to")?)?,
            t.get("priority").and_then(int_of).unwrap_or(0),
            definition,
        )
        .ok()
    }

    /// As the API and definitions files show it.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "vhost": self.vhost,
            "name": self.name,
            "pattern": self.pattern,
            "apply-to": self.apply_to.as_str(),
            "priority": self.priority,
            "definition": self.definition,
        })
    }
}

/// `declared` (a queue's own arguments) with a policy definition merged in:
/// limits take the lower value, the other keys yield to the queue's argument.
pub fn merge_into(definition: &Map<String, Value>, declared: &FieldTable) -> FieldTable {
    let mut merged = declared.clone();
    for (key, value) in definition {
        let Ok(arg) = ShortStr::try_from(format!("x-{key}")) else {
            continue;
        };
        if MIN_KEYS.contains(&key.as_str()) {
            let Some(p) = value.as_u64().and_then(|v| i64::try_from(v).ok()) else {
                continue;
            };
            let own = declared.get(arg.as_str()).and_then(int_of);
            let v = own.map_or(p, |o| o.min(p));
            merged.insert(arg, FieldValue::I64(v));
        } else if ARG_KEYS.contains(&key.as_str()) && declared.get(arg.as_str()).is_none() {
            let v = match value {
                Value::String(s) => FieldValue::LongStr(Bytes::from(s.clone().into_bytes())),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => FieldValue::I64(i),
                    None => continue,
                },
                _ => continue,
            };
            merged.insert(arg, v);
        }
    }
    merged
}

/// The definition in effect where `policy` and `operator` (each the
/// highest-priority match of its kind, if any) both apply: every key of
/// either, and where both set one, the lower value (RabbitMQ's
/// `merge_policy_value`: operator policies hold only limits).
pub fn effective(policy: Option<&Policy>, operator: Option<&Policy>) -> Map<String, Value> {
    let mut out = policy.map(|p| p.definition.clone()).unwrap_or_default();
    for (key, value) in operator.map(|p| &p.definition).into_iter().flatten() {
        let lower = match (out.get(key).and_then(Value::as_u64), value.as_u64()) {
            (Some(a), Some(b)) if a <= b => continue,
            _ => value.clone(),
        };
        out.insert(key.clone(), lower);
    }
    out
}

fn int_of(v: &FieldValue) -> Option<i64> {
    match v {
        FieldValue::I8(x) => Some(i64::from(*x)),
        FieldValue::U8(x) => Some(i64::from(*x)),
        FieldValue::I16(x) => Some(i64::from(*x)),
        FieldValue::U16(x) => Some(i64::from(*x)),
        FieldValue::I32(x) => Some(i64::from(*x)),
        FieldValue::U32(x) => Some(i64::from(*x)),
        FieldValue::I64(x) => Some(*x),
        _ => None,
    }
}

/// The policy that applies to `exchange` among `policies` (as [`for_queue`]).
pub fn for_exchange<'a>(policies: &'a [Policy], exchange: &str) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|p| p.matches_exchange(exchange))
        .max_by(|a, b| a.priority.cmp(&b.priority).then(b.name.cmp(&a.name)))
}

/// The policy that applies to `queue` among `policies`: the highest priority,
/// then the first by name.
pub fn for_queue<'a>(policies: &'a [Policy], queue: &str) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|p| p.matches_queue(queue))
        .max_by(|a, b| a.priority.cmp(&b.priority).then(b.name.cmp(&a.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(def: Value, priority: i64) -> Result<Policy, String> {
        let Value::Object(m) = def else {
            return Err("not an object".into());
        };
        Policy::new("/", "p", "^orders\\.", ApplyTo::Queues, priority, m)
    }

    #[test]
    fn limits_take_the_lower_value_and_arguments_win_the_rest() {
        let p = policy(
            serde_json::json!({"max-length": 10, "message-ttl": 5000, "dead-letter-exchange": "pol-dlx"}),
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let declared: FieldTable = [
            (ShortStr::from_static("x-max-length"), FieldValue::I32(3)),
            (
                ShortStr::from_static("x-dead-letter-exchange"),
                FieldValue::from("own"),
            ),
        ]
        .into_iter()
        .collect();
        let merged = p.merge_into(&declared);
        assert_eq!(merged.get("x-max-length"), Some(&FieldValue::I64(3)));
        assert_eq!(merged.get("x-message-ttl"), Some(&FieldValue::I64(5000)));
        assert_eq!(
            merged
                .get("x-dead-letter-exchange")
                .and_then(FieldValue::as_str),
            Some("own")
        );
        assert!(p.matches_queue("orders.paid") && !p.matches_queue("audit"));
        let back = Policy::from_record(&p.record(), PolicyKind::User).map(|q| q.to_json());
        assert_eq!(back, Some(p.to_json()));
    }

    #[test]
    fn bad_definitions_are_refused() {
        assert!(policy(serde_json::json!({"max-length": -1}), 0).is_err());
        assert!(policy(serde_json::json!({"overflow": "sideways"}), 0).is_err());
        assert!(policy(serde_json::json!({"ha-mode": "sometimes"}), 0).is_err());
        assert!(policy(serde_json::json!({}), 0).is_err());
        assert!(policy(serde_json::json!({"queue-mode": "lazy"}), 0).is_ok());
    }

    #[test]
    fn the_highest_priority_applies() {
        let a = policy(serde_json::json!({"max-length": 1}), 1).unwrap_or_else(|e| panic!("{e}"));
        let mut b =
            policy(serde_json::json!({"max-length": 2}), 5).unwrap_or_else(|e| panic!("{e}"));
        b.name = "b".into();
        let all = [a, b];
        assert_eq!(
            for_queue(&all, "orders.x").map(|p| p.name.as_str()),
            Some("b")
        );
        assert!(for_queue(&all, "other").is_none());
    }

    /// Every case RabbitMQ 3.10.8 was asked (`conformance/capture/probe_policy_keys.sh`):
    /// the same definitions are accepted, and refused with the same text.
    #[test]
    fn mirrored_queue_keys_are_validated_as_rabbitmq_does() {
        let recorded = include_str!("../tests/data/rabbitmq_3_10_ha_policies.md");
        assert_eq!(validated_as_recorded(recorded), 22);
    }

    #[test]
    fn the_dead_letter_strategy_key_is_validated_as_rabbitmq_does() {
        let recorded = include_str!("../tests/data/rabbitmq_3_10_dead_letter_strategy_policies.md");
        assert_eq!(validated_as_recorded(recorded), 5);
    }

    /// Asks Warren's validation every case of a recorded `set_policy`
    /// table and requires RabbitMQ's reply; how many cases there were.
    fn validated_as_recorded(recorded: &str) -> usize {
        let mut cases = 0;
        for line in recorded.lines().filter(|l| l.starts_with("| `{")) {
            let cells: Vec<&str> = line.split(" | ").collect();
            let definition = cells[0].trim_start_matches("| `").trim_end_matches('`');
            let reply = cells[1].trim_end_matches(" |").trim_matches('`');
            let Ok(Value::Object(m)) = serde_json::from_str::<Value>(definition) else {
                panic!("unreadable case {line}");
            };
            let got = match Policy::new("/", "p1", "^q", ApplyTo::All, 0, m) {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.trim_start_matches("Validation failed\n\n").to_owned(),
            };
            assert_eq!(got, reply, "{definition}");
            cases += 1;
        }
        cases
    }
}
