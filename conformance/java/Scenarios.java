// Warren conformance scenarios driven through the RabbitMQ Java client.
//
// Usage: java -cp <amqp-client.jar:slf4j...:classes> Scenarios --port N [--host H] [--product Warren]
//            [--alarm-port N] [--timeout-port N] [--tls-port N --tls-dir DIR] [--only a,b]
//
// Every scenario opens its own connection(s), uses its own uniquely named entities
// and prints exactly one line: `PASS java.<name>` or `FAIL java.<name>: reason`
// (`SKIP java.<name>: reason` for connection_blocked / consumer_timeout / tls_* when
// the broker they need, --alarm-port / --timeout-port / --tls-port with --tls-dir,
// is not given).
// The expected behaviour is RabbitMQ 3.10's; a mismatch is a failure.
// Exit status: 0 if all passed, 1 otherwise.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.AuthenticationFailureException;
import com.rabbitmq.client.BlockedListener;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.DefaultSaslConfig;
import com.rabbitmq.client.Envelope;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.LongString;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.SaslConfig;
import com.rabbitmq.client.SaslMechanism;
import com.rabbitmq.client.ShutdownSignalException;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Base64;
import java.util.Collections;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ConcurrentSkipListSet;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import javax.net.ssl.KeyManager;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

public final class Scenarios {
    static final int SCENARIO_TIMEOUT_S = 30;
    static final String RUN = UUID.randomUUID().toString().substring(0, 8);

    static String host = "127.0.0.1";
    static int port = -1;
    static int alarmPort = -1;    // broker with a 256 KiB memory high watermark (connection_blocked)
    static int timeoutPort = -1;  // broker with a 300 ms consumer timeout (consumer_timeout)
    static int tlsPort = -1;      // AMQPS port of the broker using the --tls-dir PKI (tls_*)
    static String tlsDir = null;  // written by make_pki.sh
    static String product = "Warren";
    static final List<Connection> open = new CopyOnWriteArrayList<>();

    static final class Failure extends RuntimeException {
        private static final long serialVersionUID = 1L;
        Failure(String m) { super(m); }
    }

    interface Scenario { void run() throws Exception; }

    // ------------------------------------------------------------------ helpers

    static String name(String base) { return "java." + base + "." + RUN; }

    static void check(boolean cond, String msg) { if (!cond) throw new Failure(msg); }

    static void eq(Object actual, Object expected, String what) {
        Object a = norm(actual), e = norm(expected);
        if (!Objects.equals(a, e)) {
            String msg = what + ": expected " + e + ", got " + a;
            if (String.valueOf(a).equals(String.valueOf(e)) && a != null && e != null) {
                msg += " (" + a.getClass().getSimpleName() + " instead of " + e.getClass().getSimpleName() + ")";
            }
            throw new Failure(msg);
        }
    }

    /** LongString -> String and byte[] -> String, recursively, so values compare naturally. */
    static Object norm(Object v) {
        if (v instanceof LongString) return v.toString();
        if (v instanceof byte[]) return new String((byte[]) v, StandardCharsets.UTF_8);
        if (v instanceof List) {
            List<Object> out = new ArrayList<>();
            for (Object o : (List<?>) v) out.add(norm(o));
            return out;
        }
        if (v instanceof Map) {
            Map<String, Object> out = new LinkedHashMap<>();
            for (Map.Entry<?, ?> en : ((Map<?, ?>) v).entrySet()) out.put(en.getKey().toString(), norm(en.getValue()));
            return out;
        }
        return v;
    }

    static byte[] b(String s) { return s.getBytes(StandardCharsets.UTF_8); }

    static String s(byte[] bs) { return new String(bs, StandardCharsets.UTF_8); }

    static Connection connect() throws Exception { return connect(port); }

    static Connection connect(int brokerPort) throws Exception {
        ConnectionFactory f = new ConnectionFactory();
        f.setHost(host);
        f.setPort(brokerPort);
        f.setUsername("guest");
        f.setPassword("guest");
        f.setVirtualHost("/");
        f.setConnectionTimeout(5000);
        f.setHandshakeTimeout(5000);
        f.setAutomaticRecoveryEnabled(false);
        f.setTopologyRecoveryEnabled(false);
        Connection c = f.newConnection("warren-conformance");
        open.add(c);
        return c;
    }

    static final class Delivery {
        final String consumerTag;
        final Envelope envelope;
        final AMQP.BasicProperties props;
        final byte[] body;
        Delivery(String t, Envelope e, AMQP.BasicProperties p, byte[] b) { consumerTag = t; envelope = e; props = p; body = b; }
    }

