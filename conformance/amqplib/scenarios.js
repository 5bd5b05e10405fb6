#!/usr/bin/env node
// Warren conformance scenarios driven through amqplib (Node.js), the client
// most Node services use for RabbitMQ.
//
// Usage: node scenarios.js --port N [--host H] [--only a,b] [other run.sh flags]
//
// Every scenario opens its own connection, uses its own uniquely named
// entities and prints exactly one line: `PASS amqplib.<name>` or
// `FAIL amqplib.<name>: reason`. The expected behaviour is RabbitMQ 3.10's.
// Exit status: 0 if all passed, 1 otherwise. Flags run.sh passes for other
// clients (--alarm-port, --tls-port, ...) are accepted and ignored.
'use strict';

const amqp = require('amqplib');
const crypto = require('crypto');

const SCENARIO_TIMEOUT_MS = 30000;
const RUN = crypto.randomBytes(4).toString('hex');
const name = (base) => `amqplib.${base}.${RUN}`;

class Failure extends Error {}
function check(cond, msg) {
  if (!cond) throw new Failure(msg);
}
function eq(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Failure(`${what}: expected ${e}, got ${a}`);
}

// Resolves with the refusal `promise` ends in; fails if it succeeds.
async function refusal(promise, what) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  throw new Failure(`${what} was accepted`);
}

async function handshake(url) {
  const conn = await amqp.connect(url);
  try {
    const props = conn.connection.serverProperties;
    eq(props.product, process.env.CONFORMANCE_PRODUCT || 'Warren', 'product');
    for (const cap of ['publisher_confirms', 'basic.nack', 'consumer_cancel_notify']) {
      eq(props.capabilities[cap], true, `capability ${cap}`);
    }
    const ch = await conn.createChannel();
    await ch.close();
  } finally {
    await conn.close();
  }
}

async function topicRoundTrip(url) {
  const conn = await amqp.connect(url);
  try {
    const ch = await conn.createChannel();
    const x = name('events');
    const q = name('audit');
    await ch.assertExchange(x, 'topic', { durable: true });
    const declared = await ch.assertQueue(q, { durable: true, arguments: { 'x-message-ttl': 60000 } });
    eq(declared.messageCount, 0, 'messageCount at declare');
    await ch.bindQueue(q, x, 'order.*');
    ch.publish(x, 'order.paid', Buffer.from('order 17'), {
      persistent: true,
      contentType: 'text/plain',
      headers: { source: 'amqplib', attempt: 1 },
      correlationId: 'c-17',
    });
    ch.publish(x, 'invoice.sent', Buffer.from('not for audit'));
    let msg = false;
    for (let i = 0; i < 100 && msg === false; i++) {
      msg = await ch.get(q, { noAck: false });
    }
    check(msg, 'the routed message never arrived');
    eq(msg.content.toString(), 'order 17', 'body');
    eq(msg.fields.routingKey, 'order.paid', 'routing key');
    eq(msg.fields.exchange, x, 'exchange');
    eq(msg.fields.redelivered, false, 'redelivered');
    eq(msg.properties.deliveryMode, 2, 'deliveryMode');
    eq(msg.properties.contentType, 'text/plain', 'contentType');
    eq(msg.properties.correlationId, 'c-17', 'correlationId');
    eq(msg.properties.headers, { source: 'amqplib', attempt: 1 }, 'headers');
    ch.nack(msg, false, true);
    const again = await ch.get(q, { noAck: false });
    check(again, 'the requeued message is not back');
    eq(again.fields.redelivered, true, 'redelivered after nack');
    ch.ack(again);
    eq((await ch.checkQueue(q)).messageCount, 0, 'messages left (only order.* was routed)');
    await ch.deleteQueue(q);
    await ch.deleteExchange(x);
  } finally {
    await conn.close();
  }
}

