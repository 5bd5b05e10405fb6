//! Security and multi-tenancy: users with RabbitMQ-style password hashes,
//! `guest` only from loopback, per-vhost configure/write/read permissions on
//! every operation, topic permissions, vhost isolation, runtime changes to
//! permissions and vhosts, and hostile login input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use amqp_codec::methods::*;
use amqp_codec::{Method, PROTOCOL_HEADER, ShortStr};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_tests::{RawClient, TestBroker, assert_amqp_error, channel_with_queue};

async fn connect_as(
    broker: &TestBroker,
    user: &str,
    pass: &str,
    vhost: &str,
) -> lapin::Result<Connection> {
    let vhost = if vhost == "/" {
        "%2f".to_owned()
    } else {
        vhost.to_owned()
    };
    Connection::connect(
        &format!("amqp://{user}:{pass}@{}/{vhost}", broker.addr),
        ConnectionProperties::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_only_from_loopback_and_passwords_are_checked() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    // The same check the handshake runs, with a non-loopback peer.
    assert!(
        b.authenticate("guest", "guest", "127.0.0.1:40000".parse().unwrap())
            .is_ok()
    );
    let refused = b
        .authenticate("guest", "guest", "192.0.2.10:40000".parse().unwrap())
        .unwrap_err();
    assert!(
        refused.contains("can only connect via localhost"),
        "{refused}"
    );
    b.add_user("bob", Some("b0b"), &["management"])
        .await
        .unwrap();
    assert!(
        b.authenticate("bob", "b0b", "192.0.2.10:40000".parse().unwrap())
            .is_ok(),
        "other users may log in remotely"
    );
    assert!(
        b.authenticate("bob", "wrong", "127.0.0.1:1".parse().unwrap())
            .is_err()
    );
    b.add_user("nopass", None, &[]).await.unwrap();
    assert!(
        b.authenticate("nopass", "", "127.0.0.1:1".parse().unwrap())
            .is_err(),
        "no password: no PLAIN login"
    );
    // Stored as RabbitMQ's salted SHA-256: base64 of 4 + 32 octets.
    let hash = b.auth.user("bob").unwrap().password_hash.unwrap();
    assert_eq!(hash.len(), 48);
    broker.stop().await;
}

/// `loopback_users` names any users, as RabbitMQ's: those it lists are
/// held to loopback, and guest is not once the list leaves it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_users_holds_the_users_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| {
        c.loopback_users = vec!["bob".to_owned()];
    })
    .await;
    let b = broker.broker();
    b.add_user("bob", Some("b0b"), &[]).await.unwrap();
    let remote = "192.0.2.10:40000".parse().unwrap();
    let refused = b.authenticate("bob", "b0b", remote).unwrap_err();
    assert!(
        refused.contains("can only connect via localhost"),
        "{refused}"
    );
    assert!(
        b.authenticate("bob", "b0b", "127.0.0.1:1".parse().unwrap())
            .is_ok()
    );
    assert!(b.authenticate("guest", "guest", remote).is_ok());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_permission_class_allows_and_denies() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_user("bob", Some("b0b"), &[]).await.unwrap();
    b.set_permissions(
        "bob",
        "/",
        "^bob-",
        "^bob-|^amq\\.default$",
        "^bob-|^amq\\.direct$",
    )
    .await
    .unwrap();
    let guest = broker.connect().await;
    channel_with_queue(&guest, "shared").await;

    let bob = connect_as(&broker, "bob", "b0b", "/").await.unwrap();
    // configure
    let ch = bob.create_channel().await.unwrap();
    ch.queue_declare(
        "bob-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let r = ch
        .queue_declare(
            "alice-q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(
        r,
        403,
        "ACCESS_REFUSED - configure access to queue 'alice-q' in vhost '/' refused for user 'bob'",
    );
    // write (publish) on exchanges
    let ch = bob.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        "bob-q".into(),
        BasicPublishOptions::default(),
        b"ok",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "amq.fanout".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"no",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    warren_tests::assert_closed_by_broker(
        Ok(()),
        &ch,
        403,
        "write access to exchange 'amq.fanout' in vhost '/' refused for user 'bob'",
    )
    .await;
    // read (consume, get) on queues
    let ch = bob.create_channel().await.unwrap();
    assert!(
        ch.basic_get("bob-q".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_some()
    );
    let r = ch
        .basic_get("shared".into(), BasicGetOptions::default())
        .await;
    assert_amqp_error(
        r,
        403,
        "read access to queue 'shared' in vhost '/' refused for user 'bob'",
    );
    // bind: write on the queue and read on the exchange
    let ch = bob.create_channel().await.unwrap();
    ch.queue_bind(
        "bob-q".into(),
        "amq.direct".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let r = ch
        .queue_bind(
            "bob-q".into(),
            "amq.topic".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(
        r,
        403,
        "read access to exchange 'amq.topic' in vhost '/' refused for user 'bob'",
    );
    // delete is configure
    let ch = bob.create_channel().await.unwrap();
    let r = ch
        .queue_delete("shared".into(), QueueDeleteOptions::default())
        .await;
    assert_amqp_error(r, 403, "configure access to queue 'shared'");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_changes_apply_to_live_connections() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_user("bob", Some("b0b"), &[]).await.unwrap();
    b.set_permissions("bob", "/", ".*", ".*", ".*")
        .await
        .unwrap();
    let bob = connect_as(&broker, "bob", "b0b", "/").await.unwrap();
    let ch = channel_with_queue(&bob, "q").await;
    b.set_permissions("bob", "/", ".*", ".*", "^$")
        .await
        .unwrap();
    let r = ch.basic_get("q".into(), BasicGetOptions::default()).await;
    assert_amqp_error(r, 403, "read access to queue 'q'");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_and_alternate_exchanges_need_write_access() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_user("bob", Some("b0b"), &[]).await.unwrap();
    b.set_permissions("bob", "/", ".*", "^bob-", ".*")
        .await
        .unwrap();
    let bob = connect_as(&broker, "bob", "b0b", "/").await.unwrap();
    let with = |key: &str, value: &str| {
        let mut t = FieldTable::default();
        t.insert(
            key.into(),
            lapin::types::AMQPValue::LongString(value.into()),
        );
        t
    };

    // Dead-lettering into an exchange bob may not publish to is refused.
    let ch = bob.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            "q1".into(),
            QueueDeclareOptions::default(),
            with("x-dead-letter-exchange", "amq.fanout"),
        )
        .await;
    assert_amqp_error(
        r,
        403,
        "write access to exchange 'amq.fanout' in vhost '/' refused for user 'bob'",
    );
    let ch = bob.create_channel().await.unwrap();
    ch.queue_declare(
        "q2".into(),
        QueueDeclareOptions::default(),
        with("x-dead-letter-exchange", "bob-dlx"),
    )
    .await
    .unwrap();

    // So is an alternate exchange bob may not publish to.
    let r = ch
        .exchange_declare(
            "bob-x".into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            with("alternate-exchange", "amq.direct"),
        )
        .await;
    assert_amqp_error(
        r,
        403,
        "write access to exchange 'amq.direct' in vhost '/' refused for user 'bob'",
    );
    let ch = bob.create_channel().await.unwrap();
    ch.exchange_declare(
        "bob-x".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        with("alternate-exchange", "bob-ae"),
    )
    .await
    .unwrap();
    assert!(b.vhost("/").unwrap().find_queue("q1").is_none());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_replies_need_write_access_to_the_default_exchange() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_user("bob", Some("b0b"), &[]).await.unwrap();
    b.set_permissions("bob", "/", ".*", "^$", ".*")
        .await
        .unwrap();
    // guest waits for a reply; bob, who may not write anywhere, tries to send it.
    let guest = broker.connect().await;
    let gch = guest.create_channel().await.unwrap();
    let _replies = gch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    gch.basic_publish(
        "".into(),
        "nowhere".into(),
        BasicPublishOptions::default(),
        b"request",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    let bob = connect_as(&broker, "bob", "b0b", "/").await.unwrap();
    let ch = bob.create_channel().await.unwrap();
    let r = ch
        .basic_publish(
            "".into(),
            "amq.rabbitmq.reply-to.anything".into(),
            BasicPublishOptions::default(),
            b"reply",
            BasicProperties::default(),
        )
        .await;
    warren_tests::assert_closed_by_broker(
        r,
        &ch,
        403,
        "write access to exchange 'amq.default' in vhost '/' refused for user 'bob'",
    )
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_permissions_restrict_routing_keys() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_user("bob", Some("b0b"), &[]).await.unwrap();
    b.set_permissions("bob", "/", ".*", ".*", ".*")
        .await
        .unwrap();
    b.set_topic_permissions("bob", "/", "amq.topic", "^{username}\\.", "^{username}\\.")
        .await
        .unwrap();
    let bob = connect_as(&broker, "bob", "b0b", "/").await.unwrap();
    let ch = bob.create_channel().await.unwrap();
    ch.basic_publish(
        "amq.topic".into(),
        "bob.news".into(),
        BasicPublishOptions::default(),
        b"mine",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "amq.topic".into(),
        "alice.news".into(),
        BasicPublishOptions::default(),
        b"theirs",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    warren_tests::assert_closed_by_broker(Ok(()), &ch, 403,
        "write access to topic 'alice.news' in exchange 'amq.topic' in vhost '/' refused for user 'bob'").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_are_isolated_and_deleting_one_closes_its_connections() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_vhost("tenant").await.unwrap();
    // guest has no permissions in the new vhost.
    let e = connect_as(&broker, "guest", "guest", "tenant")
        .await
        .expect_err("no access");
    if let Some((code, text)) = warren_tests::amqp_error(&e) {
        assert_eq!(code, 530);
        assert!(
            text.contains("access to vhost 'tenant' refused for user 'guest'"),
            "{text}"
        );
    }
    b.set_permissions("guest", "tenant", ".*", ".*", ".*")
        .await
        .unwrap();
    let root = broker.connect().await;
    channel_with_queue(&root, "only-in-root").await;
    let tenant = connect_as(&broker, "guest", "guest", "tenant")
        .await
        .unwrap();
    let ch = tenant.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            "only-in-root".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 404, "no queue 'only-in-root' in vhost 'tenant'");
    drop(tenant);

    // Deleting the vhost closes its connections with 320.
    let mut c = RawClient::open_with(broker.addr, &[], "tenant").await;
    b.delete_vhost("tenant").await.unwrap();
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 320);
            assert!(
                close.reply_text.contains("vhost 'tenant' is deleted"),
                "{}",
                close.reply_text
            );
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_logins_are_refused_cleanly() {
    let broker = TestBroker::start().await;
    // A 64 KiB user name: the start-ok frame is over the pre-tune frame limit.
    let mut c = RawClient::connect(broker.addr).await;
    c.send_raw(&PROTOCOL_HEADER).await;
    assert!(matches!(c.method().await, Some(Method::ConnectionStart(_))));
    let mut response = vec![0u8];
    response.extend(std::iter::repeat_n(b'u', 64 * 1024));
    response.extend_from_slice(b"\0pass");
    c.send(
        0,
        ConnectionStartOk {
            client_properties: Default::default(),
            mechanism: ShortStr::from_static("PLAIN"),
            response: response.into(),
            locale: ShortStr::from_static("en_US"),
        }
        .into(),
    )
    .await;
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 501, "{}", close.reply_text)
        }
        None => {}
        other => panic!("{other:?}"),
    }
    // Invalid UTF-8 and garbage responses.
    for response in [&b"\0\xff\xfe\0\xff"[..], b"garbage", b""] {
        let mut c = RawClient::connect(broker.addr).await;
        c.send_raw(&PROTOCOL_HEADER).await;
        assert!(matches!(c.method().await, Some(Method::ConnectionStart(_))));
        c.send(
            0,
            ConnectionStartOk {
                client_properties: Default::default(),
                mechanism: ShortStr::from_static("PLAIN"),
                response: bytes::Bytes::copy_from_slice(response),
                locale: ShortStr::from_static("en_US"),
            }
            .into(),
        )
        .await;
        match c.method().await {
            Some(Method::ConnectionClose(close)) => assert_eq!(close.reply_code, 403),
            None => {}
            other => panic!("{other:?}"),
        }
    }
    // The broker still serves.
    let conn = broker.connect().await;
    channel_with_queue(&conn, "alive").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_and_permissions_survive_a_restart() {
    let mut broker = TestBroker::start().await;
    let dir = broker.keep_dir();
    let b = broker.broker();
    b.add_vhost("tenant").await.unwrap();
    b.add_user("bob", Some("b0b"), &["monitoring"])
        .await
        .unwrap();
    b.set_permissions("bob", "tenant", "^bob-", ".*", ".*")
        .await
        .unwrap();
    b.set_topic_permissions("bob", "tenant", "amq.topic", "^bob\\.", ".*")
        .await
        .unwrap();
    broker.stop().await;

    let broker = TestBroker::start_in(dir.path()).await;
    let b = broker.broker();
    assert_eq!(b.auth.user("bob").unwrap().tags, ["monitoring"]);
    let bob = connect_as(&broker, "bob", "b0b", "tenant").await.unwrap();
    let ch = bob.create_channel().await.unwrap();
    ch.queue_declare(
        "bob-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let r = ch
        .queue_declare(
            "other".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(
        r,
        403,
        "configure access to queue 'other' in vhost 'tenant'",
    );
    let ch = bob.create_channel().await.unwrap();
    ch.basic_publish(
        "amq.topic".into(),
        "alice.x".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    warren_tests::assert_closed_by_broker(Ok(()), &ch, 403, "write access to topic 'alice.x'")
        .await;
    // guest still has only '/'.
    assert!(
        connect_as(&broker, "guest", "guest", "tenant")
            .await
            .is_err()
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_vhost_limits_scope_one_tenant() {
    let mut broker = TestBroker::start().await;
    let dir = broker.keep_dir();
    let b = broker.broker();
    b.add_vhost("small").await.unwrap();
    b.set_permissions("guest", "small", ".*", ".*", ".*")
        .await
        .unwrap();
    let limits = server::vhost::VhostLimits {
        max_connections: Some(1),
        max_queues: Some(1),
    };
    b.set_vhost_limits("small", limits).await.unwrap();

    let first = connect_as(&broker, "guest", "guest", "small")
        .await
        .unwrap();
    let e = connect_as(&broker, "guest", "guest", "small")
        .await
        .expect_err("over the vhost's connection limit");
    if let Some((code, text)) = warren_tests::amqp_error(&e) {
        assert_eq!(code, 530);
        assert!(text.contains("connection limit (1) is reached"), "{text}");
    }
    // Other vhosts are not affected.
    let _root = broker.connect().await;
    let ch = channel_with_queue(&first, "one").await;
    let r = ch
        .queue_declare(
            "two".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(
        r,
        406,
        "cannot declare queue 'two': queue limit in vhost 'small' (1) is reached",
    );
    drop(first);
    broker.stop().await;

    // Limits are kept across a restart.
    let broker = TestBroker::start_in(dir.path()).await;
    assert_eq!(
        *broker.broker().vhost("small").unwrap().limits.lock(),
        limits
    );
    broker.stop().await;
}

/// The `impersonator` tag lets a user publish with another `user-id`
/// (RabbitMQ's validated user-id makes that exception); without it, 406.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonators_may_publish_with_another_user_id() {
    let broker = TestBroker::start().await;
    let b = broker.broker();
    b.add_user("imp", Some("imp"), &["impersonator"])
        .await
        .unwrap();
    b.set_permissions("imp", "/", ".*", ".*", ".*")
        .await
        .unwrap();
    let imp = connect_as(&broker, "imp", "imp", "/").await.unwrap();
    let ch = channel_with_queue(&imp, "q").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"on behalf of bob",
            lapin::BasicProperties::default().with_user_id("bob".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let got = ch
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message was enqueued");
    assert_eq!(
        got.delivery
            .properties
            .user_id()
            .as_ref()
            .map(|u| u.as_str()),
        Some("bob")
    );
    broker.stop().await;
}

/// Listening on the IPv6 wildcard (the default, as RabbitMQ) takes IPv4
/// clients too, which arrive as `::ffff:127.0.0.1`: that is loopback for
/// guest, as is `::1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_over_ipv4_on_a_dual_stack_listener_is_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| {
        c.bind = std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    })
    .await;
    let port = broker.addr.port();
    let mut urls = vec![format!("amqp://guest:guest@127.0.0.1:{port}/%2f")];
    // (A host without IPv6 listens on IPv4 alone.)
    if broker.addr.is_ipv6() {
        urls.push(format!("amqp://guest:guest@[::1]:{port}/%2f"));
    }
    for url in urls {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        channel_with_queue(&conn, "q").await;
    }
    broker.stop().await;
}
