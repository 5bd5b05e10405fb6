//! The management HTTP API against a running broker: RabbitMQ's paths, JSON
//! fields, status codes and error bodies; basic auth and tags; objects made
//! through the API used by AMQP clients (and the other way round); durable
//! ones surviving a restart; the alarm health check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lapin::options::*;
use lapin::types::FieldTable;
use reqwest::StatusCode;
use serde_json::{Value, json};
use warren_tests::{
    TestBroker, channel_with_queue, declare_durable_queue, flushed, next_deliveries, publish,
    ready_count,
};

/// A client of `broker`'s management API as `user`.
struct Api {
    base: String,
    user: String,
    pass: String,
    http: reqwest::Client,
}

impl Api {
    fn new(broker: &TestBroker, user: &str, pass: &str) -> Api {
        Api {
            base: broker.management_url(),
            user: user.into(),
            pass: pass.into(),
            http: reqwest::Client::new(),
        }
    }

    fn guest(broker: &TestBroker) -> Api {
        Self::new(broker, "guest", "guest")
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, json)
    }

    /// A POST whose response headers matter (bindings answer with a Location).
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn put(&self, path: &str, body: Value) -> StatusCode {
        self.send(reqwest::Method::PUT, path, Some(body)).await.0
    }

    async fn delete(&self, path: &str) -> StatusCode {
        self.send(reqwest::Method::DELETE, path, None).await.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_have_rabbitmq_shapes_and_counts() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "orders").await;
    for _ in 0..3 {
        publish(&ch, "orders", b"x").await;
    }
    let mut consumer = ch
        .basic_consume(
            "orders".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Three delivered, none acknowledged yet.
    next_deliveries(&mut consumer, 3).await;
    publish(&ch, "orders", b"y").await;
    flushed(&ch).await;
    let api = Api::guest(&broker);

    let (status, q) = api.get("/api/queues/%2F/orders").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(q["name"], "orders");
    assert_eq!(q["vhost"], "/");
    assert_eq!(q["durable"], false);
    assert_eq!(q["consumers"], 1);
    // The fourth message went to the consumer too (no prefetch limit).
    assert_eq!(q["messages"], 4);
    assert_eq!(q["messages_unacknowledged"], 4);
    assert_eq!(q["messages_ready"], 0);
    assert_eq!(q["message_stats"]["publish"], 4);
    assert_eq!(q["message_stats"]["deliver_get"], 4);
    assert!(q["message_stats"]["publish_details"]["rate"].is_number());

    let (status, overview) = api.get("/api/overview").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(overview["product_name"], "Warren");
    assert_eq!(overview["object_totals"]["queues"], 1);
    assert_eq!(overview["object_totals"]["consumers"], 1);
    assert_eq!(overview["queue_totals"]["messages"], 4);
    assert!(overview["object_totals"]["connections"].as_u64().unwrap() >= 1);

    let (_, nodes) = api.get("/api/nodes").await;
    assert_eq!(nodes[0]["name"], "warren@localhost");
    assert_eq!(nodes[0]["mem_alarm"], false);
    assert!(nodes[0]["mem_used"].as_u64().unwrap() > 0);
    // What monitoring agents read, under RabbitMQ's names.
    for field in [
        "fd_used",
        "fd_total",
        "sockets_used",
        "sockets_total",
        "proc_used",
        "proc_total",
        "disk_free_limit",
        "uptime",
    ] {
        assert!(nodes[0][field].as_u64().is_some(), "{field}: {}", nodes[0]);
    }
    assert!(nodes[0]["sockets_total"].as_u64() < nodes[0]["fd_total"].as_u64());
    assert!(nodes[0]["proc_used"].as_u64().unwrap() > 0);
    assert!(nodes[0]["disk_free"].as_u64().is_some());
    assert_eq!(nodes[0]["disk_free_alarm"], false);

    let (_, vhosts) = api.get("/api/vhosts").await;
    assert_eq!(vhosts[0]["name"], "/");
    assert_eq!(vhosts[0]["messages"], 4);

    let (_, exchanges) = api.get("/api/exchanges/%2F").await;
    let direct = exchanges
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "amq.direct")
        .expect("amq.direct listed");
    assert_eq!(direct["type"], "direct");
    assert_eq!(direct["durable"], true);
    let (status, default) = api.get("/api/exchanges/%2F/amq.default").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(default["name"], "");

    ch.queue_bind(
        "orders".into(),
        "amq.topic".into(),
        "order.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (_, bindings) = api.get("/api/bindings/%2F").await;
    assert!(
        bindings
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["source"] == "amq.topic"
                && b["destination"] == "orders"
                && b["destination_type"] == "queue"
                && b["routing_key"] == "order.*"),
        "{bindings}"
    );

    let (_, users) = api.get("/api/users").await;
    assert_eq!(users[0]["name"], "guest");
    assert_eq!(users[0]["tags"], json!(["administrator"]));
    assert_eq!(
        users[0]["hashing_algorithm"],
        "rabbit_password_hashing_sha256"
    );
    let (_, perms) = api.get("/api/permissions").await;
    assert_eq!(
        perms,
        json!([{"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}])
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_authenticated_and_tags_enforced() {
    let broker = TestBroker::start().await;
    let anonymous = reqwest::get(format!("{}/api/overview", broker.management_url()))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"], "not_authorised");

    let (status, _) = Api::new(&broker, "guest", "wrong")
        .get("/api/overview")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let admin = Api::guest(&broker);
    assert_eq!(
        admin
            .put(
                "/api/users/watcher",
                json!({"password": "w", "tags": "monitoring"})
            )
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        admin
            .put("/api/users/plain", json!({"password": "p", "tags": ""}))
            .await,
        StatusCode::CREATED
    );
    let (status, body) = Api::new(&broker, "plain", "p").get("/api/overview").await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "no management tag: {body}"
    );

    let watcher = Api::new(&broker, "watcher", "w");
    assert_eq!(watcher.get("/api/queues").await.0, StatusCode::OK);
    assert_eq!(
        watcher.put("/api/vhosts/nope", json!({})).await,
        StatusCode::UNAUTHORIZED,
        "monitoring may only read"
    );
    assert!(broker.broker().vhost("nope").is_none());
    assert_eq!(watcher.get("/api/users").await.0, StatusCode::UNAUTHORIZED);

    // A policymaker may set policies only in vhosts it has permissions in.
    assert_eq!(
        admin.put("/api/vhosts/other", json!({})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        admin
            .put(
                "/api/users/pm",
                json!({"password": "p", "tags": "policymaker"})
            )
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        admin
            .put(
                "/api/permissions/%2F/pm",
                json!({"configure": ".*", "write": ".*", "read": ".*"})
            )
            .await,
        StatusCode::CREATED
    );
    let pm = Api::new(&broker, "pm", "p");
    let policy = json!({"pattern": ".*", "definition": {"max-length": 1}});
    assert_eq!(
        pm.put("/api/policies/%2F/mine", policy.clone()).await,
        StatusCode::CREATED
    );
    assert_eq!(
        pm.put("/api/policies/other/theirs", policy).await,
        StatusCode::NOT_FOUND
    );
    assert!(
        broker
            .broker()
            .vhost("other")
            .unwrap()
            .policies
            .read()
            .is_empty()
    );

    // A `management` user changes objects as its AMQP permissions allow:
    // configure on ^dev-, write and read on everything, in `/` only.
    assert_eq!(
        admin
            .put(
                "/api/users/dev",
                json!({"password": "d", "tags": "management"})
            )
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        admin
            .put(
                "/api/permissions/%2F/dev",
                json!({"configure": "^dev-", "write": ".*", "read": ".*"})
            )
            .await,
        StatusCode::CREATED
    );
    let dev = Api::new(&broker, "dev", "d");
    assert_eq!(
        dev.put("/api/queues/%2F/dev-q", json!({})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        dev.put("/api/exchanges/%2F/dev-x", json!({"type": "fanout"}))
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        dev.post("/api/bindings/%2F/e/dev-x/q/dev-q", json!({}))
            .await
            .status(),
        StatusCode::CREATED
    );
    let (status, body) = dev
        .send(
            reqwest::Method::PUT,
            "/api/queues/%2F/ops-q",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("access to queue 'ops-q' in vhost '/' refused for user 'dev'"),
        "{body}"
    );
    assert!(
        broker
            .broker()
            .vhost("/")
            .unwrap()
            .find_queue("ops-q")
            .is_none()
    );
    assert_eq!(
        dev.put("/api/queues/other/dev-q", json!({})).await,
        StatusCode::NOT_FOUND,
        "no permissions in that vhost: it is not shown"
    );
    // Topic permissions apply to bindings made through the API too.
    broker
        .broker()
        .set_topic_permissions("dev", "/", "amq.topic", ".*", "^public\\.")
        .await
        .unwrap();
    let everything = dev
        .post(
            "/api/bindings/%2F/e/amq.topic/q/dev-q",
            json!({"routing_key": "#"}),
        )
        .await;
    assert_eq!(everything.status(), StatusCode::UNAUTHORIZED);
    let public = dev
        .post(
            "/api/bindings/%2F/e/amq.topic/q/dev-q",
            json!({"routing_key": "public.news"}),
        )
        .await;
    assert_eq!(public.status(), StatusCode::CREATED);
    // An exclusive queue belongs to its connection, not to the API.
    let owner = broker.connect().await;
    let och = owner.create_channel().await.unwrap();
    och.queue_declare(
        "dev-excl".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for api in [&dev, &admin] {
        assert_eq!(
            api.delete("/api/queues/%2F/dev-excl").await,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            api.delete("/api/queues/%2F/dev-excl/contents").await,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            api.post("/api/bindings/%2F/e/dev-x/q/dev-excl", json!({}))
                .await
                .status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
    assert!(
        broker
            .broker()
            .vhost("/")
            .unwrap()
            .find_queue("dev-excl")
            .is_some()
    );
    owner.close(200, "bye".into()).await.unwrap();
    assert_eq!(
        dev.delete("/api/bindings/%2F/e/dev-x/q/dev-q/~").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        dev.delete("/api/queues/%2F/dev-q").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        dev.delete("/api/exchanges/%2F/dev-x").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        dev.put("/api/users/dev2", json!({"password": "x"})).await,
        StatusCode::UNAUTHORIZED,
        "users remain for administrators"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_made_through_the_api_serve_amqp_clients() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    assert_eq!(
        api.put("/api/vhosts/shop", json!({})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put("/api/vhosts/shop", json!({})).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.put(
            "/api/users/alice",
            json!({"password": "s3cret", "tags": ["management"]})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            "/api/permissions/shop/alice",
            json!({"configure": "", "write": "orders", "read": "paid"})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            "/api/exchanges/shop/orders",
            json!({"type": "topic", "durable": true})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            "/api/queues/shop/paid",
            json!({"durable": true, "arguments": {"x-max-length": 10}})
        )
        .await,
        StatusCode::CREATED
    );
    let resp = api
        .post(
            "/api/bindings/shop/e/orders/q/paid",
            json!({"routing_key": "order.paid"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        resp.headers()["location"],
        "/api/bindings/shop/e/orders/q/paid/order.paid"
    );

    // alice, who exists only through the API, publishes through the API's
    // exchange and binding and reads from the API's queue.
    let conn = lapin::Connection::connect(
        &format!("amqp://alice:s3cret@{}/shop", broker.addr),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        round_trip(&ch, "orders", "order.paid", b"order 17", "paid").await,
        b"order 17",
        "routed through the API's binding"
    );
    // Her permissions apply: she may not configure.
    let refused = ch
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    warren_tests::assert_amqp_error(
        refused,
        403,
        "access to queue 'mine' in vhost 'shop' refused",
    );

    // Bindings are addressed as RabbitMQ addresses them; an
    // exchange-to-exchange binding is made and removed the same way.
    let (status, bound) = api
        .get("/api/bindings/shop/e/orders/q/paid/order.paid")
        .await;
    assert_eq!(
        (status, &bound["routing_key"]),
        (StatusCode::OK, &json!("order.paid"))
    );
    assert_eq!(
        api.put("/api/exchanges/shop/fan", json!({"type": "fanout"}))
            .await,
        StatusCode::CREATED
    );
    let resp = api
        .post(
            "/api/bindings/shop/e/orders/e/fan",
            json!({"routing_key": "order.#"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    // The properties key is the quoted routing key ("order.%23"), which the
    // Location header percent-encodes once more.
    assert_eq!(
        resp.headers()["location"],
        "/api/bindings/shop/e/orders/e/fan/order.%2523"
    );
    let (_, pair) = api.get("/api/bindings/shop/e/orders/e/fan").await;
    assert_eq!(pair[0]["destination_type"], "exchange");
    assert_eq!(pair[0]["properties_key"], "order.%23");
    // A second binding with the same key but arguments has a key of its own,
    // and deleting one leaves the other.
    let resp = api
        .post(
            "/api/bindings/shop/e/orders/e/fan",
            json!({"routing_key": "order.#", "arguments": {"x-note": "second"}}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let second = resp.headers()["location"].to_str().unwrap().to_owned();
    let (_, pair) = api.get("/api/bindings/shop/e/orders/e/fan").await;
    assert_eq!(pair.as_array().unwrap().len(), 2);
    assert_ne!(pair[0]["properties_key"], pair[1]["properties_key"]);
    assert_eq!(api.delete(&second).await, StatusCode::NO_CONTENT);
    let (_, pair) = api.get("/api/bindings/shop/e/orders/e/fan").await;
    assert_eq!(pair.as_array().unwrap().len(), 1);
    assert_eq!(pair[0]["arguments"], json!({}));
    assert_eq!(
        api.delete("/api/bindings/shop/e/orders/e/fan/order.%23")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get("/api/bindings/shop/e/orders/e/fan/order.%23")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (_, vperms) = api.get("/api/vhosts/shop/permissions").await;
    assert_eq!(vperms[0]["user"], "alice");
    let (_, uperms) = api.get("/api/users/alice/permissions").await;
    assert_eq!(uperms[0]["vhost"], "shop");

    // Purge, equivalence, delete, 404s.
    publish(&conn.create_channel().await.unwrap(), "paid", b"more").await;
    let (_, q) = api.get("/api/queues/shop/paid").await;
    assert_eq!(q["arguments"], json!({"x-max-length": 10}));
    assert_eq!(
        api.delete("/api/queues/shop/paid/contents").await,
        StatusCode::NO_CONTENT
    );
    let (_, q) = api.get("/api/queues/shop/paid").await;
    assert_eq!(q["messages"], 0);
    let (status, err) = api
        .send(
            reqwest::Method::PUT,
            "/api/queues/shop/paid",
            Some(json!({"durable": false})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        err["reason"]
            .as_str()
            .unwrap()
            .contains("inequivalent arg 'durable'"),
        "{err}"
    );
    assert_eq!(
        api.delete("/api/queues/shop/paid").await,
        StatusCode::NO_CONTENT
    );
    let (status, err) = api.get("/api/queues/shop/paid").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        err,
        json!({"error": "Object Not Found", "reason": "Not Found"})
    );
    assert_eq!(
        api.delete("/api/exchanges/shop/orders").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/api/permissions/shop/alice").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/api/permissions/shop/alice").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.delete("/api/users/alice").await, StatusCode::NO_CONTENT);
    // Deleting a vhost takes its permissions and policies with it. (guest
    // has full ones since it created the vhost, as in RabbitMQ: narrowed.)
    assert_eq!(
        api.put(
            "/api/permissions/shop/guest",
            json!({"configure": "^narrow", "write": ".*", "read": ".*"})
        )
        .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.put(
            "/api/policies/shop/p",
            json!({"pattern": ".*", "definition": {"max-length": 5}})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(api.delete("/api/vhosts/shop").await, StatusCode::NO_CONTENT);
    assert_eq!(api.get("/api/vhosts/shop").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        api.put("/api/vhosts/shop", json!({})).await,
        StatusCode::CREATED
    );
    // Only the creator's fresh grant: the narrowed one went with the vhost.
    assert_eq!(
        api.get("/api/vhosts/shop/permissions").await.1,
        json!([{"user": "guest", "vhost": "shop", "configure": ".*", "write": ".*", "read": ".*"}])
    );
    assert_eq!(api.get("/api/policies/shop").await.1, json!([]));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_objects_made_through_the_api_survive_a_restart() {
    let mut broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    assert_eq!(
        api.put("/api/exchanges/%2F/events", json!({"type": "fanout"}))
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put("/api/queues/%2F/audit", json!({"durable": true}))
            .await,
        StatusCode::CREATED
    );
    let resp = api
        .post("/api/bindings/%2F/e/events/q/audit", json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    // A policy and an operator policy of the same name, both kept.
    for (path, cap) in [("policies", 10), ("operator-policies", 3)] {
        assert_eq!(
            api.put(
                &format!("/api/{path}/%2F/cap"),
                json!({"pattern": "^audit$", "definition": {"max-length": cap}})
            )
            .await,
            StatusCode::CREATED
        );
    }
    let dir = broker.keep_dir();
    broker.stop().await;

    let mut broker = TestBroker::start_in(dir.path()).await;
    broker.own_dir(dir);
    let api = Api::guest(&broker);
    let (_, q) = api.get("/api/queues/%2F/audit").await;
    assert_eq!(
        (
            &q["policy"],
            &q["operator_policy"],
            &q["effective_policy_definition"]
        ),
        (&json!("cap"), &json!("cap"), &json!({"max-length": 3})),
        "{q}"
    );
    let (_, x) = api.get("/api/exchanges/%2F/events").await;
    assert_eq!(x["type"], "fanout");
    assert_eq!(api.get("/api/queues/%2F/audit").await.1["durable"], true);
    let (_, bindings) = api.get("/api/bindings/%2F/e/events/q/audit").await;
    assert_eq!(bindings.as_array().unwrap().len(), 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alarm_health_check_reports_a_raised_alarm() {
    let broker = TestBroker::start().await;
    let (status, body) = Api::guest(&broker).get("/api/health/checks/alarms").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "ok"}));
    broker.stop().await;

    let dir = tempfile::tempdir().unwrap();
    // A limit no disk satisfies: the disk alarm is raised at the first sample.
    let broker = TestBroker::start_with(dir.path(), |c| c.disk_free_limit = u64::MAX).await;
    let mut alarms = broker.broker().alarms.subscribe();
    alarms.wait_for(|a| a.disk).await.unwrap();
    let (status, body) = Api::guest(&broker)
        .get("/api/health/checks/local-alarms")
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "failed");
    assert_eq!(body["alarms"][0]["resource"], "disk");
    broker.stop().await;
}

/// Sorts every list so that two exports compare regardless of order.
fn normalized(mut v: Value) -> Value {
    if let Some(map) = v.as_object_mut() {
        for (_, section) in map.iter_mut() {
            if let Some(list) = section.as_array_mut() {
                list.sort_by_key(|e| e.to_string());
            }
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_round_trip_through_an_empty_broker() {
    let source = TestBroker::start().await;
    let api = Api::guest(&source);
    assert_eq!(
        api.put("/api/vhosts/shop", json!({})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            "/api/users/alice",
            json!({"password": "s3cret", "tags": "management,monitoring"})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            "/api/permissions/shop/alice",
            json!({"configure": "^orders", "write": "^orders", "read": ".*"})
        )
        .await,
        StatusCode::CREATED
    );
    source
        .broker()
        .set_topic_permissions("alice", "shop", "orders", "^order\\.", "^order\\.")
        .await
        .unwrap();
    assert_eq!(
        api.put("/api/exchanges/shop/unrouted", json!({"type": "fanout"}))
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            "/api/exchanges/shop/orders",
            json!({"type": "topic", "arguments": {"alternate-exchange": "unrouted"}})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            "/api/queues/shop/orders.paid",
            json!({"arguments": {"x-message-ttl": 60000, "x-dead-letter-exchange": "dlx"}})
        )
        .await,
        StatusCode::CREATED
    );
    // An operator policy travels as RabbitMQ 3.10 exports it: an
    // `operator_policy` runtime parameter.
    assert_eq!(
        api.put(
            "/api/operator-policies/shop/cap",
            json!({"pattern": "^orders", "apply-to": "queues", "definition": {"max-length": 100}})
        )
        .await,
        StatusCode::CREATED
    );
    for (path, key) in [
        ("/api/bindings/shop/e/orders/q/orders.paid", "order.paid"),
        ("/api/bindings/shop/e/unrouted/q/orders.paid", ""),
    ] {
        let resp = api.post(path, json!({"routing_key": key})).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
    // Transient objects are exported too (as RabbitMQ 3.10's export has
    // them); an exclusive queue is not.
    let client = lapin::Connection::connect(
        &format!("amqp://guest:guest@{}/shop", source.addr),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = client.create_channel().await.unwrap();
    ch.exchange_declare(
        "scratch.x".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "scratch".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "scratch".into(),
        "scratch.x".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "mine".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (status, exported) = api.get("/api/definitions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        exported["queues"].as_array().unwrap().len(),
        2,
        "{exported}"
    );
    assert_eq!(exported["bindings"].as_array().unwrap().len(), 3);
    assert_eq!(exported["topic_permissions"][0]["exchange"], "orders");
    let named = |section: &str, name: &str| {
        exported[section]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .cloned()
    };
    assert_eq!(named("queues", "scratch").unwrap()["durable"], false);
    assert_eq!(named("exchanges", "scratch.x").unwrap()["durable"], false);
    assert!(named("queues", "mine").is_none(), "exclusive: not exported");

    let target = TestBroker::start().await;
    let target_api = Api::guest(&target);
    let (status, body) = target_api
        .send(
            reqwest::Method::POST,
            "/api/definitions",
            Some(exported.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, again) = target_api.get("/api/definitions").await;
    assert_eq!(
        named("parameters", "cap").unwrap()["component"],
        "operator_policy",
        "{exported}"
    );
    assert_eq!(normalized(again), normalized(exported));
    let (status, cap) = target_api.get("/api/operator-policies/shop/cap").await;
    assert_eq!(status, StatusCode::OK, "{cap}");
    assert_eq!(cap["definition"]["max-length"], 100, "{cap}");

    // The imported user logs in with the password set on the source broker.
    let conn = lapin::Connection::connect(
        &format!("amqp://alice:s3cret@{}/shop", target.addr),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        round_trip(&ch, "orders", "order.paid", b"routed", "orders.paid").await,
        b"routed",
        "the imported binding routes"
    );
    source.stop().await;
    target.stop().await;
}

/// `rabbitmqctl export_definitions` output of RabbitMQ 3.10.8, recorded by
/// `conformance/capture/capture_definitions.sh`.
const RABBITMQ_EXPORT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crates/server/tests/data/rabbitmq_3_10_definitions.json"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_export_loads_at_boot_and_serves_its_clients() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| {
        c.load_definitions = Some(RABBITMQ_EXPORT.into());
    })
    .await;
    let api = Api::guest(&broker);
    let (_, q) = api.get("/api/queues/%2F/orders.paid").await;
    assert_eq!(
        q["arguments"],
        json!({"x-dead-letter-exchange": "dlx", "x-max-length": 1000, "x-message-ttl": 60000, "x-queue-mode": "lazy"})
    );
    let (_, x) = api.get("/api/exchanges/%2F/orders.topic").await;
    assert_eq!(x["arguments"], json!({"alternate-exchange": "unrouted"}));
    // Its policy came along and applies to the matching queue.
    assert_eq!(q["policy"], "ttl-policy");

    // alice's RabbitMQ password hash works here.
    let alice = lapin::Connection::connect(
        &format!("amqp://alice:s3cret@{}/shop", broker.addr),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = alice.create_channel().await.unwrap();
    assert_eq!(
        round_trip(&ch, "orders.direct", "new", b"in shop", "orders").await,
        b"in shop",
        "routed by the imported binding"
    );

    // In "/", a topic publish reaches its queue and, through the
    // exchange-to-exchange binding and the fanout, the audit queue; the
    // headers binding routes by its arguments.
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "orders.topic".into(),
        "order.paid".into(),
        BasicPublishOptions::default(),
        b"paid",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "region".into(),
        lapin::types::AMQPValue::LongString("eu".into()),
    );
    ch.basic_publish(
        "by-region".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"eu",
        lapin::BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();
    let mut bodies = Vec::new();
    for queue in ["orders.paid", "audit", "audit"] {
        let m = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("nothing in {queue}"));
        bodies.push(String::from_utf8(m.delivery.data).unwrap());
    }
    assert_eq!(bodies, ["paid", "paid", "eu"]);
    broker.stop().await;

    // Posted to the API instead, the same file is accepted too.
    let broker = TestBroker::start().await;
    let defs: Value =
        serde_json::from_str(&std::fs::read_to_string(RABBITMQ_EXPORT).unwrap()).unwrap();
    let (status, body) = Api::guest(&broker)
        .send(reqwest::Method::POST, "/api/definitions", Some(defs))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(broker.broker().vhost("shop").is_some());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_and_consumers_are_listed_and_a_connection_closed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "jobs").await;
    let _second = conn.create_channel().await.unwrap();
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let _consumer = ch
        .basic_consume(
            "jobs".into(),
            "worker-1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let api = Api::guest(&broker);

    let (_, conns) = api.get("/api/connections").await;
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["user"], "guest");
    assert_eq!(conns[0]["vhost"], "/");
    assert_eq!(conns[0]["protocol"], "AMQP 0-9-1");
    assert_eq!(conns[0]["channels"], 2);
    let name = conns[0]["name"].as_str().unwrap().to_owned();
    assert!(name.contains(" -> "), "{name}");
    // What the client said of itself at the handshake.
    assert_eq!(conns[0]["client_properties"]["product"], "lapin");
    assert_eq!(
        conns[0]["client_properties"]["capabilities"]["publisher_confirms"],
        true
    );
    assert!(conns[0].get("user_provided_name").is_none());
    // Its traffic: the two channel.opens and a consume came in, their
    // answers went out.
    for field in ["recv_oct", "recv_cnt", "send_oct", "send_cnt"] {
        assert!(
            conns[0][field].as_u64().unwrap() > 0,
            "{field}: {}",
            conns[0]
        );
    }
    let named = lapin::Connection::connect(
        &broker.uri(),
        lapin::ConnectionProperties::default().with_connection_name("billing-worker".into()),
    )
    .await
    .unwrap();
    let (_, conns) = api.get("/api/connections").await;
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["user_provided_name"] == "billing-worker"
                && c["client_properties"]["connection_name"] == "billing-worker"),
        "{conns}"
    );
    named.close(200, "bye".into()).await.unwrap();

    let (_, channels) = api.get("/api/channels").await;
    assert_eq!(channels.as_array().unwrap().len(), 2);
    assert_eq!(channels[0]["connection_details"]["name"], name.as_str());
    assert_eq!(channels[0]["consumer_count"], 1);

    let (_, consumers) = api.get("/api/consumers").await;
    assert_eq!(consumers[0]["consumer_tag"], "worker-1");
    assert_eq!(consumers[0]["queue"]["name"], "jobs");
    assert_eq!(consumers[0]["ack_required"], true);
    assert_eq!(consumers[0]["prefetch_count"], 5);
    assert_eq!(
        consumers[0]["channel_details"]["connection_name"],
        name.as_str()
    );

    // An operator closes a (raw) client's connection, with a reason.
    let mut raw = warren_tests::RawClient::open(broker.addr).await;
    let port = raw.socket.local_addr().unwrap().port();
    let (_, conns) = api.get("/api/connections").await;
    let name = conns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .find(|n| n.starts_with(&format!("127.0.0.1:{port} ")))
        .expect("the raw client is listed");
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'.' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let resp = api
        .http
        .delete(format!("{}/api/connections/{encoded}", api.base))
        .basic_auth("guest", Some("guest"))
        .header("X-Reason", "maintenance window")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    match raw.method().await {
        Some(amqp_codec::Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 320);
            assert_eq!(close.reply_text, "CONNECTION_FORCED - maintenance window");
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

/// RabbitMQ 3.x's mirrored-queue policies (`ha-mode` and the rest) import
/// from a 3.x definitions file and are validated in RabbitMQ's words; the
/// queues they match work (as single-node queues: replication is not there
/// yet).
#[tokio::test]
async fn a_rabbitmq_3x_definitions_file_with_mirroring_policies_imports() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    let definitions = json!({
        "rabbit_version": "3.10.8",
        "vhosts": [{"name": "/"}],
        "queues": [{"name": "ha.orders", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}}],
        "policies": [{
            "vhost": "/", "name": "ha-two", "pattern": "^ha\\.", "apply-to": "queues", "priority": 0,
            "definition": {"ha-mode": "exactly", "ha-params": 2, "ha-sync-mode": "automatic",
                           "ha-promote-on-shutdown": "always", "ha-sync-batch-size": 100}
        }]
    });
    let (status, body) = api
        .send(reqwest::Method::POST, "/api/definitions", Some(definitions))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, policy) = api.get("/api/policies/%2F/ha-two").await;
    assert_eq!(policy["definition"]["ha-mode"], "exactly");
    assert_eq!(policy["definition"]["ha-params"], 2);
    let (_, q) = api.get("/api/queues/%2F/ha.orders").await;
    assert_eq!(q["policy"], "ha-two");
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    publish(&ch, "ha.orders", b"m").await;
    flushed(&ch).await;
    assert_eq!(ready_count(&ch, "ha.orders").await, 1);

    // A definition RabbitMQ 3.10 refuses is refused with its text.
    let (status, body) = api
        .send(
            reqwest::Method::PUT,
            "/api/policies/%2F/bad",
            Some(json!({"pattern": "^x", "definition": {"ha-mode": "exactly"}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ha-mode=\"exactly\" takes an integer, none given")),
        "{body}"
    );
}

/// An administrator needs permissions in a vhost to change things there
/// through the API, as in RabbitMQ 3.10: every request recorded from a
/// 3.10.8 node (`conformance/capture/probe_admin_permissions.sh`) gets the
/// same status from Warren (401 `not_authorised` for declare, bind, delete,
/// purge, get and publish; reads and policies need none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_needs_permissions_in_a_vhost_to_change_it() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_vhost("other").await.unwrap();
    b.add_user("boss", Some("b0ss"), &["administrator"])
        .await
        .unwrap();
    b.set_permissions("guest", "other", ".*", ".*", ".*")
        .await
        .unwrap();
    let (status, body) = Api::guest(&broker)
        .send(
            reqwest::Method::PUT,
            "/api/queues/other/q0",
            Some(json!({"durable": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let boss = Api::new(&broker, "boss", "b0ss");
    let steps = recorded_steps(include_str!("data/rabbitmq_3_10_admin_permissions.md"));
    assert_eq!(steps.len(), 9, "every recorded request replayed");
    for step in &steps {
        let what = format!("{}: {} {}", step.title, step.method, step.path);
        let (status, answer) = boss
            .send(step.method.clone(), &step.path, step.body.clone())
            .await;
        assert_eq!(status, step.status, "{what}: {answer}");
        if step.status == StatusCode::UNAUTHORIZED {
            assert_eq!(answer["error"], "not_authorised", "{what}: {answer}");
        }
    }
    // With permissions, the refused declare is made.
    b.set_permissions("boss", "other", ".*", ".*", ".*")
        .await
        .unwrap();
    let (status, body) = boss
        .send(
            reqwest::Method::PUT,
            "/api/queues/other/q1",
            Some(json!({"durable": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// A quorum queue on a node alone is listed under its type, as RabbitMQ
/// lists it (it has one copy, and keeps the quorum-queue rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_on_a_node_alone_is_listed_as_quorum() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    for (name, args) in [("qq", json!({"x-queue-type": "quorum"})), ("cq", json!({}))] {
        let (status, body) = api
            .send(
                reqwest::Method::PUT,
                &format!("/api/queues/%2F/{name}"),
                Some(json!({"durable": true, "arguments": args})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (_, qq) = api.get("/api/queues/%2F/qq").await;
    assert_eq!(qq["type"], "quorum", "{qq}");
    let (_, cq) = api.get("/api/queues/%2F/cq").await;
    assert_eq!(cq["type"], "classic", "{cq}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_apply_to_live_queues_at_once_and_survive_a_restart() {
    let mut broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_durable_queue(&ch, "orders.a").await;
    for _ in 0..5 {
        publish(&ch, "orders.a", b"m").await;
    }
    flushed(&ch).await;
    let api = Api::guest(&broker);
    let messages = |v: &Value| v["messages"].as_u64().unwrap();
    assert_eq!(messages(&api.get("/api/queues/%2F/orders.a").await.1), 5);

    // A policy lowering the length limit applies at once: the oldest go.
    assert_eq!(
        api.put(
            "/api/policies/%2F/cap",
            json!({"pattern": "^orders\\.", "definition": {"max-length": 2}, "apply-to": "queues", "priority": 1})
        )
        .await,
        StatusCode::CREATED
    );
    let (_, q) = api.get("/api/queues/%2F/orders.a").await;
    assert_eq!(messages(&q), 2);
    assert_eq!(q["policy"], "cap");
    publish(&ch, "orders.a", b"m").await;
    flushed(&ch).await;
    assert_eq!(messages(&api.get("/api/queues/%2F/orders.a").await.1), 2);

    // A queue's own lower limit wins over the policy's (the lower applies);
    // a queue the pattern does not match is untouched.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    ch.queue_declare("orders.b".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.queue_declare(
        "audit".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        publish(&ch, "orders.b", b"m").await;
        publish(&ch, "audit", b"m").await;
    }
    flushed(&ch).await;
    assert_eq!(messages(&api.get("/api/queues/%2F/orders.b").await.1), 1);
    let (_, audit) = api.get("/api/queues/%2F/audit").await;
    assert_eq!(messages(&audit), 3);
    assert_eq!(audit["policy"], Value::Null);

    // A higher-priority policy takes over.
    assert_eq!(
        api.put(
            "/api/policies/%2F/wider",
            json!({"pattern": "^orders\\.a$", "definition": {"max-length": 4}, "priority": 5})
        )
        .await,
        StatusCode::CREATED
    );
    for _ in 0..3 {
        publish(&ch, "orders.a", b"m").await;
    }
    flushed(&ch).await;
    let (_, q) = api.get("/api/queues/%2F/orders.a").await;
    assert_eq!((messages(&q), q["policy"].as_str()), (4, Some("wider")));
    let (_, policies) = api.get("/api/policies/%2F").await;
    assert_eq!(policies.as_array().unwrap().len(), 2);

    // Validation, as RabbitMQ: unknown keys and bad values are refused (a
    // dead-letter routing key needs a dead-letter exchange, as for arguments).
    for definition in [
        json!({"max-length": "many"}),
        json!({"no-such-key": 1}),
        json!({"ha-mode": "all", "ha-params": 2}),
        json!({"dead-letter-routing-key": "k"}),
    ] {
        assert_eq!(
            api.put(
                "/api/policies/%2F/bad",
                json!({"pattern": ".*", "definition": definition.clone()})
            )
            .await,
            StatusCode::BAD_REQUEST,
            "{definition}"
        );
    }

    // Policies are durable definitions and apply again after a restart.
    drop(ch);
    drop(conn);
    let dir = broker.keep_dir();
    broker.stop().await;
    let mut broker = TestBroker::start_in(dir.path()).await;
    broker.own_dir(dir);
    let api = Api::guest(&broker);
    let (_, q) = api.get("/api/queues/%2F/orders.a").await;
    // (The messages were transient: the durable queue comes back empty.)
    assert_eq!((messages(&q), q["policy"].as_str()), (0, Some("wider")));
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for _ in 0..6 {
        publish(&ch, "orders.a", b"m").await;
    }
    flushed(&ch).await;
    assert_eq!(messages(&api.get("/api/queues/%2F/orders.a").await.1), 4);

    // Removing policies lifts their limits at once. (Removing "wider" first
    // hands the queue back to "cap", which trims it to 2 on the spot.)
    assert_eq!(
        api.delete("/api/policies/%2F/wider").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/api/policies/%2F/cap").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/api/policies/%2F/cap").await,
        StatusCode::NOT_FOUND
    );
    for _ in 0..3 {
        publish(&ch, "orders.a", b"m").await;
    }
    flushed(&ch).await;
    let (_, q) = api.get("/api/queues/%2F/orders.a").await;
    assert_eq!((messages(&q), &q["policy"]), (5, &Value::Null));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_published_and_fetched_through_the_api() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    assert_eq!(
        api.put("/api/queues/%2F/inbox", json!({"durable": false}))
            .await,
        StatusCode::CREATED
    );
    let post = |path: &'static str, body: Value| {
        let api = &api;
        async move { api.send(reqwest::Method::POST, path, Some(body)).await }
    };
    let (status, routed) = post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({
            "routing_key": "inbox",
            "payload": "hello",
            "payload_encoding": "string",
            "properties": {"delivery_mode": 2, "headers": {"tenant": "a"}, "message_id": "m-1"}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(routed, json!({"routed": true}));
    let (_, routed) = post(
        "/api/exchanges/%2F/amq.direct/publish",
        json!({"routing_key": "nowhere", "payload": "x", "payload_encoding": "string", "properties": {}}),
    )
    .await;
    assert_eq!(routed, json!({"routed": false}));
    let (_, _) = post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({"routing_key": "inbox", "payload": "//4=", "payload_encoding": "base64", "properties": {}}),
    )
    .await;

    // Peek (requeue): nothing is consumed, the messages come back
    // redelivered. Numbers as strings, as rabbitmqadmin sends them;
    // `truncate` cuts payloads (not their reported size).
    let (status, got) = post(
        "/api/queues/%2F/inbox/get",
        json!({"count": "2", "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": "3"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.as_array().unwrap().len(), 2, "{got}");
    assert_eq!(got[0]["payload"], "hel");
    assert_eq!(got[0]["payload_bytes"], 5);
    assert_eq!(got[0]["payload_encoding"], "string");
    assert_eq!(got[0]["redelivered"], false);
    assert_eq!(got[0]["message_count"], 1);
    assert_eq!(got[0]["properties"]["headers"], json!({"tenant": "a"}));
    let (status, _) = post(
        "/api/queues/%2F/inbox/get",
        json!({"count": "many", "ackmode": "ack_requeue_true"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(got[0]["properties"]["message_id"], "m-1");
    assert_eq!(got[0]["properties"]["delivery_mode"], 2);
    let (_, got) = post(
        "/api/queues/%2F/inbox/get",
        json!({"count": 5, "ackmode": "ack_requeue_false", "encoding": "auto"}),
    )
    .await;
    assert_eq!(got.as_array().unwrap().len(), 2);
    assert_eq!(got[0]["redelivered"], true);
    assert_eq!(got[0]["payload"], "hello");
    assert_eq!(got[1]["payload"], "//4=");
    assert_eq!(got[1]["payload_encoding"], "base64", "not UTF-8: base64");
    let (_, q) = api.get("/api/queues/%2F/inbox").await;
    assert_eq!(q["messages"], 0);

    // A forged user-id is refused, as basic.publish refuses it.
    let (status, _) = post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({"routing_key": "inbox", "payload": "x", "payload_encoding": "string", "properties": {"user_id": "mallory"}}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = api.get("/api/aliveness-test/%2F").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_policy_gives_an_alternate_exchange() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    assert_eq!(
        api.put("/api/exchanges/%2F/orders", json!({"type": "direct"}))
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put("/api/exchanges/%2F/unrouted", json!({"type": "fanout"}))
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put("/api/queues/%2F/lost", json!({})).await,
        StatusCode::CREATED
    );
    let resp = api
        .post("/api/bindings/%2F/e/unrouted/q/lost", json!({}))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        api.put(
            "/api/policies/%2F/ae",
            json!({"pattern": "^orders$", "definition": {"alternate-exchange": "unrouted"}, "apply-to": "exchanges"})
        )
        .await,
        StatusCode::CREATED
    );
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let unroutable = |ch: lapin::Channel| async move {
        ch.basic_publish(
            "orders".into(),
            "no-such-key".into(),
            BasicPublishOptions::default(),
            b"stray",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
        flushed(&ch).await;
    };
    unroutable(ch.clone()).await;
    let got = ch
        .basic_get("lost".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the policy's alternate exchange took it");
    assert_eq!(got.delivery.data, b"stray");

    // Without the policy the message is simply dropped.
    assert_eq!(
        api.delete("/api/policies/%2F/ae").await,
        StatusCode::NO_CONTENT
    );
    unroutable(ch.clone()).await;
    assert!(
        ch.basic_get("lost".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_none()
    );
    broker.stop().await;
}

/// Publishes `body` to `exchange` with `key` and gets the next message of
/// `queue` (empty if there is none).
async fn round_trip(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    queue: &str,
) -> Vec<u8> {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .map(|m| m.delivery.data)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_endpoint_answers_in_shape() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q1").await;
    flushed(&ch).await;
    let api = Api::guest(&broker);
    assert_eq!(
        api.put(
            "/api/policies/%2F/p1",
            json!({"pattern": "^q", "definition": {"max-length": 9}})
        )
        .await,
        StatusCode::CREATED
    );
    let (_, conns) = api.get("/api/connections").await;
    let conn_name: String = conns[0]["name"]
        .as_str()
        .unwrap()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'.' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    // (path, a field every answer has: in the object, or in each element)
    let checks: Vec<(String, &str)> = vec![
        ("/api/whoami".into(), "name"),
        ("/api/users/guest".into(), "hashing_algorithm"),
        ("/api/vhosts/%2F".into(), "messages_ready"),
        ("/api/nodes/warren@localhost".into(), "mem_limit"),
        (format!("/api/connections/{conn_name}"), "peer_port"),
        ("/api/policies".into(), "apply-to"),
        ("/api/policies/%2F/p1".into(), "definition"),
        ("/api/permissions/%2F/guest".into(), "configure"),
        ("/api/exchanges".into(), "type"),
        ("/api/exchanges/%2F/amq.fanout".into(), "internal"),
        ("/api/queues".into(), "messages_unacknowledged"),
        ("/api/queues/%2F".into(), "consumers"),
        ("/api/bindings".into(), "properties_key"),
        (
            "/api/bindings/%2F/e/amq.default/q/q1".into(),
            "destination_type",
        ),
        (
            "/api/bindings/%2F/e/amq.default/q/q1/q1".into(),
            "routing_key",
        ),
        ("/api/channels".into(), "connection_details"),
        ("/api/definitions".into(), "rabbit_version"),
    ];
    for (path, field) in checks {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let has = |v: &Value| v.get(field).is_some();
        let ok = match &body {
            Value::Array(items) => !items.is_empty() && items.iter().all(has),
            other => has(other),
        };
        assert!(ok, "{path} lacks '{field}': {body}");
    }
    let (_, q) = api.get("/api/queues/%2F/q1").await;
    assert_eq!(q["policy"], "p1");
    // Missing objects are 404 with RabbitMQ's body everywhere.
    for path in [
        "/api/users/nobody",
        "/api/vhosts/nowhere",
        "/api/nodes/rabbit@elsewhere",
        "/api/connections/nope",
        "/api/policies/%2F/none",
        "/api/exchanges/%2F/none",
        "/api/queues/nowhere",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error"], "Object Not Found", "{path}");
    }
    broker.stop().await;
}

/// Names over 255 octets (AMQP's short string) are a 400 with the reason,
/// not a 500 with a storage error, for every kind of named object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_over_255_octets_are_refused_with_a_reason() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    let long = "n".repeat(256);
    let cases = [
        (format!("/api/vhosts/{long}"), json!({})),
        (
            format!("/api/users/{long}"),
            json!({"password": "p", "tags": ""}),
        ),
        (format!("/api/queues/%2f/{long}"), json!({"durable": true})),
        (
            format!("/api/exchanges/%2f/{long}"),
            json!({"type": "direct", "durable": true}),
        ),
        (
            format!("/api/policies/%2f/{long}"),
            json!({"pattern": ".*", "definition": {"max-length": 1}}),
        ),
    ];
    for (path, body) in cases {
        let (status, reply) = api.send(reqwest::Method::PUT, &path, Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {reply}");
        assert!(
            reply["reason"]
                .as_str()
                .is_some_and(|r| r.contains("too long")),
            "{path}: {reply}"
        );
    }
    // 255 octets are fine.
    let ok = "n".repeat(255);
    assert_eq!(
        api.put(&format!("/api/queues/%2f/{ok}"), json!({"durable": true}))
            .await,
        StatusCode::CREATED
    );
}

/// Listings honour RabbitMQ's pagination, filtering, sorting and column
/// parameters: a page of a long list comes in RabbitMQ's envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_paginated_filtered_and_sorted_as_rabbitmq_does() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    for i in 0..120 {
        assert_eq!(
            api.put(
                &format!("/api/queues/%2f/p{i:03}"),
                json!({"durable": false})
            )
            .await,
            StatusCode::CREATED
        );
    }
    api.put("/api/queues/%2f/other", json!({"durable": false}))
        .await;

    let (status, page) = api.get("/api/queues?page=2&page_size=50").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["page"], 2);
    assert_eq!(page["page_size"], 50);
    assert_eq!(page["page_count"], 3);
    assert_eq!(page["total_count"], 121);
    assert_eq!(page["filtered_count"], 121);
    assert_eq!(page["item_count"], 50);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 50);
    assert_eq!(items[0]["name"], "p049", "pages follow the name order");

    // A substring of the name, ignoring case; the last page is short.
    let (_, page) = api
        .get("/api/queues/%2f?page=1&page_size=500&name=P11")
        .await;
    assert_eq!(page["filtered_count"], 10);
    assert_eq!(page["total_count"], 121);
    // A regular expression, sorted in reverse, some columns only.
    let (_, page) = api
        .get("/api/queues?page=1&page_size=3&name=%5Ep0%5B0-1%5D&use_regex=true&sort=name&sort_reverse=true&columns=name,vhost")
        .await;
    assert_eq!(page["filtered_count"], 20, "{page}");
    assert_eq!(
        page["items"],
        json!([
            {"name": "p019", "vhost": "/"},
            {"name": "p018", "vhost": "/"},
            {"name": "p017", "vhost": "/"}
        ])
    );
    // Without `page`, the whole list, as before (filters still apply).
    let (_, all) = api.get("/api/queues?name=other").await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    let (_, all) = api.get("/api/queues").await;
    assert_eq!(all.as_array().unwrap().len(), 121);
    // Other listings take the same parameters: exchanges sorted by type.
    let (_, page) = api
        .get("/api/exchanges/%2f?page=1&page_size=2&sort=type&columns=name,type")
        .await;
    assert_eq!(
        page["items"],
        json!([{"name": "", "type": "direct"}, {"name": "amq.direct", "type": "direct"}]),
        "{page}"
    );

    for bad in [
        "/api/queues?page=0",
        "/api/queues?page=1&page_size=501",
        "/api/queues?page=4&page_size=50",
        "/api/queues?page=x",
        "/api/queues?page=1&name=(&use_regex=true",
    ] {
        let (status, reply) = api.get(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {reply}");
    }
}

/// Routes RabbitMQ's tools and health checks use beyond the basic CRUD:
/// listener and vhost checks, topic permissions, per-vhost and
/// per-connection listings, a channel by name, a queue's and an exchange's
/// bindings, the JSON 404 for any other path, `"arguments": []`, the
/// overview's channel total and exchange types, and full permissions for
/// whoever creates a vhost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_routes_answer_as_rabbitmq_does() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "tooled").await;

    // Any other path: RabbitMQ's JSON 404.
    let (status, body) = api.get("/api/no-such-thing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": "Object Not Found", "reason": "Not Found"})
    );

    // Health checks.
    assert_eq!(
        api.get("/api/health/checks/virtual-hosts").await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let port = broker.addr.port();
    assert_eq!(
        api.get(&format!("/api/health/checks/port-listener/{port}"))
            .await,
        (StatusCode::OK, json!({"status": "ok", "port": port}))
    );
    let (status, body) = api.get("/api/health/checks/port-listener/1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "No active listener");
    assert_eq!(body["missing"], 1);
    assert!(
        body["ports"].as_array().unwrap().contains(&json!(port)),
        "{body}"
    );
    assert_eq!(
        api.get("/api/health/checks/protocol-listener/amqp0-9-1")
            .await,
        (StatusCode::OK, json!({"status": "ok", "protocol": "amqp"}))
    );
    let (status, body) = api.get("/api/health/checks/protocol-listener/mqtt").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["missing"], "mqtt");
    assert!(
        body["protocols"]
            .as_array()
            .unwrap()
            .contains(&json!("amqp")),
        "{body}"
    );
    assert_eq!(
        api.get("/api/extensions").await,
        (StatusCode::OK, json!([]))
    );

    // The overview counts channels and lists the exchange types.
    let (_, overview) = api.get("/api/overview").await;
    assert_eq!(overview["object_totals"]["channels"], 1, "{overview}");
    let types: Vec<&str> = overview["exchange_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["direct", "fanout", "headers", "topic"]);

    // `"arguments": []` is no arguments (rabbitmqadmin sends it).
    assert_eq!(
        api.put(
            "/api/queues/%2F/from-admin",
            json!({"durable": true, "arguments": []})
        )
        .await,
        StatusCode::CREATED
    );

    // Topic permissions.
    assert_eq!(
        api.put(
            "/api/topic-permissions/%2F/guest",
            json!({"exchange": "amq.topic", "write": "^w", "read": "^r"})
        )
        .await,
        StatusCode::CREATED
    );
    let one = json!({"user": "guest", "vhost": "/", "exchange": "amq.topic", "write": "^w", "read": "^r"});
    for path in [
        "/api/topic-permissions",
        "/api/topic-permissions/%2F/guest",
        "/api/vhosts/%2F/topic-permissions",
        "/api/users/guest/topic-permissions",
    ] {
        assert_eq!(
            api.get(path).await,
            (StatusCode::OK, json!([one])),
            "{path}"
        );
    }
    let (status, body) = api
        .send(
            reqwest::Method::PUT,
            "/api/topic-permissions/%2F/guest",
            Some(json!({"write": ".*"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        api.delete("/api/topic-permissions/%2F/guest").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get("/api/topic-permissions/%2F/guest").await.0,
        StatusCode::NOT_FOUND
    );

    // Connections and channels by vhost and by connection; a channel by name.
    let (_, conns) = api.get("/api/vhosts/%2F/connections").await;
    assert_eq!(conns.as_array().unwrap().len(), 1, "{conns}");
    let name = conns[0]["name"].as_str().unwrap().to_owned();
    let encoded: String = url_encode(&name);
    let (_, channels) = api
        .get(&format!("/api/connections/{encoded}/channels"))
        .await;
    assert_eq!(channels.as_array().unwrap().len(), 1, "{channels}");
    assert_eq!(api.get("/api/vhosts/%2F/channels").await.1, channels);
    // A plain channel: no confirms, no transactions, no prefetch yet.
    assert_eq!(
        (
            &channels[0]["confirm"],
            &channels[0]["transactional"],
            &channels[0]["prefetch_count"]
        ),
        (&json!(false), &json!(false), &json!(0))
    );
    let channel = channels[0]["name"].as_str().unwrap().to_owned();
    let (status, one_channel) = api
        .get(&format!("/api/channels/{}", url_encode(&channel)))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one_channel, channels[0]);
    assert_eq!(
        api.get("/api/channels/nobody%20(1)").await.0,
        StatusCode::NOT_FOUND
    );
    // Its mode and prefetch once set.
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (_, one_channel) = api
        .get(&format!("/api/channels/{}", url_encode(&channel)))
        .await;
    assert_eq!(
        (
            &one_channel["confirm"],
            &one_channel["transactional"],
            &one_channel["prefetch_count"]
        ),
        (&json!(true), &json!(false), &json!(5)),
        "{one_channel}"
    );

    // A queue's bindings; an exchange's as source and as destination.
    ch.exchange_declare(
        "tools.x".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "tooled".into(),
        "tools.x".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "tools.x".into(),
        "amq.direct".into(),
        "e".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (_, bindings) = api.get("/api/queues/%2F/tooled/bindings").await;
    let sources: Vec<&str> = bindings
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["", "tools.x"], "{bindings}");
    let (_, from) = api.get("/api/exchanges/%2F/tools.x/bindings/source").await;
    assert_eq!(from.as_array().unwrap().len(), 1, "{from}");
    assert_eq!(from[0]["destination"], "tooled");
    let (_, to) = api
        .get("/api/exchanges/%2F/tools.x/bindings/destination")
        .await;
    assert_eq!(to.as_array().unwrap().len(), 1, "{to}");
    assert_eq!(to[0]["source"], "amq.direct");
    assert_eq!(
        api.get("/api/exchanges/%2F/missing/bindings/source")
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // Whoever creates a vhost may use it.
    assert_eq!(
        api.put("/api/vhosts/made", json!({})).await,
        StatusCode::CREATED
    );
    let (status, p) = api.get("/api/permissions/made/guest").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&p["configure"], &p["write"], &p["read"]),
        (&json!(".*"), &json!(".*"), &json!(".*"))
    );
}

/// Every list endpoint takes the listing parameters (pagination, name
/// filter, columns), and `pagination=true` alone gives the envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_endpoint_pages_filters_and_picks_columns() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "listed").await;
    let _consumer = ch
        .basic_consume(
            "listed".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for user in ["ann", "ben"] {
        assert_eq!(
            api.put(
                &format!("/api/users/{user}"),
                json!({"password": "pw", "tags": ""})
            )
            .await,
            StatusCode::CREATED
        );
        assert_eq!(
            api.put(
                &format!("/api/permissions/%2F/{user}"),
                json!({"configure": ".*", "write": ".*", "read": ".*"})
            )
            .await,
            StatusCode::CREATED
        );
    }
    for name in ["p-one", "p-two"] {
        assert_eq!(
            api.put(
                &format!("/api/policies/%2F/{name}"),
                json!({"pattern": "^nothing$", "definition": {"max-length": 1}})
            )
            .await,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        api.put("/api/vhost-limits/%2F/max-queues", json!({"value": 100}))
            .await,
        StatusCode::NO_CONTENT
    );

    // Permissions: three (ann, ben, guest), one per page, filtered by user.
    let (_, page) = api.get("/api/permissions?page=2&page_size=1").await;
    assert_eq!(
        (
            &page["total_count"],
            &page["page_count"],
            &page["items"][0]["user"]
        ),
        (&json!(3), &json!(3), &json!("ben")),
        "{page}"
    );
    let (_, mine) = api.get("/api/vhosts/%2F/permissions?name=ann").await;
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    let (_, users) = api.get("/api/users/ben/permissions?columns=vhost").await;
    assert_eq!(users, json!([{"vhost": "/"}]));
    // Policies, filtered by name, either list.
    for path in ["/api/policies?name=two", "/api/policies/%2F?name=two"] {
        let (_, found) = api.get(path).await;
        assert_eq!(found.as_array().unwrap().len(), 1, "{path}: {found}");
        assert_eq!(found[0]["name"], "p-two");
    }
    // Nodes, consumers and vhost limits: columns and pages.
    let (_, nodes) = api.get("/api/nodes?columns=name").await;
    assert_eq!(nodes, json!([{"name": "warren@localhost"}]));
    let (_, consumers) = api.get("/api/consumers?page=1&page_size=10").await;
    assert_eq!(consumers["item_count"], 1, "{consumers}");
    assert_eq!(consumers["items"][0]["consumer_tag"], "c1");
    let (_, limits) = api.get("/api/vhost-limits?columns=vhost").await;
    assert_eq!(limits, json!([{"vhost": "/"}]));
    // `pagination=true` alone: page 1 in the envelope.
    let (_, queues) = api.get("/api/queues?pagination=true").await;
    assert_eq!(
        (
            &queues["page"],
            &queues["item_count"],
            &queues["items"][0]["name"]
        ),
        (&json!(1), &json!(1), &json!("listed")),
        "{queues}"
    );
}

/// One vhost's definitions, as RabbitMQ exports and imports them: only
/// its scoped sections, without a `vhost` field, and imported into the
/// vhost the path names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vhosts_definitions_export_and_import_into_another() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    for (path, body) in [
        (
            "/api/exchanges/%2F/vx",
            json!({"type": "topic", "durable": true}),
        ),
        (
            "/api/queues/%2F/vq",
            json!({"durable": true, "arguments": {"x-max-length": 7}}),
        ),
        (
            "/api/policies/%2F/vp",
            json!({"pattern": "^vq$", "definition": {"message-ttl": 1000}}),
        ),
        ("/api/vhosts/copy", json!({})),
    ] {
        assert_eq!(api.put(path, body).await, StatusCode::CREATED, "{path}");
    }
    assert_eq!(
        api.post("/api/bindings/%2F/e/vx/q/vq", json!({"routing_key": "a.#"}))
            .await
            .status(),
        StatusCode::CREATED
    );
    let (status, defs) = api.get("/api/definitions/%2F").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        defs.get("users").is_none() && defs.get("vhosts").is_none(),
        "{defs}"
    );
    assert_eq!(
        defs["queues"],
        json!([{"name": "vq", "durable": true, "auto_delete": false, "arguments": {"x-max-length": 7}}])
    );
    assert_eq!(defs["exchanges"][0]["name"], "vx");
    assert!(defs["exchanges"][0].get("vhost").is_none());
    assert_eq!(defs["bindings"][0]["routing_key"], "a.#");
    assert_eq!(defs["policies"][0]["name"], "vp");
    assert_eq!(
        api.get("/api/definitions/nowhere").await.0,
        StatusCode::NOT_FOUND
    );

    // Into vhost "copy": the same objects there.
    let resp = api.post("/api/definitions/copy", defs).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (status, q) = api.get("/api/queues/copy/vq").await;
    assert_eq!(status, StatusCode::OK, "{q}");
    assert_eq!(q["arguments"]["x-max-length"], 7);
    assert_eq!(api.get("/api/exchanges/copy/vx").await.0, StatusCode::OK);
    assert_eq!(api.get("/api/policies/copy/vp").await.0, StatusCode::OK);
    let (_, bindings) = api.get("/api/exchanges/copy/vx/bindings/source").await;
    assert_eq!(bindings[0]["destination"], "vq", "{bindings}");
}

/// `s` percent-encoded for a path segment.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The fixture file for API path `path` (as the capture script names them).
fn rabbitmq_fixture(path: &str) -> Value {
    let name = match path {
        "/api/nodes/{node}" => "nodes__node".to_owned(),
        "/api/health/checks/port-listener/{port}" => {
            "health__checks__port-listener__port".to_owned()
        }
        "/api/connections/{name}" => "connection".to_owned(),
        "/api/channels/{name}" => "channel".to_owned(),
        "/api/queues?pagination=true&page=1&page_size=2" => "queues_paginated".to_owned(),
        "/api/this/does/not/exist" => "not_found".to_owned(),
        "/api/definitions" => "definitions".to_owned(),
        p => p
            .trim_start_matches("/api/")
            .replace("%2F", "root")
            .replace('/', "__"),
    };
    let file = format!(
        "{}/data/rabbitmq_3_10_api/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}")))
        .unwrap()
}

/// The keys of `rabbit` (a recorded RabbitMQ answer) that `warren` lacks,
/// as dotted paths: objects key by key (into nested objects both have),
/// arrays by the union of their elements' keys.
fn missing_keys(rabbit: &Value, warren: &Value, prefix: &str, out: &mut Vec<String>) {
    let union = |v: &Value| -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        for item in v.as_array().map(Vec::as_slice).unwrap_or_default() {
            for (k, x) in item.as_object().into_iter().flatten() {
                m.entry(k.clone()).or_insert_with(|| x.clone());
            }
        }
        m
    };
    let (r, w) = match (rabbit, warren) {
        (Value::Object(r), Value::Object(w)) => (r.clone(), w.clone()),
        (Value::Array(_), Value::Array(_)) => (union(rabbit), union(warren)),
        _ => return,
    };
    // Present or not with the moment or the client (a queue idle for a
    // while; a client that names its connection): not compared.
    const CIRCUMSTANTIAL: [&str; 2] = ["idle_since", "user_provided_name"];
    // Objects keyed by names (nodes, arguments, what a client said of
    // itself): compared as a whole, not key by key.
    const OPAQUE: [&str; 5] = [
        "cluster_state",
        "client_properties",
        "arguments",
        "definition",
        "effective_policy_definition",
    ];
    for (k, rv) in &r {
        if CIRCUMSTANTIAL.contains(&k.as_str()) {
            continue;
        }
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match w.get(k) {
            None => out.push(path),
            Some(wv) if rv.is_object() && wv.is_object() && !OPAQUE.contains(&k.as_str()) => {
                missing_keys(rv, wv, &path, out);
            }
            Some(_) => {}
        }
    }
}

/// Fields RabbitMQ 3.10 answers with that Warren does not have, one
/// `path field` per line (`tests/data/rabbitmq_3_10_api/known_gaps.txt`):
/// Erlang runtime internals (garbage collection, reductions, processes,
/// the backing queue, mnesia, run queues, contexts, applications), figures
/// Warren does not keep (messages in RAM, persistent or paged out, the
/// head message's timestamp, channels' and exchanges' per-exchange and
/// per-queue breakdowns, a vhost's channel-level counts).
/// Anything else RabbitMQ has, Warren must have too: the test fails on a
/// new gap, and on a gap closed but still listed.
fn known_gaps() -> Vec<String> {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/rabbitmq_3_10_api/known_gaps.txt"
    );
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Every recorded RabbitMQ 3.10.8 answer (`tests/data/rabbitmq_3_10_api`,
/// recorded by `conformance/capture/capture_management_api.sh` from the same
/// objects made here) against Warren's answer for the same path: same
/// status, and every field RabbitMQ has, Warren has, but for the known gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_with_rabbitmqs_fields() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    for (path, body) in [
        ("/api/vhosts/shop", json!({})),
        (
            "/api/users/alice",
            json!({"password": "pw", "tags": "management"}),
        ),
        (
            "/api/permissions/shop/alice",
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        ),
        (
            "/api/topic-permissions/shop/alice",
            json!({"exchange": "amq.topic", "write": "^a", "read": "^b"}),
        ),
        (
            "/api/policies/%2F/orders-limit",
            json!({"pattern": "^orders$", "definition": {"max-length": 1000}, "apply-to": "queues"}),
        ),
        (
            "/api/queues/%2F/audit",
            json!({"durable": true, "arguments": {"x-max-length": 10}}),
        ),
        ("/api/queues/shop/invoices", json!({"durable": true})),
    ] {
        assert_eq!(api.put(path, body).await, StatusCode::CREATED, "{path}");
    }
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "events".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "orders".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "orders".into(),
        "events".into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..4 {
        ch.basic_publish(
            "events".into(),
            "order.new".into(),
            BasicPublishOptions::default(),
            b"order",
            // Persistent, as the capture's.
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let consumer_ch = conn.create_channel().await.unwrap();
    consumer_ch
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consumer_ch
        .basic_consume(
            "orders".into(),
            "capture-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    warren_tests::next_deliveries(&mut consumer, 1).await;

    let (_, conns) = api.get("/api/connections").await;
    let conn_name = url_encode(conns[0]["name"].as_str().unwrap());
    let (_, chans) = api.get("/api/channels").await;
    let chan_name = url_encode(chans[0]["name"].as_str().unwrap());
    let index: serde_json::Map<String, Value> = match rabbitmq_fixture("/api/index") {
        Value::Object(m) => m,
        other => panic!("index.json: {other}"),
    };
    let mut gaps = Vec::new();
    for (path, status) in &index {
        let real = path
            .replace("{node}", "warren@localhost")
            .replace("{port}", &broker.addr.port().to_string())
            .replace(
                "/api/connections/{name}",
                &format!("/api/connections/{conn_name}"),
            )
            .replace(
                "/api/channels/{name}",
                &format!("/api/channels/{chan_name}"),
            );
        let (got_status, got) = api.get(&real).await;
        assert_eq!(
            u64::from(got_status.as_u16()),
            status.as_u64().unwrap(),
            "{path}: {got}"
        );
        let mut missing = Vec::new();
        missing_keys(&rabbitmq_fixture(path), &got, "", &mut missing);
        gaps.extend(missing.into_iter().map(|k| format!("{path} {k}")));
    }
    let known = known_gaps();
    let new: Vec<&String> = gaps.iter().filter(|g| !known.contains(g)).collect();
    assert!(
        new.is_empty(),
        "{} fields RabbitMQ 3.10 answers with are missing:\n{}",
        new.len(),
        new.iter()
            .map(|g| format!("    {g}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Gaps closed since the list was written come off it.
    let stale: Vec<&String> = known.iter().filter(|k| !gaps.contains(k)).collect();
    assert!(
        stale.is_empty(),
        "no longer missing, remove from known_gaps.txt: {stale:?}"
    );
    // The channels' counters follow what was done on them: 4 confirmed
    // publishes on one, 1 delivery needing an ack on the other.
    let (_, chans) = api.get("/api/channels").await;
    let stats: Vec<&Value> = chans
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["message_stats"])
        .collect();
    assert!(
        stats.iter().any(|s| s["publish"] == 4 && s["confirm"] == 4),
        "{chans}"
    );
    assert!(
        stats
            .iter()
            .any(|s| s["deliver"] == 1 && s["deliver_get"] == 1 && s["ack"] == 0),
        "{chans}"
    );
    // The exchange counts the 4 publishes and the 4 queue copies; the
    // vhost sums its queues; the node's store wrote the 4 persistent
    // messages (and synced for their confirms).
    let (_, events) = api.get("/api/exchanges/%2F/events").await;
    assert_eq!(
        (
            &events["message_stats"]["publish_in"],
            &events["message_stats"]["publish_out"]
        ),
        (&json!(4), &json!(4)),
        "{events}"
    );
    let (_, amq_topic) = api.get("/api/exchanges/%2F/amq.topic").await;
    assert!(amq_topic.get("message_stats").is_none(), "{amq_topic}");
    let (_, root) = api.get("/api/vhosts/%2F").await;
    assert_eq!(root["message_stats"]["publish"], 4, "{root}");
    assert_eq!(root["message_stats"]["deliver"], 1, "{root}");
    let (_, node) = api.get("/api/nodes/warren@localhost").await;
    for (field, at_least) in [
        ("msg_store_write_count", 4),
        ("io_sync_count", 1),
        ("io_write_bytes", 4),
    ] {
        assert!(node[field].as_u64().unwrap() >= at_least, "{field}: {node}");
    }
    // Beyond shapes: the cluster id, no runtime-parameter components, no
    // OAuth.
    let (_, id) = api.get("/api/global-parameters/internal_cluster_id").await;
    assert!(
        id["value"]
            .as_str()
            .is_some_and(|v| v.starts_with("rabbitmq-cluster-id-")),
        "{id}"
    );
    let (status, body) = api
        .send(
            reqwest::Method::PUT,
            "/api/parameters/federation-upstream/%2F/up",
            Some(json!({"value": {"uri": "amqp://elsewhere"}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("component federation-upstream not found")
    );
    assert_eq!(api.get("/api/auth").await.1["oauth_enabled"], false);
    broker.stop().await;
}

/// One step of `tests/data/rabbitmq_3_10_operator_policies.md`: an API
/// request and RabbitMQ 3.10.8's answer (rabbitmqctl steps are replayed by
/// warrenctl's tests).
struct RecordedStep {
    title: String,
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
    status: StatusCode,
    answer: Option<Value>,
}

/// The API steps recorded from RabbitMQ in `text` (one of `data/`'s
/// capture files), in order.
fn recorded_steps(text: &str) -> Vec<RecordedStep> {
    let mut steps = Vec::new();
    for section in text.split("\n## ").skip(1) {
        let title = section.lines().next().unwrap().to_owned();
        let field = |prefix: &str| {
            section
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim_matches('`').to_owned())
        };
        let Some(request) = field("request: ") else {
            continue; // a rabbitmqctl step
        };
        let (method, path) = request.split_once(' ').unwrap();
        let answer = section.split_once("```json\n").map(|(_, rest)| {
            let json = rest.split_once("```").unwrap().0;
            // (RabbitMQ 3.10 HTML-escapes some validation texts.)
            serde_json::from_str(&json.replace("&lt;", "<").replace("&gt;", ">")).unwrap()
        });
        steps.push(RecordedStep {
            title,
            method: method.parse().unwrap(),
            path: path.to_owned(),
            body: field("body: ").map(|b| serde_json::from_str(&b).unwrap()),
            status: field("status: ")
                .unwrap()
                .parse::<u16>()
                .unwrap()
                .try_into()
                .unwrap(),
            answer,
        });
    }
    steps
}

/// Operator policies as RabbitMQ 3.10.8 answered them, step by step
/// (`conformance/capture/probe_operator_policies.sh`): the same statuses and
/// error texts, the same listings, and on each queue the same policy,
/// operator policy and effective definition — the lower of the two limits
/// where both set one — with the limit enforced (8 published, 5 kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_policies_cap_policies_as_rabbitmq_does() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let steps = recorded_steps(include_str!("data/rabbitmq_3_10_operator_policies.md"));
    assert!(steps.len() >= 25, "{} steps", steps.len());
    for step in &steps {
        let (status, got) = api
            .send(step.method.clone(), &step.path, step.body.clone())
            .await;
        let what = format!("{}: {} {}", step.title, step.method, step.path);
        assert_eq!(status, step.status, "{what}: {got}");
        match &step.answer {
            None => assert_eq!(got, Value::Null, "{what}"),
            // A queue: what the policies made of it.
            Some(answer) if step.path.starts_with("/api/queues/") => {
                for key in [
                    "policy",
                    "operator_policy",
                    "effective_policy_definition",
                    "arguments",
                    "messages",
                ] {
                    assert_eq!(got[key], answer[key], "{what}: {key}");
                }
            }
            // RabbitMQ 3.10 exports operator policies as `operator_policy`
            // runtime parameters (no `operator_policies` section); so does
            // Warren, with the same values.
            Some(answer) if step.path == "/api/definitions" => {
                let operator = |defs: &Value| {
                    let mut found: Vec<Value> = defs["parameters"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|p| p["component"] == "operator_policy")
                        .cloned()
                        .collect();
                    found.sort_by_key(|p| p["name"].as_str().unwrap_or_default().to_owned());
                    found
                };
                assert!(answer.get("operator_policies").is_none());
                assert!(got.get("operator_policies").is_none(), "{got}");
                assert_eq!(operator(&got), operator(answer), "{what}");
                assert_eq!(operator(&got).len(), 3, "{got}");
                assert_eq!(got["policies"].as_array().map(Vec::len), Some(2));
            }
            Some(answer) => assert_eq!(&got, answer, "{what}"),
        }
        // The probe's client publishes 8 messages once the queues and
        // policies are in place.
        if step.title == "policy with a higher limit for q-op" {
            for _ in 0..8 {
                publish(&ch, "q-plain", b"m").await;
            }
            flushed(&ch).await;
        }
    }
    // The limits are enforced, not only shown: the operator's 5 holds
    // against the policy's 10 until it is deleted, then the policy's 10.
    for _ in 0..8 {
        publish(&ch, "q-plain", b"m").await;
    }
    flushed(&ch).await;
    assert_eq!(ready_count(&ch, "q-plain").await, 10);
    broker.stop().await;
}

/// RabbitMQ's consumer utilisation (and 3.10's `consumer_capacity`, the
/// same figure): the fraction of the last sampling period (5 s) in which a
/// consumer could take a message at once — 1 for an idle consumer with
/// credit on an empty queue, 0 for one whose prefetch is full while
/// messages wait, 0 without consumers. Also the store's message writes in
/// the overview's `disk_writes`, and the rates beside the node's gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_utilisation_follows_what_consumers_can_take() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in ["idle", "blocked", "unconsumed"] {
        declare_durable_queue(&ch, q).await;
    }
    // Three persistent messages into "blocked", confirmed (so written).
    let (_, before) = api.get("/api/overview").await;
    let writes_before = before["message_stats"]["disk_writes"].as_u64().unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..3 {
        ch.basic_publish(
            "".into(),
            "blocked".into(),
            BasicPublishOptions::default(),
            b"m",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let (_, overview) = api.get("/api/overview").await;
    let writes = overview["message_stats"]["disk_writes"].as_u64().unwrap();
    assert!(writes >= writes_before + 3, "{writes_before} -> {writes}");
    assert!(overview["message_stats"]["disk_writes_details"]["rate"].is_number());

    let _idle = ch
        .basic_consume(
            "idle".into(),
            "c-idle".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    ch2.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut blocked = ch2
        .basic_consume(
            "blocked".into(),
            "c-blocked".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    next_deliveries(&mut blocked, 1).await; // never acked: prefetch full

    // Sampled every 5 s: wait (at most 20 s) for a whole period of each.
    let utilisation = |q: &Value| q["consumer_utilisation"].as_f64().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, idle) = api.get("/api/queues/%2F/idle").await;
        let (_, blocked) = api.get("/api/queues/%2F/blocked").await;
        let (_, unconsumed) = api.get("/api/queues/%2F/unconsumed").await;
        let got = [
            utilisation(&idle),
            utilisation(&blocked),
            utilisation(&unconsumed),
        ];
        if got == [1.0, 0.0, 0.0] {
            assert_eq!(idle["consumer_capacity"], idle["consumer_utilisation"]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "utilisation of idle, blocked, unconsumed: {got:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let (_, nodes) = api.get("/api/nodes").await;
    for gauge in [
        "mem_used",
        "disk_free",
        "fd_used",
        "sockets_used",
        "proc_used",
    ] {
        assert!(
            nodes[0][format!("{gauge}_details")]["rate"].is_number(),
            "{gauge}: {}",
            nodes[0]
        );
    }
    broker.stop().await;
}

/// A transactional channel's `messages_uncommitted` and `acks_uncommitted`
/// count what its open transaction holds, and go back to 0 at the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_shows_what_it_holds() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "txq").await;
    publish(&ch, "txq", b"first").await;
    ch.tx_select().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "txq".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = next_deliveries(&mut consumer, 1).await;
    first[0].ack(BasicAckOptions::default()).await.unwrap();
    publish(&ch, "txq", b"a").await;
    publish(&ch, "txq", b"b").await;
    flushed(&ch).await;
    let held = |chans: &Value| {
        let c = chans
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["transactional"] == true)
            .cloned()
            .unwrap();
        (
            c["messages_uncommitted"].clone(),
            c["acks_uncommitted"].clone(),
        )
    };
    assert_eq!(
        held(&api.get("/api/channels").await.1),
        (json!(2), json!(1))
    );
    ch.tx_commit().await.unwrap();
    assert_eq!(
        held(&api.get("/api/channels").await.1),
        (json!(0), json!(0))
    );
    broker.stop().await;
}

/// The web UI is served at `/` from the binary, with a same-origin content
/// security policy; a 401 to the page's own requests (marked
/// `X-Requested-With`) carries no basic-auth challenge, so browsers show
/// the page's login form instead of their own prompt; other clients still
/// get the challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_is_served_and_its_requests_get_no_browser_prompt() {
    let broker = TestBroker::start().await;
    let base = broker.management_url();
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let headers = r.headers().clone();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'self'"),
            "{path}"
        );
        assert!(!r.text().await.unwrap().is_empty(), "{path}");
    }
    let refused = |from_page: bool| {
        let mut req = http
            .get(format!("{base}/api/whoami"))
            .basic_auth("guest", Some("wrong"));
        if from_page {
            req = req.header("x-requested-with", "XMLHttpRequest");
        }
        req.send()
    };
    let r = refused(false).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = refused(true).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(!r.headers().contains_key("www-authenticate"));
    broker.stop().await;
}

/// Warren's dry run of routing (`POST /api/exchanges/{vhost}/{name}/route`):
/// the queues a routing key (or headers) would reach, the bindings that
/// match hop by hop, an alternate exchange taking over, and nothing routed
/// or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_dry_run_explains_where_a_message_goes() {
    let broker = TestBroker::start().await;
    let api = Api::guest(&broker);
    for (path, body) in [
        ("/api/exchanges/%2F/lost", json!({"type": "fanout"})),
        (
            "/api/exchanges/%2F/orders",
            json!({"type": "topic", "arguments": {"alternate-exchange": "lost"}}),
        ),
        ("/api/queues/%2F/eu", json!({})),
        ("/api/queues/%2F/all", json!({})),
        ("/api/queues/%2F/unrouted", json!({})),
    ] {
        assert_eq!(api.put(path, body).await, StatusCode::CREATED, "{path}");
    }
    for (source, queue, key) in [
        ("orders", "eu", "order.*.eu"),
        ("orders", "all", "order.#"),
        ("lost", "unrouted", ""),
    ] {
        let r = api
            .post(
                &format!("/api/bindings/%2F/e/{source}/q/{queue}"),
                json!({"routing_key": key}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let trace = |key: &'static str| {
        api.send(
            reqwest::Method::POST,
            "/api/exchanges/%2F/orders/route",
            Some(json!({"routing_key": key})),
        )
    };
    let (status, t) = trace("order.new.eu").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(t["routed"], true);
    assert_eq!(t["queues"], json!(["all", "eu"]), "{t}");
    let keys: Vec<&str> = t["hops"][0]["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["routing_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["order.#", "order.*.eu"]);
    let (_, t) = trace("invoice.paid").await;
    assert_eq!(t["hops"][0]["alternate_exchange"], "lost", "{t}");
    assert_eq!(t["queues"], json!(["unrouted"]));
    // Nothing was routed, nothing counted.
    let (_, q) = api.get("/api/queues/%2F/all").await;
    assert_eq!(q["messages"], 0);
    let (_, x) = api.get("/api/exchanges/%2F/orders").await;
    assert!(x.get("message_stats").is_none(), "{x}");
    let (status, _) = api
        .send(
            reqwest::Method::POST,
            "/api/exchanges/%2F/missing/route",
            Some(json!({"routing_key": "k"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    broker.stop().await;
}

/// A data directory on a tiny file system (a tmpfs; mounting needs root,
/// which CI has), unmounted (lazily) on drop.
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount(octets: u64) -> Result<TinyDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={octets}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(TinyDisk { dir })
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        // Lazily: the broker's store may still hold its files open (its
        // writer failed, so it does not close cleanly).
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk stops the store's writer for good (what is on disk stays
/// recoverable): publishes are nacked, and the health check operators
/// watch, `virtual-hosts` (`check_virtual_hosts`), fails with the reason,
/// as RabbitMQ's fails when a vhost's message store crashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_virtual_hosts_health_check() {
    let disk = match TinyDisk::mount(6 << 20) {
        Ok(disk) => disk,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: a tmpfs needs root: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // No disk alarm: the point is the disk filling up under the store.
    let broker = TestBroker::start_with(disk.dir.path(), |c| c.disk_free_limit = 0).await;
    let api = Api::guest(&broker);
    let (status, body) = api.get("/api/health/checks/virtual-hosts").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_durable_queue(&ch, "fill").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = vec![b'x'; 256 << 10];
    let mut nacked = false;
    for _ in 0..64 {
        let confirm = ch
            .basic_publish(
                "".into(),
                "fill".into(),
                BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if confirm.is_nack() {
            nacked = true;
            break;
        }
    }
    assert!(nacked, "a 6 MiB disk took 16 MiB of persistent messages");
    let (status, body) = api.get("/api/health/checks/virtual-hosts").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the message store") && r.contains("failed")),
        "{body}"
    );
    assert_eq!(body["virtual-hosts"], json!(["/"]), "{body}");
    drop(conn);
    drop(broker);
    drop(disk);
}