async function prefetchConsume(url) {
  const conn = await amqp.connect(url);
  try {
    const ch = await conn.createChannel();
    const q = name('work');
    await ch.assertQueue(q, { exclusive: true });
    const n = 200;
    for (let i = 0; i < n; i++) ch.sendToQueue(q, Buffer.from(String(i)));
    await ch.prefetch(5);
    const got = [];
    let unackedMax = 0;
    let unacked = 0;
    let acked = 0;
    await new Promise((resolve, reject) => {
      ch.consume(q, (msg) => {
        if (msg === null) return reject(new Failure('consumer cancelled by the broker'));
        got.push(Number(msg.content.toString()));
        unacked += 1;
        unackedMax = Math.max(unackedMax, unacked);
        // Ack on the next turn, so deliveries can pile up to the prefetch.
        setImmediate(() => {
          unacked -= 1;
          ch.ack(msg);
          acked += 1;
          if (acked === n) resolve();
        });
      }).catch(reject);
    });
    eq(got, [...Array(n).keys()], 'delivery order');
    check(unackedMax <= 5, `${unackedMax} unacknowledged deliveries with prefetch 5`);
  } finally {
    await conn.close();
  }
}

async function confirms(url) {
  const conn = await amqp.connect(url);
  try {
    const ch = await conn.createConfirmChannel();
    const q = name('confirmed');
    await ch.assertQueue(q, { durable: true });
    let acked = 0;
    for (let i = 0; i < 100; i++) {
      ch.sendToQueue(q, Buffer.from(`m${i}`), { persistent: true }, (err) => {
        if (!err) acked += 1;
      });
    }
    await ch.waitForConfirms();
    eq(acked, 100, 'publishes confirmed');
    eq((await ch.checkQueue(q)).messageCount, 100, 'messages in the queue');
    await ch.deleteQueue(q);
  } finally {
    await conn.close();
  }
}

async function errors(url) {
  const conn = await amqp.connect(url);
  // amqplib also emits a refused channel's close as an 'error' on it.
  conn.on('error', () => {});
  try {
    const missing = name('missing');
    let ch = await conn.createChannel();
    ch.on('error', () => {});
    const notFound = await refusal(ch.checkQueue(missing), 'a passive declare of a missing queue');
    eq(notFound.code, 404, 'reply code');
    check(
      notFound.message.includes(`NOT_FOUND - no queue '${missing}' in vhost '/'`),
      `reply text: ${notFound.message}`,
    );

    ch = await conn.createChannel();
    ch.on('error', () => {});
    // An exclusive queue is never durable, so `durable` does not matter in
    // its redeclares; for other queues it does.
    const mine = name('mine');
    await ch.assertQueue(mine, { durable: false, exclusive: true });
    await ch.assertQueue(mine, { durable: true, exclusive: true });
    const q = name('strict');
    await ch.assertQueue(q, { durable: false, autoDelete: true });
    const inequivalent = await refusal(
      ch.assertQueue(q, { durable: true, autoDelete: true }),
      'an inequivalent redeclare',
    );
    eq(inequivalent.code, 406, 'reply code');
    check(
      inequivalent.message.includes(`PRECONDITION_FAILED - inequivalent arg 'durable' for queue '${q}' in vhost '/'`),
      `reply text: ${inequivalent.message}`,
    );

    // The connection survived both channel errors.
    ch = await conn.createChannel();
    await ch.assertQueue('', { exclusive: true });
    await ch.deleteQueue(q);
  } finally {
    await conn.close();
  }
}

const SCENARIOS = [
  ['handshake', handshake],
  ['topic_round_trip', topicRoundTrip],
  ['prefetch_consume', prefetchConsume],
  ['confirms', confirms],
  ['errors', errors],
];

function parseArgs(argv) {
  const args = { host: '127.0.0.1', port: null, only: '' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    args[key] = argv[i + 1];
  }
  if (!args.port) {
    console.error('usage: scenarios.js --port N [--host H] [--only a,b]');
    process.exit(2);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const url = `amqp://guest:guest@${args.host}:${args.port}/%2F`;
  const only = new Set(args.only.split(',').filter(Boolean));
  let failed = 0;
  for (const [short, scenario] of SCENARIOS) {
    if (only.size && !only.has(short)) continue;
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Failure(`scenario did not finish within ${SCENARIO_TIMEOUT_MS / 1000}s`)),
        SCENARIO_TIMEOUT_MS,
      );
    });
    try {
      await Promise.race([scenario(url), timeout]);
      console.log(`PASS amqplib.${short}`);
    } catch (e) {
      failed += 1;
      console.log(`FAIL amqplib.${short}: ${e && e.message}`);
      if (process.env.CONFORMANCE_VERBOSE) console.error(e);
    } finally {
      clearTimeout(timer);
    }
  }
  process.exit(failed ? 1 : 0);
}

main();