    /** A consumer that hands every delivery to a queue the scenario thread reads
     *  (several consumers may share one queue; Delivery.consumerTag tells them apart). */
    static final class Collector extends DefaultConsumer {
        final LinkedBlockingQueue<Delivery> q;
        Collector(Channel ch) { this(ch, new LinkedBlockingQueue<>()); }
        Collector(Channel ch, LinkedBlockingQueue<Delivery> shared) { super(ch); q = shared; }
        @Override
        public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] body) {
            q.add(new Delivery(tag, env, props, body));
        }
        Delivery next(double timeoutS, String what) throws InterruptedException {
            Delivery d = q.poll((long) (timeoutS * 1000), TimeUnit.MILLISECONDS);
            if (d == null) throw new Failure("timed out after " + timeoutS + "s waiting for " + what);
            return d;
        }
    }

    static ShutdownSignalException shutdownCause(Throwable t) {
        for (Throwable c = t; c != null; c = c.getCause()) {
            if (c instanceof ShutdownSignalException) return (ShutdownSignalException) c;
        }
        return null;
    }

    static void expectChannelClose(Scenario op, int code, String text, String what) throws Exception {
        try {
            op.run();
        } catch (IOException | ShutdownSignalException e) {
            ShutdownSignalException sse = shutdownCause(e);
            check(sse != null, what + ": unexpected exception " + e);
            check(!sse.isHardError(), what + ": the broker closed the connection instead of the channel: " + sse.getReason());
            check(sse.getReason() instanceof AMQP.Channel.Close, what + ": reason is " + sse.getReason());
            AMQP.Channel.Close close = (AMQP.Channel.Close) sse.getReason();
            eq(close.getReplyCode(), code, what + ": reply code");
            eq(close.getReplyText(), text, what + ": reply text");
            return;
        }
        throw new Failure(what + ": channel was not closed by the broker");
    }

    static int messageCount(Channel ch, String q) throws IOException {
        return ch.queueDeclarePassive(q).getMessageCount();
    }

    // ---------------------------------------------------------------- scenarios

    static void s01Handshake() throws Exception {
        Connection c = connect();
        Map<String, Object> props = c.getServerProperties();
        eq(props.get("product"), product, "server_properties.product");
        Object caps = props.get("capabilities");
        check(caps instanceof Map, "capabilities is not a table: " + caps);
        eq(((Map<?, ?>) caps).get("publisher_confirms"), true, "capabilities.publisher_confirms");
        eq(((Map<?, ?>) caps).get("basic.nack"), true, "capabilities.basic.nack");
        Channel ch = c.createChannel();
        check(ch.isOpen(), "channel did not open");
        ch.close();
        c.close();
    }

    static void s02DeclareGetProperties() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        AMQP.Queue.DeclareOk ok = ch.queueDeclare("", false, true, false, null);
        String anon = ok.getQueue();
        check(anon.startsWith("amq.gen-"), "server-named queue " + anon + " does not start with amq.gen-");
        eq(Arrays.asList(ok.getMessageCount(), ok.getConsumerCount()), Arrays.asList(0, 0), "counts of new queue");
        String named = name("props");
        eq(ch.queueDeclare(named, false, false, false, null).getQueue(), named, "declare-ok queue name");

        Map<String, Object> headers = new HashMap<>();
        headers.put("s", "str");
        headers.put("i", 42);
        headers.put("b", true);
        AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                .contentType("application/json").headers(headers)
                .correlationId("corr-1").deliveryMode(2).build();
        for (String q : new String[] {anon, named}) {
            ch.basicPublish("", q, props, b("{\"k\": 1}"));
            ch.basicPublish("", q, null, b("second"));
        }
        for (String q : new String[] {anon, named}) {
            GetResponse r = ch.basicGet(q, true);
            check(r != null, "basic.get on " + q + " returned empty");
            eq(s(r.getBody()), "{\"k\": 1}", "body");
            eq(r.getEnvelope().getRoutingKey(), q, "get-ok routing key");
            eq(r.getEnvelope().getExchange(), "", "get-ok exchange");
            eq(r.getEnvelope().isRedeliver(), false, "get-ok redelivered");
            eq(r.getMessageCount(), 1, "get-ok message_count");
            AMQP.BasicProperties p = r.getProps();
            eq(p.getContentType(), "application/json", "content_type");
            Map<String, Object> h = p.getHeaders();
            check(h != null, "headers missing");
            eq(h, headers, "headers");
            check(h.get("i") instanceof Integer, "header i decoded as " + h.get("i").getClass().getName() + ", expected Integer (type I)");
            check(h.get("b") instanceof Boolean, "header b decoded as " + h.get("b").getClass().getName());
            eq(p.getCorrelationId(), "corr-1", "correlation_id");
            eq(p.getDeliveryMode(), 2, "delivery_mode");
            r = ch.basicGet(q, true);
            eq(s(r.getBody()), "second", "second body");
            eq(Arrays.asList(r.getProps().getContentType(), r.getProps().getHeaders(), r.getProps().getDeliveryMode()),
                    Arrays.asList(null, null, null), "properties of a bare message");
            eq(ch.basicGet(q, false), null, "basic.get on an empty queue");
        }
        ch.queueDelete(named);

        // the exclusive queue belongs to this connection only ...
        String locked = "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '" + anon
                + "' in vhost '/'. It could be originally declared on another connection or the exclusive"
                + " property value does not match that of the original declaration.";
        Connection other = connect();
        Channel o1 = other.createChannel();
        expectChannelClose(() -> o1.queueDeclarePassive(anon), 405, locked,
                "passive declare of another connection's exclusive queue");
        Channel o2 = other.createChannel();
        expectChannelClose(() -> o2.basicGet(anon, false), 405, locked,
                "basic.get from another connection's exclusive queue");
        // ... and is deleted when that connection closes
        c.close();
        Channel o3 = other.createChannel();
        expectChannelClose(() -> o3.queueDeclarePassive(anon), 404,
                "NOT_FOUND - no queue '" + anon + "' in vhost '/'", "exclusive queue after its connection closed");
        other.close();
    }

    static void s03ConsumePrefetchAck() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String q = name("consume");
        ch.queueDeclare(q, false, false, false, null);
        int n = 1000;
        for (int i = 0; i < n; i++) ch.basicPublish("", q, null, b("m" + i));
        ch.basicQos(10);
        Collector col = new Collector(ch);
        String tag = ch.basicConsume(q, false, col);
        List<Delivery> got = new ArrayList<>();
        for (int i = 0; i < 10; i++) got.add(col.next(5, "the first 10 deliveries"));
        // prefetch 10: nothing more may arrive while 10 are unacknowledged
        Delivery extra = col.q.poll(300, TimeUnit.MILLISECONDS);
        check(extra == null, "an 11th delivery arrived with prefetch 10 and no acks");
        ch.basicAck(got.get(9).envelope.getDeliveryTag(), true);
        for (int i = 10; i < n; i++) {
            got.add(col.next(5, "delivery " + i + " of " + n));
            if ((i + 1) % 10 == 0) ch.basicAck(got.get(i).envelope.getDeliveryTag(), true);
        }
        for (int i = 0; i < n; i++) {
            Delivery d = got.get(i);
            eq(s(d.body), "m" + i, "body of delivery " + i + " (publish order)");
            eq(d.envelope.getDeliveryTag(), (long) (i + 1), "delivery tag " + i);
            eq(d.envelope.isRedeliver(), false, "redelivered flag of a first delivery");
        }
        ch.basicCancel(tag);
        eq(messageCount(ch, q), 0, "message_count after acking everything");
        ch.queueDelete(q);
        c.close();
    }

    static void s04PublisherConfirms() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String q = name("confirms");
        ch.queueDeclare(q, true, false, false, null);
        ch.confirmSelect();
        Set<Long> acked = new ConcurrentSkipListSet<>();
        List<Long> nacked = new CopyOnWriteArrayList<>();
        ch.addConfirmListener(new com.rabbitmq.client.ConfirmListener() {
            public void handleAck(long tag, boolean multiple) {
                if (multiple) { for (long t = 1; t <= tag; t++) acked.add(t); } else acked.add(tag);
            }
            public void handleNack(long tag, boolean multiple) { nacked.add(tag); }
        });
        for (int i = 0; i < 500; i++) {
            ch.basicPublish("", q, true, MessageProperties.PERSISTENT_BASIC, b("c" + i));
        }
        eq(ch.getNextPublishSeqNo(), 501L, "next publish sequence number");
        ch.waitForConfirmsOrDie(10_000);
        check(nacked.isEmpty(), "broker nacked " + nacked);
        eq(acked.size(), 500, "distinct delivery tags confirmed");
        check(acked.contains(1L) && acked.contains(500L), "confirms do not cover tags 1..500");
        eq(messageCount(ch, q), 500, "message_count after 500 confirmed publishes");
        ch.queueDelete(q);
        c.close();
    }

    static void s05MandatoryReturn() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        LinkedBlockingQueue<Object[]> returned = new LinkedBlockingQueue<>();
        ch.addReturnListener((code, text, exchange, key, props, body) ->
                returned.add(new Object[] {code, text, exchange, key, props, body}));
        String key = name("nowhere");
        ch.basicPublish("", key, true, new AMQP.BasicProperties.Builder().correlationId("r1").build(), b("lost"));
        Object[] r = returned.poll(5, TimeUnit.SECONDS);
        check(r != null, "no basic.return within 5s");
        eq(r[0], 312, "basic.return reply_code");
        eq(r[1], "NO_ROUTE", "basic.return reply_text");
        eq(r[2], "", "basic.return exchange");
        eq(r[3], key, "basic.return routing_key");
        eq(((AMQP.BasicProperties) r[4]).getCorrelationId(), "r1", "returned correlation_id");
        eq(s((byte[]) r[5]), "lost", "returned body");
        // non-mandatory unroutable: silently dropped
        ch.basicPublish("", key, false, null, b("dropped"));
        check(returned.poll(200, TimeUnit.MILLISECONDS) == null, "a non-mandatory unroutable publish was returned");
        // confirm mode: the return precedes the ack, and the message is still acked
        Channel ch2 = c.createChannel();
        LinkedBlockingQueue<Integer> returned2 = new LinkedBlockingQueue<>();
        ch2.addReturnListener((code, text, exchange, k, props, body) -> returned2.add(code));
        ch2.confirmSelect();
        ch2.basicPublish("amq.direct", key, true, null, b("lost2"));
        ch2.waitForConfirmsOrDie(5000);
        eq(returned2.poll(), 312, "confirm-mode return received before the ack");
        c.close();
    }

    static List<String> drain(Channel ch, String q, String ex) throws IOException {
        List<String> out = new ArrayList<>();
        for (GetResponse r; (r = ch.basicGet(q, true)) != null; ) {
            eq(r.getEnvelope().getExchange(), ex, "get-ok exchange");
            eq(r.getEnvelope().getRoutingKey(), s(r.getBody()), "get-ok routing key");
            out.add(s(r.getBody()));
        }
        return out;
    }

    static void s06TopicRouting() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String ex = name("topic"), qa = name("topic-a"), qb = name("topic-b");
        ch.exchangeDeclare(ex, "topic");
        ch.queueDeclare(qa, false, false, false, null);
        ch.queueDeclare(qb, false, false, false, null);
        ch.queueBind(qa, ex, "a.*.c");
        ch.queueBind(qb, ex, "a.#");
        for (String k : new String[] {"a.b.c", "a.x", "z"}) ch.basicPublish(ex, k, null, b(k));
        eq(drain(ch, qa, ex), Arrays.asList("a.b.c"), "messages in queue bound with a.*.c");
        eq(drain(ch, qb, ex), Arrays.asList("a.b.c", "a.x"), "messages in queue bound with a.#");
        ch.queueDelete(qa);
        ch.queueDelete(qb);
        ch.exchangeDelete(ex);
        c.close();
    }

    static void s07NackRejectDlx() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String dlx = name("dlx"), dlq = name("dlq"), q = name("work");
        ch.exchangeDeclare(dlx, "fanout");
        ch.queueDeclare(dlq, false, false, false, null);
        ch.queueBind(dlq, dlx, "");
        Map<String, Object> args = new HashMap<>();
        args.put("x-dead-letter-exchange", dlx);
        ch.queueDeclare(q, false, false, false, args);
        Map<String, Object> h0 = new HashMap<>();
        h0.put("orig", "yes");
        ch.basicPublish("", q, new AMQP.BasicProperties.Builder().headers(h0).build(), b("n1"));
        Collector col = new Collector(ch);
        String tag = ch.basicConsume(q, false, col);
        Delivery d1 = col.next(5, "first delivery");
        eq(d1.envelope.isRedeliver(), false, "first delivery redelivered flag");
        ch.basicNack(d1.envelope.getDeliveryTag(), false, true);
        Delivery d2 = col.next(5, "redelivery after nack requeue=true");
        eq(s(d2.body), "n1", "redelivered body");
        eq(d2.envelope.isRedeliver(), true, "redelivered flag after nack requeue=true");
        ch.basicReject(d2.envelope.getDeliveryTag(), false);
        Collector dead = new Collector(ch);
        String dtag = ch.basicConsume(dlq, false, dead);
        Delivery dd = dead.next(5, "dead-lettered message in the DLX queue");
        check(col.q.poll(100, TimeUnit.MILLISECONDS) == null, "reject requeue=false requeued the message");
        eq(s(dd.body), "n1", "dead-lettered body");
        eq(dd.envelope.getExchange(), dlx, "dead-lettered message exchange");
        eq(dd.envelope.getRoutingKey(), q, "dead-lettered message routing key");
        Map<String, Object> h = dd.props.getHeaders();
        check(h != null, "dead-lettered message has no headers");
        eq(h.get("orig"), "yes", "original header kept");
        Object xd = h.get("x-death");
        check(xd instanceof List && ((List<?>) xd).size() == 1, "x-death should be a one-entry array, got " + norm(xd));
        Map<?, ?> e = (Map<?, ?>) ((List<?>) xd).get(0);
        eq(e.get("reason"), "rejected", "x-death reason");
        eq(e.get("queue"), q, "x-death queue");
        eq(e.get("count"), 1L, "x-death count");
        eq(e.get("exchange"), "", "x-death exchange");
        eq(e.get("routing-keys"), Arrays.asList(q), "x-death routing-keys");
        check(e.get("time") instanceof java.util.Date, "x-death time is not a timestamp: " + norm(e.get("time")));
        eq(h.get("x-first-death-reason"), "rejected", "x-first-death-reason");
        eq(h.get("x-first-death-queue"), q, "x-first-death-queue");
        eq(h.get("x-first-death-exchange"), "", "x-first-death-exchange");
        ch.basicAck(dd.envelope.getDeliveryTag(), false);
        ch.basicCancel(tag);
        ch.basicCancel(dtag);
        eq(messageCount(ch, q), 0, "work queue left empty");
        ch.queueDelete(q);
        ch.queueDelete(dlq);
        ch.exchangeDelete(dlx);
        c.close();
    }

    static void s08Transactions() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String q = name("tx");
        ch.queueDeclare(q, false, false, false, null);
        ch.txSelect();
        ch.basicPublish("", q, null, b("t1"));
        eq(messageCount(ch, q), 0, "message_count before commit");
        ch.txRollback();
        eq(messageCount(ch, q), 0, "message_count after rollback");
        ch.basicPublish("", q, null, b("t2"));
        ch.txCommit();
        eq(messageCount(ch, q), 1, "message_count after commit");
        GetResponse r = ch.basicGet(q, true);
        check(r != null, "committed message missing");
        eq(s(r.getBody()), "t2", "committed body");
        eq(ch.basicGet(q, true), null, "a second message after rollback+commit");
        ch.txCommit();
        ch.queueDelete(q);
        c.close();
    }

    static void s09Errors() throws Exception {
        Connection c = connect();
        String missing = name("missing");
        Channel ch1 = c.createChannel();
        expectChannelClose(() -> ch1.queueDeclarePassive(missing),
                404, "NOT_FOUND - no queue '" + missing + "' in vhost '/'", "passive declare of a missing queue");
        check(!ch1.isOpen(), "channel still open after 404");
        check(c.isOpen(), "connection closed after a channel error");

        Channel ch2 = c.createChannel();
        ch2.basicPublish("nope", "rk", null, b("x"));
        // the close is asynchronous; the next synchronous call observes it
        expectChannelClose(() -> ch2.queueDeclare(name("after-publish"), false, false, false, null),
                404, "NOT_FOUND - no exchange 'nope' in vhost '/'", "publish to missing exchange");

        Channel ch3 = c.createChannel();
        String q = name("durable-diff");
        ch3.queueDeclare(q, false, false, false, null);
        expectChannelClose(() -> ch3.queueDeclare(q, true, false, false, null),
                406, "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '" + q
                        + "' in vhost '/': received 'true' but current is 'false'",
                "redeclare with different durable");

        Channel ch4 = c.createChannel();
        eq(ch4.queueDeclarePassive(q).getQueue(), q, "connection usable after channel errors");
        ch4.queueDelete(q);
        c.close();
    }

    static void s10TtlDeadLetter() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String q = name("ttl"), dlq = name("ttl-dlq");
        ch.queueDeclare(dlq, false, false, false, null);
        Map<String, Object> args = new HashMap<>();
        args.put("x-message-ttl", 100);
        args.put("x-dead-letter-exchange", "");
        args.put("x-dead-letter-routing-key", dlq);
        ch.queueDeclare(q, false, false, false, args);
        long t0 = System.nanoTime();
        ch.basicPublish("", q, null, b("ephemeral"));
        Collector dead = new Collector(ch);
        String tag = ch.basicConsume(dlq, false, dead);
        Delivery d = dead.next(5, "expired message in the dead-letter queue");
        double elapsed = (System.nanoTime() - t0) / 1e9;
        check(elapsed >= 0.09, String.format("dead-lettered after %.3fs, before the 100 ms TTL", elapsed));
        eq(s(d.body), "ephemeral", "expired body");
        eq(d.envelope.getRoutingKey(), dlq, "dead-letter routing key");
        Map<String, Object> h = d.props.getHeaders();
        Object xd = h == null ? null : h.get("x-death");
        check(xd instanceof List && ((List<?>) xd).size() == 1, "x-death should be a one-entry array, got " + norm(xd));
        Map<?, ?> e = (Map<?, ?>) ((List<?>) xd).get(0);
        eq(e.get("reason"), "expired", "x-death reason");
        eq(e.get("queue"), q, "x-death queue");
        eq(e.get("routing-keys"), Arrays.asList(q), "x-death routing-keys");
        eq(e.get("exchange"), "", "x-death exchange");
        eq(e.get("count"), 1L, "x-death count");
        eq(h.get("x-first-death-reason"), "expired", "x-first-death-reason");
        ch.basicAck(d.envelope.getDeliveryTag(), false);
        ch.basicCancel(tag);
        eq(messageCount(ch, q), 0, "TTL queue left empty");
        ch.queueDelete(q);
        ch.queueDelete(dlq);
        c.close();
    }

    static Map<String, Object> args(Object... kv) {
        Map<String, Object> m = new HashMap<>();
        for (int i = 0; i < kv.length; i += 2) m.put((String) kv[i], kv[i + 1]);
        return m;
    }

    static List<String> bodiesOf(List<Delivery> ds) {
        List<String> out = new ArrayList<>();
        for (Delivery d : ds) out.add(s(d.body));
        return out;
    }

    /** Takes `n` deliveries from `q` (bounded) and splits their bodies by consumer tag. */
    static Map<String, List<Delivery>> byConsumer(LinkedBlockingQueue<Delivery> q, int n, String what) throws InterruptedException {
        Map<String, List<Delivery>> out = new HashMap<>();
        long deadline = System.nanoTime() + 5_000_000_000L;
        for (int i = 0; i < n; i++) {
            Delivery d = q.poll(Math.max(0, deadline - System.nanoTime()), TimeUnit.NANOSECONDS);
            if (d == null) throw new Failure("timed out after 5s waiting for " + what + " (got " + i + " of " + n + ")");
            out.computeIfAbsent(d.consumerTag, k -> new ArrayList<>()).add(d);
        }
        return out;
    }

    static void s11ConsumerPriorities() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String q = name("priorities");
        ch.queueDeclare(q, false, false, false, null);
        // the low-priority consumer registers first, so plain round-robin would
        // hand it the first message
        LinkedBlockingQueue<Delivery> all = new LinkedBlockingQueue<>();
        Channel lowCh = c.createChannel(), highCh = c.createChannel();
        String lowTag = lowCh.basicConsume(q, false, args("x-priority", 1), new Collector(lowCh, all));
        highCh.basicQos(2, false);  // per consumer
        String highTag = highCh.basicConsume(q, false, args("x-priority", 10), new Collector(highCh, all));
        for (int i = 0; i < 5; i++) ch.basicPublish("", q, null, b("p" + i));
        Map<String, List<Delivery>> got = byConsumer(all, 5, "5 deliveries");
        check(all.poll(200, TimeUnit.MILLISECONDS) == null, "a 6th delivery arrived for 5 messages");
        List<Delivery> high = got.getOrDefault(highTag, new ArrayList<>()), low = got.getOrDefault(lowTag, new ArrayList<>());
        eq(bodiesOf(high), Arrays.asList("p0", "p1"), "messages to the x-priority 10 consumer (prefetch 2, unacked)");
        eq(bodiesOf(low), Arrays.asList("p2", "p3", "p4"), "messages to the x-priority 1 consumer");
        lowCh.basicAck(low.get(2).envelope.getDeliveryTag(), true);
        highCh.basicAck(high.get(1).envelope.getDeliveryTag(), true);
        lowCh.basicCancel(lowTag);
        highCh.basicCancel(highTag);
        eq(messageCount(ch, q), 0, "queue left empty");
        ch.queueDelete(q);
        c.close();
    }

    static void s12SingleActiveConsumer() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String q = name("sac");
        ch.queueDeclare(q, false, false, false, args("x-single-active-consumer", true));
        LinkedBlockingQueue<Delivery> all = new LinkedBlockingQueue<>();
        Channel ch1 = c.createChannel(), ch2 = c.createChannel();
        String tag1 = ch1.basicConsume(q, false, new Collector(ch1, all));
        String tag2 = ch2.basicConsume(q, false, new Collector(ch2, all));
        for (int i = 0; i < 4; i++) ch.basicPublish("", q, null, b("s" + i));
        Map<String, List<Delivery>> got = byConsumer(all, 4, "4 deliveries");
        check(all.poll(200, TimeUnit.MILLISECONDS) == null, "a 5th delivery arrived for 4 messages");
        eq(bodiesOf(got.getOrDefault(tag2, new ArrayList<>())), Arrays.asList(), "messages to the second consumer while the first is active");
        List<Delivery> first = got.get(tag1);
        eq(bodiesOf(first), Arrays.asList("s0", "s1", "s2", "s3"), "messages to the active consumer");
        for (Delivery d : first) eq(d.envelope.isRedeliver(), false, "redelivered flag of a first delivery");
        ch1.basicAck(first.get(0).envelope.getDeliveryTag(), false);
        ch1.close();  // s1..s3 unacked: requeued, and the second consumer becomes active
        List<Delivery> second = byConsumer(all, 3, "3 deliveries after the first consumer's channel closed").get(tag2);
        check(all.poll(200, TimeUnit.MILLISECONDS) == null, "more than 3 deliveries after the first consumer's channel closed");
        eq(bodiesOf(second), Arrays.asList("s1", "s2", "s3"), "messages to the second consumer (the unacked ones, in order)");
        for (Delivery d : second) eq(d.envelope.isRedeliver(), true, "redelivered flag of a handed-over message");
        ch2.basicAck(second.get(2).envelope.getDeliveryTag(), true);
        ch2.basicCancel(tag2);
        eq(messageCount(ch, q), 0, "queue left empty");
        ch.queueDelete(q);
        c.close();
    }

    static final String REPLY_TO = "amq.rabbitmq.reply-to";

    static void s13DirectReplyTo() throws Exception {
        Connection client = connect();
        Channel ch = client.createChannel();
        String q = name("rpc");
        ch.queueDeclare(q, false, false, false, null);
        Collector replies = new Collector(ch);
        String rtag = ch.basicConsume(REPLY_TO, true, replies);
        ch.confirmSelect();  // the confirm tells when the request is in the queue
        ch.basicPublish("", q, new AMQP.BasicProperties.Builder().replyTo(REPLY_TO).correlationId("rpc-1").build(), b("request"));
        ch.waitForConfirmsOrDie(5000);

        Connection server = connect();
        Channel sch = server.createChannel();
        GetResponse r = sch.basicGet(q, true);
        check(r != null, "basic.get of the request returned empty");
        eq(s(r.getBody()), "request", "request body");
        eq(r.getProps().getCorrelationId(), "rpc-1", "request correlation_id");
        String replyTo = r.getProps().getReplyTo();
        check(replyTo != null && replyTo.startsWith(REPLY_TO + ".") && replyTo.length() > REPLY_TO.length() + 1,
                "reply_to was not rewritten to " + REPLY_TO + ".<token>: " + replyTo);
        sch.basicPublish("", replyTo, new AMQP.BasicProperties.Builder().correlationId("rpc-1").build(), b("reply"));
        Delivery d = replies.next(5, "the reply on the direct reply-to consumer");
        eq(s(d.body), "reply", "reply body");
        eq(d.props.getCorrelationId(), "rpc-1", "reply correlation_id");
        eq(d.consumerTag, rtag, "reply consumer tag");
        eq(d.envelope.getExchange(), "", "reply exchange");
        eq(d.envelope.getRoutingKey(), replyTo, "reply routing key");
        eq(d.envelope.isRedeliver(), false, "reply redelivered flag");
        ch.queueDelete(q);

        // the pseudo-queue only supports no-ack consumers
        Channel ch2 = client.createChannel();
        expectChannelClose(() -> ch2.basicConsume(REPLY_TO, false, new DefaultConsumer(ch2)),
                406, "PRECONDITION_FAILED - reply consumer cannot acknowledge",
                "manual-ack consumer on amq.rabbitmq.reply-to");
        check(client.isOpen(), "connection closed after the channel error");
        server.close();
        client.close();
    }

    static void s14DeliveryCount() throws Exception {
        Connection c = connect();
        Channel ch = c.createChannel();
        String q = name("delivery-count");
        // RabbitMQ 3.10 sets x-delivery-count on quorum queues (not classic ones)
        ch.queueDeclare(q, true, false, false, args("x-queue-type", "quorum"));
        ch.basicPublish("", q, new AMQP.BasicProperties.Builder().headers(args("orig", "yes")).build(), b("d1"));
        Collector col = new Collector(ch);
        String tag = ch.basicConsume(q, false, col);
        Delivery d1 = col.next(5, "first delivery");
        eq(d1.envelope.isRedeliver(), false, "first delivery redelivered flag");
        eq(d1.props.getHeaders(), args("orig", "yes"), "headers of the first delivery (no x-delivery-count)");
        ch.basicNack(d1.envelope.getDeliveryTag(), false, true);
        Delivery d2 = col.next(5, "redelivery after nack requeue=true");
        eq(s(d2.body), "d1", "redelivered body");
        eq(d2.envelope.isRedeliver(), true, "redelivered flag after nack requeue=true");
        Map<String, Object> h = d2.props.getHeaders();
        check(h != null, "the redelivery has no headers");
        eq(h.get("x-delivery-count"), 1L, "x-delivery-count of the redelivery");
        eq(h.get("orig"), "yes", "original header kept");
        ch.basicAck(d2.envelope.getDeliveryTag(), false);
        ch.basicCancel(tag);
        eq(messageCount(ch, q), 0, "queue left empty");
        ch.queueDelete(q);
        c.close();
    }

    static final int BLOCKED_N = 2000;       // messages published in connection_blocked
    static final int BLOCKED_SIZE = 1024;    // body size; the alarm broker's watermark is 256 KiB

    static byte[] blockedBody(int i) {
        byte[] body = new byte[BLOCKED_SIZE];
        Arrays.fill(body, (byte) '.');
        byte[] head = b(String.format("%06d", i));
        System.arraycopy(head, 0, body, 0, head.length);
        return body;
    }

    static void s15ConnectionBlocked() throws Exception {
        String q = name("blocked");
        boolean done = false;
        ExecutorService publisher = Executors.newSingleThreadExecutor(r -> {
            Thread t = new Thread(r, "java-publisher");
            t.setDaemon(true);
            return t;
        });
        try {
            Connection drainConn = connect(alarmPort);
            Channel dch = drainConn.createChannel();
            dch.queueDeclare(q, false, false, false, null);

            Connection pubConn = connect(alarmPort);  // advertises connection.blocked by default
            ConcurrentSkipListSet<Long> outstanding = new ConcurrentSkipListSet<>();
            for (long t = 1; t <= BLOCKED_N; t++) outstanding.add(t);
            List<Long> nacked = new CopyOnWriteArrayList<>();
            List<Long> duplicates = new CopyOnWriteArrayList<>();
            List<String> events = Collections.synchronizedList(new ArrayList<>());  // notified on change
            List<String> reasons = new CopyOnWriteArrayList<>();
            List<Integer> confirmedAtBlock = new CopyOnWriteArrayList<>();
            CountDownLatch blocked = new CountDownLatch(1);
            pubConn.addBlockedListener(new BlockedListener() {
                public void handleBlocked(String reason) {
                    reasons.add(reason);
                    confirmedAtBlock.add(BLOCKED_N - outstanding.size());
                    synchronized (events) { events.add("blocked"); events.notifyAll(); }
                    blocked.countDown();
                }
                public void handleUnblocked() {
                    synchronized (events) { events.add("unblocked"); events.notifyAll(); }
                }
            });
            Channel pch = pubConn.createChannel();
            pch.confirmSelect();
            pch.addConfirmListener(new com.rabbitmq.client.ConfirmListener() {
                void settle(long tag, boolean multiple, boolean nack) {
                    List<Long> tags = new ArrayList<>();
                    if (multiple) tags.addAll(outstanding.headSet(tag, true));
                    else if (outstanding.contains(tag)) tags.add(tag);
                    if (tags.isEmpty()) duplicates.add(tag);
                    if (nack) nacked.addAll(tags);
                    outstanding.removeAll(tags);
                }
                public void handleAck(long tag, boolean multiple) { settle(tag, multiple, false); }
                public void handleNack(long tag, boolean multiple) { settle(tag, multiple, true); }
            });
            // publish from another thread: once the broker stops reading, writes block
            Future<?> publishing = publisher.submit(() -> {
                for (int i = 0; i < BLOCKED_N; i++) pch.basicPublish("", q, null, blockedBody(i));
                return null;
            });
            // nobody consumes yet: the broker must block the publishing connection
            check(blocked.await(10, TimeUnit.SECONDS), "no connection.blocked within 10s ("
                    + (BLOCKED_N - outstanding.size()) + " of " + BLOCKED_N + " confirmed)");

            // drain from another connection until every message has arrived
            Collector col = new Collector(dch);
            String tag = dch.basicConsume(q, true, col);
            long deadline = System.nanoTime() + 20_000_000_000L;
            for (int i = 0; i < BLOCKED_N; i++) {
                Delivery d = col.q.poll(Math.max(0, deadline - System.nanoTime()), TimeUnit.NANOSECONDS);
                if (d == null) {
                    throw new Failure("drained only " + i + " of " + BLOCKED_N + " messages within 20s ("
                            + (BLOCKED_N - outstanding.size()) + " confirmed, events " + events + ")");
                }
                check(Arrays.equals(d.body, blockedBody(i)), "drained message " + i + " is not the " + i + "th published");
            }
            publishing.get(10, TimeUnit.SECONDS);
            check(pch.waitForConfirms(10_000), "broker nacked publishes " + nacked);
            // the connection must end up unblocked
            synchronized (events) {
                long until = System.nanoTime() + 5_000_000_000L;
                while (events.isEmpty() || !events.get(events.size() - 1).equals("unblocked")) {
                    long left = until - System.nanoTime();
                    if (left <= 0) throw new Failure("no connection.unblocked within 5s after draining; events " + events);
                    TimeUnit.NANOSECONDS.timedWait(events, left);
                }
                for (int i = 0; i < events.size(); i++) {
                    eq(events.get(i), i % 2 == 0 ? "blocked" : "unblocked", "notification " + i + " of " + events);
                }
            }
            check(col.q.poll(100, TimeUnit.MILLISECONDS) == null, "more messages drained than published");
            eq(nacked, Arrays.asList(), "nacked publishes");
            eq(duplicates, Arrays.asList(), "confirms for already-confirmed tags");
            eq(BLOCKED_N - outstanding.size(), BLOCKED_N, "confirmed publishes");
            eq(new HashSet<>(reasons), new HashSet<>(Arrays.asList("low on memory")), "connection.blocked reason");
            check(confirmedAtBlock.get(0) < BLOCKED_N, "the connection was blocked only after every publish was confirmed");
            dch.basicCancel(tag);
            eq(messageCount(dch, q), 0, "queue left empty");
            dch.queueDelete(q);
            pubConn.close();
            drainConn.close();
            done = true;
        } finally {
            publisher.shutdownNow();
            if (!done) {
                // free the broker's memory so later scenarios are not blocked
                try {
                    Connection c = connect(alarmPort);
                    c.createChannel().queueDelete(q);
                    c.close();
                } catch (Exception ignored) { }
            }
        }
    }

    static final int CONSUMER_TIMEOUT_MS = 300;  // the timeout broker's --consumer-timeout

    static void s16ConsumerTimeout() throws Exception {
        Connection c = connect(timeoutPort);
        Channel ch = c.createChannel();
        String q = name("consumer-timeout");
        ch.queueDeclare(q, false, false, false, null);
        ch.basicPublish("", q, null, b("slow"));
        LinkedBlockingQueue<Object[]> closes = new LinkedBlockingQueue<>();
        ch.addShutdownListener(sse -> closes.add(new Object[] {System.nanoTime(), sse}));
        Collector col = new Collector(ch);
        long t0 = System.nanoTime();
        ch.basicConsume(q, false, col);
        Delivery d = col.next(5, "the delivery");
        eq(s(d.body), "slow", "delivered body");
        Object[] closed = closes.poll(5, TimeUnit.SECONDS);
        check(closed != null, "timed out after 5s waiting for the channel close for the unacknowledged delivery");
        double elapsed = ((Long) closed[0] - t0) / 1e9;
        ShutdownSignalException sse = (ShutdownSignalException) closed[1];
        check(!sse.isInitiatedByApplication(), "channel closed by the client: " + sse);
        check(!sse.isHardError(), "the broker closed the connection instead of the channel: " + sse.getReason());
        check(sse.getReason() instanceof AMQP.Channel.Close, "reason is " + sse.getReason());
        AMQP.Channel.Close close = (AMQP.Channel.Close) sse.getReason();
        eq(close.getReplyCode(), 406, "consumer timeout reply code");
        eq(close.getReplyText(), "PRECONDITION_FAILED - delivery acknowledgement on channel " + ch.getChannelNumber()
                + " timed out. Timeout value used: " + CONSUMER_TIMEOUT_MS + " ms. This timeout value can be configured,"
                + " see consumers doc guide to learn more", "consumer timeout reply text");
        check(elapsed >= CONSUMER_TIMEOUT_MS / 1000.0 - 0.01, String.format(
                "channel closed %.3fs after basic.consume, before the %d ms timeout", elapsed, CONSUMER_TIMEOUT_MS));
        check(c.isOpen(), "connection closed after the channel error");
        // the unacknowledged message goes back to the queue
        Channel ch2 = c.createChannel();
        long deadline = System.nanoTime() + 5_000_000_000L;
        int count;
        while ((count = messageCount(ch2, q)) != 1 && System.nanoTime() < deadline) Thread.sleep(20);
        eq(count, 1, "messages in the queue after the consumer timeout");
        GetResponse r = ch2.basicGet(q, true);
        eq(s(r.getBody()), "slow", "requeued body");
        eq(r.getEnvelope().isRedeliver(), true, "requeued message redelivered flag");
        ch2.queueDelete(q);
        c.close();
    }

    // ---------------------------------------------------------------------- TLS
    // The tls broker (--tls-port) uses the PKI make_pki.sh wrote to --tls-dir.

    static final String EXTERNAL_REFUSED = "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL."
            + " For details see the broker logfile.";

    static X509Certificate pemCert(String file) throws Exception {
        try (InputStream in = Files.newInputStream(Paths.get(tlsDir, file))) {
            return (X509Certificate) CertificateFactory.getInstance("X.509").generateCertificate(in);
        }
    }

    /** A TLS context trusting the test CA, presenting the client certificate `client`
     *  (make_pki.sh name: PEM certificate, PKCS#8 PEM EC key) if not null. */
    static SSLContext tlsContext(String client, String protocol) throws Exception {
        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        trust.setCertificateEntry("ca", pemCert("ca.pem"));
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        KeyManager[] kms = null;
        if (client != null) {
            String pem = new String(Files.readAllBytes(Paths.get(tlsDir, client + ".key")), StandardCharsets.US_ASCII);
            byte[] der = Base64.getMimeDecoder().decode(
                    pem.replace("-----BEGIN PRIVATE KEY-----", "").replace("-----END PRIVATE KEY-----", ""));
            PrivateKey key = KeyFactory.getInstance("EC").generatePrivate(new PKCS8EncodedKeySpec(der));
            char[] pw = "conformance".toCharArray();
            KeyStore ks = KeyStore.getInstance("PKCS12");
            ks.load(null, null);
            ks.setKeyEntry("client", key, pw, new Certificate[] {pemCert(client + ".pem")});
            KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
            kmf.init(ks, pw);
            kms = kmf.getKeyManagers();
        }
        SSLContext ctx = SSLContext.getInstance(protocol);
        ctx.init(kms, tmf.getTrustManagers(), null);
        return ctx;
    }

    /** Remembers the mechanisms connection.start offered, then picks like `inner`. */
    static final class RecordingSasl implements SaslConfig {
        final SaslConfig inner;
        volatile List<String> offered;
        RecordingSasl(SaslConfig inner) { this.inner = inner; }
        @Override
        public SaslMechanism getSaslMechanism(String[] mechanisms) {
            offered = Arrays.asList(mechanisms);
            return inner.getSaslMechanism(mechanisms);
        }
    }

    /** What a TLS connection attempt produced: the connection (or null), the socket, the mechanisms offered. */
    static final class TlsAttempt {
        Connection conn;
        SSLSocket socket;
        RecordingSasl sasl;
        String protocol() { return socket.getSession().getProtocol(); }
    }

    /** Connects to the tls broker with the server certificate verified for host 127.0.0.1
     *  (IP SAN); `protocol` "TLSv1.2" caps the version, "TLS" lets both sides choose. */
    static TlsAttempt connectTls(String client, SaslConfig sasl, String protocol) throws Exception {
        TlsAttempt a = new TlsAttempt();
        a.sasl = new RecordingSasl(sasl);
        ConnectionFactory f = new ConnectionFactory();
        f.setHost(host);
        f.setPort(tlsPort);
        f.setUsername("guest");
        f.setPassword("guest");
        f.setVirtualHost("/");
        f.setConnectionTimeout(5000);
        f.setHandshakeTimeout(5000);
        f.setAutomaticRecoveryEnabled(false);
        f.setTopologyRecoveryEnabled(false);
        f.useSslProtocol(tlsContext(client, protocol));
        f.setSaslConfig(a.sasl);
        f.setSocketConfigurator(sock -> {
            sock.setTcpNoDelay(true);
            SSLSocket ssl = (SSLSocket) sock;
            SSLParameters p = ssl.getSSLParameters();
            p.setEndpointIdentificationAlgorithm("HTTPS");  // hostname (here: IP) verification
            ssl.setSSLParameters(p);
            a.socket = ssl;
        });
        a.conn = f.newConnection("warren-conformance-tls");
        open.add(a.conn);
        return a;
    }

    /** Declare a queue, publish a small and a multi-frame (300 KiB) message, get both back. */
    static void tlsRoundtrip(Connection c, String what) throws Exception {
        Channel ch = c.createChannel();
        String q = name(what);
        eq(ch.queueDeclare(q, false, false, false, null).getQueue(), q, what + ": declare-ok queue name");
        byte[] big = new byte[307200];  // 3 body frames at frame_max 131072, many TLS records
        for (int i = 0; i < big.length; i++) big[i] = (byte) i;
        ch.basicPublish("", q, new AMQP.BasicProperties.Builder().correlationId("tls-1").build(), b("over tls"));
        ch.basicPublish("", q, null, big);
        GetResponse r = ch.basicGet(q, true);
        check(r != null, what + ": basic.get returned empty");
        eq(s(r.getBody()), "over tls", what + ": first body");
        eq(r.getProps().getCorrelationId(), "tls-1", what + ": correlation_id");
        eq(r.getMessageCount(), 1, what + ": message_count after the first get");
        r = ch.basicGet(q, true);
        check(r != null, what + ": second basic.get returned empty");
        check(Arrays.equals(r.getBody(), big), what + ": 300 KiB body differs (" + r.getBody().length + " octets back)");
        check(ch.basicGet(q, true) == null, what + ": get on the emptied queue returned a message");
        ch.queueDelete(q);
    }

    /** The attempt must fail like RabbitMQ's refused login: connection.close 403 ACCESS_REFUSED
     *  with the exact text (the client raises AuthenticationFailureException). */
    static void expectLoginRefused(String client, String what) throws Exception {
        try {
            TlsAttempt a = connectTls(client, DefaultSaslConfig.EXTERNAL, "TLS");
            a.conn.close();
            throw new Failure(what + ": login succeeded");
        } catch (AuthenticationFailureException e) {
            eq(e.getMessage(), EXTERNAL_REFUSED, what + ": refusal");
        } catch (IOException e) {
            throw new Failure(what + ": expected AuthenticationFailureException (403 " + EXTERNAL_REFUSED
                    + " after start-ok), got " + e);
        }
    }

    static void s17TlsPlainLogin() throws Exception {
        for (String protocol : new String[] {"TLS", "TLSv1.2"}) {
            TlsAttempt a = connectTls(null, DefaultSaslConfig.PLAIN, protocol);
            String label = a.protocol();
            if (protocol.equals("TLSv1.2")) eq(label, "TLSv1.2", "negotiated protocol with a TLSv1.2 context");
            check(label.equals("TLSv1.2") || label.equals("TLSv1.3"), "negotiated protocol " + label);
            check(a.sasl.offered.contains("PLAIN"), label + ": PLAIN not offered: " + a.sasl.offered);
            X509Certificate server = (X509Certificate) a.socket.getSession().getPeerCertificates()[0];
            eq(server.getSubjectX500Principal().getName(), "CN=localhost", label + ": server certificate subject");
            eq(a.conn.getServerProperties().get("product"), product, label + ": server_properties.product");
            tlsRoundtrip(a.conn, "tls-plain-" + label);
            a.conn.close();
        }
    }

    static void s18TlsExternalLogin() throws Exception {
        TlsAttempt a = connectTls("client-guest", DefaultSaslConfig.EXTERNAL, "TLS");
        check(a.sasl.offered.contains("EXTERNAL"), "EXTERNAL not offered with a client certificate: " + a.sasl.offered);
        check(a.sasl.offered.contains("PLAIN"), "PLAIN not offered with a client certificate: " + a.sasl.offered);
        tlsRoundtrip(a.conn, "tls-external");
        a.conn.close();
        // PLAIN still works when a client certificate is presented
        a = connectTls("client-guest", DefaultSaslConfig.PLAIN, "TLS");
        check(a.conn.createChannel().isOpen(), "PLAIN with a client certificate: channel did not open");
        a.conn.close();
    }

    static void s19TlsExternalUnknownUserRefused() throws Exception {
        expectLoginRefused("client-tlsuser", "EXTERNAL as CN=tlsuser");
    }

    static void s20TlsNoClientCertExternalRefused() throws Exception {
        // RabbitMQ (rabbitmq_auth_mechanism_ssl) offers EXTERNAL on every TLS connection,
        // with or without a client certificate, and refuses it after start-ok
        expectLoginRefused(null, "EXTERNAL without a client certificate");
        TlsAttempt a = connectTls(null, DefaultSaslConfig.PLAIN, "TLS");
        check(a.sasl.offered.contains("EXTERNAL"),
                "EXTERNAL not offered on a TLS connection without a client certificate: " + a.sasl.offered);
        tlsRoundtrip(a.conn, "tls-nocert-plain");
        a.conn.close();
    }

    // --------------------------------------------------------------------- main

    public static void main(String[] argv) throws Exception {
        Set<String> only = null;
        String envProduct = System.getenv("CONFORMANCE_PRODUCT");
        if (envProduct != null && !envProduct.isEmpty()) product = envProduct;
        for (int i = 0; i < argv.length; i++) {
            switch (argv[i]) {
                case "--host": host = argv[++i]; break;
                case "--port": port = Integer.parseInt(argv[++i]); break;
                case "--alarm-port": alarmPort = Integer.parseInt(argv[++i]); break;
                case "--timeout-port": timeoutPort = Integer.parseInt(argv[++i]); break;
                case "--tls-port": tlsPort = Integer.parseInt(argv[++i]); break;
                case "--tls-dir": tlsDir = argv[++i]; break;
                case "--product": product = argv[++i]; break;
                case "--only": only = new HashSet<>(Arrays.asList(argv[++i].split(","))); break;
                default: System.err.println("unknown argument " + argv[i]); System.exit(2);
            }
        }
        if (port < 0) { System.err.println("--port is required"); System.exit(2); }

        Map<String, Scenario> scenarios = new LinkedHashMap<>();
        scenarios.put("handshake", Scenarios::s01Handshake);
        scenarios.put("declare_get_properties", Scenarios::s02DeclareGetProperties);
        scenarios.put("consume_prefetch_ack", Scenarios::s03ConsumePrefetchAck);
        scenarios.put("publisher_confirms", Scenarios::s04PublisherConfirms);
        scenarios.put("mandatory_return", Scenarios::s05MandatoryReturn);
        scenarios.put("topic_routing", Scenarios::s06TopicRouting);
        scenarios.put("nack_reject_dlx", Scenarios::s07NackRejectDlx);
        scenarios.put("transactions", Scenarios::s08Transactions);
        scenarios.put("errors", Scenarios::s09Errors);
        scenarios.put("ttl_dead_letter", Scenarios::s10TtlDeadLetter);
        scenarios.put("consumer_priorities", Scenarios::s11ConsumerPriorities);
        scenarios.put("single_active_consumer", Scenarios::s12SingleActiveConsumer);
        scenarios.put("direct_reply_to", Scenarios::s13DirectReplyTo);
        scenarios.put("delivery_count", Scenarios::s14DeliveryCount);
        scenarios.put("connection_blocked", Scenarios::s15ConnectionBlocked);
        scenarios.put("consumer_timeout", Scenarios::s16ConsumerTimeout);
        scenarios.put("tls_plain_login", Scenarios::s17TlsPlainLogin);
        scenarios.put("tls_external_login", Scenarios::s18TlsExternalLogin);
        scenarios.put("tls_external_unknown_user_refused", Scenarios::s19TlsExternalUnknownUserRefused);
        scenarios.put("tls_no_client_cert_external_refused", Scenarios::s20TlsNoClientCertExternalRefused);
        // scenarios that need a differently configured broker: name -> {option, port}
        Map<String, Object[]> needs = new HashMap<>();
        needs.put("connection_blocked", new Object[] {"--alarm-port", alarmPort});
        needs.put("consumer_timeout", new Object[] {"--timeout-port", timeoutPort});
        int tlsNeed = tlsDir != null ? tlsPort : -1;
        for (String t : new String[] {"tls_plain_login", "tls_external_login",
                "tls_external_unknown_user_refused", "tls_no_client_cert_external_refused"}) {
            needs.put(t, new Object[] {"--tls-port/--tls-dir", tlsNeed});
        }

        boolean verbose = System.getenv("CONFORMANCE_VERBOSE") != null;
        int failed = 0;
        for (Map.Entry<String, Scenario> en : scenarios.entrySet()) {
            if (only != null && !only.contains(en.getKey())) continue;
            String full = "java." + en.getKey();
            Object[] need = needs.get(en.getKey());
            if (need != null && (int) need[1] < 0) {
                System.out.println("SKIP " + full + ": no " + need[0] + " broker given");
                System.out.flush();
                continue;
            }
            ExecutorService ex = Executors.newSingleThreadExecutor(r -> {
                Thread t = new Thread(r, full);
                t.setDaemon(true);
                return t;
            });
            long t0 = System.nanoTime();
            Future<?> fut = ex.submit(() -> { en.getValue().run(); return null; });
            String failure = null;
            try {
                fut.get(SCENARIO_TIMEOUT_S, TimeUnit.SECONDS);
            } catch (TimeoutException e) {
                fut.cancel(true);
                failure = "scenario did not finish within " + SCENARIO_TIMEOUT_S + "s";
            } catch (java.util.concurrent.ExecutionException e) {
                Throwable t = e.getCause();
                failure = t instanceof Failure ? t.getMessage() : t.toString();
                ShutdownSignalException sse = shutdownCause(t);
                if (sse != null && !(t instanceof Failure)) failure += " [reason: " + sse.getReason() + "]";
                if (verbose) t.printStackTrace();
            }
            ex.shutdownNow();
            for (Connection c : open) {
                try { c.abort(1000); } catch (Exception ignored) { }
            }
            open.clear();
            if (failure == null) {
                System.out.printf("PASS %s (%.2fs)%n", full, (System.nanoTime() - t0) / 1e9);
            } else {
                failed++;
                System.out.println("FAIL " + full + ": " + failure.replace('\n', ' '));
            }
            System.out.flush();
        }
        System.exit(failed == 0 ? 0 : 1);
    }
}
