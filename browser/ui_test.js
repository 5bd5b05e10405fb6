// The management web UI end to end, in Debian's chromium (headless) driven
// by playwright-core, against a running broker (browser/run.sh starts it):
// each test does what a user does on the page and checks the outcome both
// on the page and through the API or an AMQP client (amqplib).
//
// Environment: WARREN_UI (the management URL), WARREN_AMQP (an amqp:// URL
// for guest), CHROMIUM (the browser binary), SHOTS (screenshot directory),
// WORK (a scratch directory). Exits 1 if any test fails.
'use strict';

const fs = require('fs');
const path = require('path');
const amqp = require('amqplib');
const { chromium } = require('playwright-core');

const UI = process.env.WARREN_UI;
const AMQP = process.env.WARREN_AMQP;
const SHOTS = process.env.SHOTS;
const WORK = process.env.WORK;
const WAIT = 15000;

const tests = [];
const test = (name, fn) => tests.push([name, fn]);

function check(cond, what) {
  if (!cond) throw new Error(what);
}

// The management API as guest (for setting up and for checking outcomes).
async function api(method, p, body) {
  const r = await fetch(`${UI}/api${p}`, {
    method,
    headers: {
      authorization: `Basic ${Buffer.from('guest:guest').toString('base64')}`,
      ...(body ? { 'content-type': 'application/json' } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  return { status: r.status, json: text ? JSON.parse(text) : null };
}

async function login(page, user, pass) {
  await page.goto(`${UI}/`);
  await page.fill('#login-user', user);
  await page.fill('#login-pass', pass);
  await page.click('form.login button[type=submit]');
}

// No value the page meant to format leaked as JavaScript's own words.
async function noStrayText(page) {
  const text = await page.evaluate(() => document.body.innerText);
  const stray = text.match(/\b(null|undefined|NaN)\b|\[object /);
  check(!stray, `the page shows "${stray && stray[0]}"`);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: false });
}

let browser;
let amqpConn;
let errors = [];
let current = null;

async function newPage(width = 1280) {
  const context = await browser.newContext({ viewport: { width, height: 900 } });
  const page = await context.newPage();
  current = page;
  page.on('pageerror', (e) => errors.push(`${e.message}`));
  // (A refused request is logged by the browser itself: not a page error.)
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text());
  });
  return page;
}

test('a wrong password shows an error and no page', async () => {
  const page = await newPage();
  await login(page, 'guest', 'not-the-password');
  const alert = await page.waitForSelector('.error[role=alert]', { timeout: WAIT });
  check((await alert.textContent()).includes('Login failed'), 'the error says the login failed');
  check(await page.locator('nav').count() === 0, 'no navigation after a failed login');
  await shot(page, 'login-failed');
  await page.context().close();
});

test('guest logs in and sees the overview', async () => {
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  const links = await page.locator('nav a').allTextContents();
  check(links.join(',') === 'Overview,Connections,Channels,Exchanges,Queues,Admin', `nav: ${links}`);
  await page.waitForSelector('text=warren@localhost', { timeout: WAIT });
  await page.context().close();
});

test('a queue an AMQP client declares appears in the list', async () => {
  const ch = await amqpConn.createChannel();
  await ch.assertQueue('ui-orders', { durable: true });
  await ch.close();
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.click('nav a:has-text("Queues")');
  await page.fill('#filter', 'ui-ord');
  await page.waitForSelector('#list a:has-text("ui-orders")', { timeout: WAIT });
  const info = await page.locator('#page-info').textContent();
  check(/1 shown/.test(info), `one queue matches the filter: ${info}`);
  await page.fill('#filter', 'no-such-queue');
  await page.waitForSelector('text=Nothing matches the filter.', { timeout: WAIT });
  await page.fill('#filter', '');
  await page.waitForSelector('#list a:has-text("ui-orders")', { timeout: WAIT });
  await noStrayText(page);
  await shot(page, 'queues');
  await page.context().close();
});

test('a message published from the page is got back on the page', async () => {
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.goto(`${UI}/#/queues/%2F/ui-orders`);
  await page.waitForSelector('#queue-ready', { timeout: WAIT });
  await page.fill('#publish-payload', 'hello from the page');
  await page.click('#publish-form button[type=submit]');
  await page.waitForSelector('#publish-status :text("Published.")', { timeout: WAIT });
  await page.selectOption('#get-ackmode', 'ack_requeue_false');
  await page.click('#get-form button[type=submit]');
  const payload = await page.waitForSelector('#get-result td.payload', { timeout: WAIT });
  check((await payload.textContent()) === 'hello from the page', 'the payload comes back');
  const q = await api('GET', '/queues/%2F/ui-orders');
  check(q.json.messages === 0, `the get removed it: ${q.json.messages} left`);
  await noStrayText(page);
  await shot(page, 'queue');
  await page.context().close();
});

test('a binding is added and removed from the queue page', async () => {
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.goto(`${UI}/#/queues/%2F/ui-orders`);
  await page.waitForSelector('#bind-form', { timeout: WAIT });
  await page.fill('#bind-exchange', 'amq.topic');
  await page.fill('#bind-key', 'ui.#');
  await page.click('#bind-form button[type=submit]');
  await page.waitForSelector('#bindings-source td:has-text("ui.#")', { timeout: WAIT });
  const bound = await api('GET', '/bindings/%2F/e/amq.topic/q/ui-orders');
  check(bound.json.length === 1 && bound.json[0].routing_key === 'ui.#', `bound: ${JSON.stringify(bound.json)}`);
  await page.click('button[aria-label="Unbind ui.# from amq.topic"]');
  await page.waitForSelector('#bindings-source td:has-text("ui.#")', { state: 'detached', timeout: WAIT });
  const unbound = await api('GET', '/bindings/%2F/e/amq.topic/q/ui-orders');
  check(unbound.json.length === 0, `unbound: ${JSON.stringify(unbound.json)}`);
  await page.context().close();
});

test('an administrator adds a user and a policy', async () => {
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.click('nav a:has-text("Admin")');
  await page.waitForSelector('#user-form', { timeout: WAIT });
  await page.fill('#user-name', 'ui-watcher');
  await page.fill('#user-pass', 'watch-it');
  await page.fill('#user-tags', 'monitoring');
  await page.click('#user-form button[type=submit]');
  await page.waitForSelector('#users td:text-is("ui-watcher")', { timeout: WAIT });
  const user = await api('GET', '/users/ui-watcher');
  check(user.status === 200 && JSON.stringify(user.json.tags).includes('monitoring'), `user: ${JSON.stringify(user.json)}`);
  await page.fill('#policy-name', 'ui-cap');
  await page.fill('#policy-vhost', '/');
  await page.fill('#policy-pattern', '^ui-');
  await page.selectOption('#policy-apply-to', 'queues');
  await page.fill('#policy-definition', '{"max-length": 5}');
  await page.click('#policy-form button[type=submit]');
  await page.waitForSelector('#policies td:text-is("ui-cap")', { timeout: WAIT });
  const q = await api('GET', '/queues/%2F/ui-orders');
  check(q.json.policy === 'ui-cap', `the queue has the policy: ${q.json.policy}`);
  await noStrayText(page);
  await shot(page, 'admin');
  await page.context().close();
});

test('a definitions file is imported', async () => {
  const file = path.join(WORK, 'definitions.json');
  fs.writeFileSync(file, JSON.stringify({
    queues: [{ name: 'ui-imported', vhost: '/', durable: true, auto_delete: false, arguments: {} }],
    exchanges: [{ name: 'ui-events', vhost: '/', type: 'topic', durable: true, auto_delete: false, internal: false, arguments: {} }],
    bindings: [{ source: 'ui-events', vhost: '/', destination: 'ui-imported', destination_type: 'queue', routing_key: '#', arguments: {} }],
  }));
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.click('nav a:has-text("Admin")');
  await page.setInputFiles('#import-file', file);
  await page.click('#import-form button[type=submit]');
  await page.waitForSelector('#definitions-status :text("Definitions imported.")', { timeout: WAIT });
  check((await api('GET', '/queues/%2F/ui-imported')).status === 200, 'the queue was imported');
  const b = await api('GET', '/bindings/%2F/e/ui-events/q/ui-imported');
  check(b.json.length === 1, 'the binding was imported');
  await page.context().close();
});

test('the overview chart shows the publish rate while a client publishes', async () => {
  const ch = await amqpConn.createChannel();
  let publishing = true;
  const publisher = (async () => {
    while (publishing) {
      ch.sendToQueue('ui-orders', Buffer.from('tick'));
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  try {
    const page = await newPage();
    await login(page, 'guest', 'guest');
    await page.waitForSelector('#total-queues', { timeout: WAIT });
    // The broker samples rates every 5 s, the page polls every 5 s; the
    // client publishes about 50 a second (at least 10, however busy).
    await page.waitForFunction(() => {
      const s = document.querySelector('[data-series="published"]');
      const n = s && Number(s.textContent.replace(/[^0-9.]/g, ''));
      return n >= 10;
    }, null, { timeout: 25000 });
    const label = await page.locator('[data-series="published"]').textContent();
    check(/published [1-9][0-9]/.test(label), `the legend shows the rate: ${label}`);
    check(await page.locator('.chart svg polyline').count() >= 7, 'one line per rate');
    await noStrayText(page);
    await shot(page, 'overview');
    await page.context().close();
  } finally {
    publishing = false;
    await publisher;
    await ch.close();
  }
});

test('the exchange page says where a message would go, and a queue where its dead letters go', async () => {
  check((await api('PUT', '/exchanges/%2F/ui-route', { type: 'topic', durable: true })).status < 300, 'exchange declared');
  check((await api('POST', '/bindings/%2F/e/ui-route/q/ui-orders', { routing_key: 'order.#' })).status < 300, 'bound');
  check((await api('PUT', '/queues/%2F/ui-dead', { durable: true })).status < 300, 'ui-dead declared');
  check((await api('PUT', '/queues/%2F/ui-with-dlx', { durable: true, arguments: { 'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': 'ui-dead' } })).status < 300, 'ui-with-dlx declared');
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.goto(`${UI}/#/exchanges/%2F/ui-route`);
  await page.waitForSelector('#trace-form', { timeout: WAIT });
  await page.fill('#trace-key', 'order.created');
  await page.click('#trace-form button[type=submit]');
  await page.waitForSelector('#trace-queues a:has-text("ui-orders")', { timeout: WAIT });
  check((await page.locator('#trace-result').textContent()).includes('binding with key "order.#"'), 'the matching binding is named');
  await shot(page, 'exchange-trace');
  await page.fill('#trace-key', 'invoice.paid');
  await page.click('#trace-form button[type=submit]');
  await page.waitForSelector('#trace-queues:has-text("Reaches no queue")', { timeout: WAIT });
  await page.goto(`${UI}/#/queues/%2F/ui-with-dlx`);
  await page.waitForSelector('#dead-letter-path a:has-text("ui-dead")', { timeout: WAIT });
  await noStrayText(page);
  await page.context().close();
});

test('a monitoring user sees everything and changes nothing', async () => {
  const page = await newPage();
  await login(page, 'ui-watcher', 'watch-it');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  const links = await page.locator('nav a').allTextContents();
  check(!links.includes('Admin'), `no Admin section: ${links}`);
  await page.goto(`${UI}/#/queues/%2F/ui-orders`);
  await page.waitForSelector('#queue-ready', { timeout: WAIT });
  for (const control of ['#publish-form', '#bind-form', '#get-form', '#purge', '#delete-queue']) {
    check(await page.locator(control).count() === 0, `${control} is not offered`);
  }
  // Everything is visible: the AMQP client's connection too.
  await page.click('nav a:has-text("Connections")');
  await page.waitForSelector('#list a', { timeout: WAIT });
  await page.click('#list a');
  await page.waitForSelector('text=Client properties', { timeout: WAIT });
  check(await page.locator('text=Close connection').count() === 0, 'no close button');
  await page.context().close();
});

test('a management user sees only its vhosts, and may work there', async () => {
  check((await api('PUT', '/vhosts/ui-shop', {})).status < 300, 'vhost');
  check((await api('PUT', '/users/ui-dev', { password: 'dev-pass', tags: 'management' })).status < 300, 'user');
  check((await api('PUT', '/permissions/ui-shop/ui-dev', { configure: '.*', write: '.*', read: '.*' })).status < 300, 'permissions');
  check((await api('PUT', '/queues/ui-shop/ui-shop-q', { durable: true })).status < 300, 'queue');
  const page = await newPage();
  await login(page, 'ui-dev', 'dev-pass');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  const vhosts = await page.locator('#vhost option').allTextContents();
  check(vhosts.join(',') === 'All,ui-shop', `the vhost selector: ${vhosts}`);
  check(!(await page.locator('nav a').allTextContents()).includes('Admin'), 'no Admin section');
  await page.click('nav a:has-text("Queues")');
  await page.waitForSelector('#list a:has-text("ui-shop-q")', { timeout: WAIT });
  check(await page.locator('#list a:has-text("ui-orders")').count() === 0, 'another vhost\'s queue is not listed');
  await page.click('#list a:has-text("ui-shop-q")');
  await page.waitForSelector('#publish-form', { timeout: WAIT });
  await page.fill('#publish-payload', 'from the developer');
  await page.click('#publish-form button[type=submit]');
  await page.waitForSelector('#publish-status :text("Published.")', { timeout: WAIT });
  check((await api('GET', '/queues/ui-shop/ui-shop-q')).json.messages === 1, 'the message is in the queue');
  await page.context().close();
});

test('purge and delete ask first, then act', async () => {
  check((await api('PUT', '/queues/%2F/ui-doomed', { durable: true })).status < 300, 'queue');
  for (let i = 0; i < 3; i += 1) {
    await api('POST', '/exchanges/%2F/amq.default/publish', { routing_key: 'ui-doomed', payload: 'x', payload_encoding: 'string', properties: {} });
  }
  const page = await newPage();
  const asked = [];
  page.on('dialog', (d) => { asked.push(d.message()); d.accept(); });
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.goto(`${UI}/#/queues/%2F/ui-doomed`);
  await page.waitForSelector('#purge', { timeout: WAIT });
  await page.click('#purge');
  await page.waitForSelector(':text("Purged.")', { timeout: WAIT });
  check((await api('GET', '/queues/%2F/ui-doomed')).json.messages === 0, 'purged');
  await page.click('#delete-queue');
  await page.waitForFunction(() => location.hash === '#/queues', null, { timeout: WAIT });
  check((await api('GET', '/queues/%2F/ui-doomed')).status === 404, 'deleted');
  check(asked.length === 2 && asked[1].includes('ui-doomed'), `asked: ${asked}`);
  await page.context().close();
});

test('topic permissions are set from the admin page', async () => {
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.click('nav a:has-text("Admin")');
  await page.waitForSelector('#topic-form', { timeout: WAIT });
  await page.fill('#topic-user', 'ui-watcher');
  await page.fill('#topic-vhost', '/');
  await page.fill('#topic-write', '^ui\\.');
  await page.click('#topic-form button[type=submit]');
  await page.waitForSelector('#topic-permissions td:text-is("ui-watcher")', { timeout: WAIT });
  const t = await api('GET', '/topic-permissions/%2F/ui-watcher');
  check(t.json.length === 1 && t.json[0].write === '^ui\\.', `set: ${JSON.stringify(t.json)}`);
  await page.context().close();
});

test('definitions download, a vhost with a limit, and a user deleted', async () => {
  const page = await newPage();
  page.on('dialog', (d) => d.accept());
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.click('nav a:has-text("Admin")');
  await page.waitForSelector('#export', { timeout: WAIT });
  const [download] = await Promise.all([page.waitForEvent('download', { timeout: WAIT }), page.click('#export')]);
  const file = path.join(WORK, 'exported.json');
  await download.saveAs(file);
  const defs = JSON.parse(fs.readFileSync(file, 'utf8'));
  check(defs.queues.some((q) => q.name === 'ui-orders'), 'the download holds the broker\'s queues');
  await page.fill('#vhost-name', 'ui-limited');
  await page.click('#vhost-form button[type=submit]');
  await page.waitForSelector('#vhosts td:text-is("ui-limited")', { timeout: WAIT });
  await page.selectOption('#limit-vhost', 'ui-limited');
  await page.selectOption('#limit-name', 'max-queues');
  await page.fill('#limit-value', '3');
  await page.click('#limit-form button[type=submit]');
  await page.waitForSelector('#vhosts td:has-text("max-queues")', { timeout: WAIT });
  const limits = await api('GET', '/vhost-limits/ui-limited');
  check(JSON.stringify(limits.json).includes('"max-queues":3'), `limits: ${JSON.stringify(limits.json)}`);
  await page.click('button[aria-label="Delete user ui-watcher"]');
  await page.waitForSelector('#users td:text-is("ui-watcher")', { state: 'detached', timeout: WAIT });
  check((await api('GET', '/users/ui-watcher')).status === 404, 'the user is gone');
  await page.context().close();
});

test('a connection is closed from its page with a reason the client hears', async () => {
  const conn = await amqp.connect(AMQP, { clientProperties: { connection_name: 'ui-to-close' } });
  const closed = new Promise((resolve) => conn.on('close', (e) => resolve(e ? e.message : 'closed without error')));
  conn.on('error', () => {});
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.click('nav a:has-text("Connections")');
  await page.waitForSelector('#list tbody tr', { timeout: WAIT });
  const rows = await page.locator('#list tbody tr a').allTextContents();
  const mine = (await api('GET', '/connections')).json.find((c) => c.user_provided_name === 'ui-to-close');
  check(mine && rows.includes(mine.name), `listed: ${rows}`);
  await page.goto(`${UI}/#/connections/${encodeURIComponent(mine.name)}`);
  await page.waitForSelector('text=Client properties', { timeout: WAIT });
  await page.fill('#close-reason', 'maintenance window');
  await page.click('button:has-text("Close connection")');
  const why = await closed;
  check(why.includes('maintenance window'), `the client was told: ${why}`);
  await page.context().close();
});

test('the pages fit a phone screen', async () => {
  const page = await newPage(390);
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  const wide = await page.evaluate(() => document.documentElement.scrollWidth);
  check(wide <= 390, `no sideways scrolling on the overview: ${wide}px wide`);
  await page.click('nav a:has-text("Queues")');
  await page.waitForSelector('#list a:has-text("ui-orders")', { timeout: WAIT });
  await noStrayText(page);
  await shot(page, 'queues-phone');
  await page.context().close();
});

test('ten thousand queues stay usable: pages, filter, sort', async () => {
  const ch = await amqpConn.createChannel();
  const names = Array.from({ length: 10000 }, (_, i) => `bulk-${String(i).padStart(5, '0')}`);
  await Promise.all(names.map((n) => ch.assertQueue(n, { durable: false })));
  await ch.close();
  const page = await newPage();
  await login(page, 'guest', 'guest');
  await page.waitForSelector('#total-queues', { timeout: WAIT });
  await page.click('nav a:has-text("Queues")');
  await page.waitForSelector('#page-info:has-text("of 10,0")', { timeout: WAIT });
  check(await page.locator('#list tbody tr').count() === 100, 'a page of 100');
  await page.click('button[aria-label="Next page"]');
  await page.waitForSelector('#page-info:has-text("Page 2 of")', { timeout: WAIT });
  await page.fill('#filter', 'bulk-0999');
  await page.waitForSelector('#page-info:has-text("10 shown")', { timeout: WAIT });
  await page.fill('#filter', '^bulk-0000[0-4]$');
  await page.check('#filter-regex');
  await page.waitForSelector('#page-info:has-text("5 shown")', { timeout: WAIT });
  // The list is sorted by name; clicking the header again reverses it.
  await page.click('th:has-text("Name")');
  await page.waitForSelector('th[aria-sort="descending"]:has-text("Name")', { timeout: WAIT });
  const first = await page.locator('#list tbody tr td a').first().textContent();
  check(first === 'bulk-00004', `sorted descending: ${first}`);
  await noStrayText(page);
  await shot(page, 'queues-10000');
  await page.context().close();
});

(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  amqpConn = await amqp.connect(AMQP);
  let failed = 0;
  for (const [name, fn] of tests) {
    errors = [];
    const t0 = Date.now();
    try {
      await fn();
      if (errors.length) throw new Error(`the page reported errors: ${errors.join(' | ')}`);
      console.log(`ok   ${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed += 1;
      console.log(`FAIL ${name}: ${e.message}`);
      // What the page showed, for the log and as a picture.
      if (current && !current.isClosed()) {
        const text = await current.evaluate(() => document.body.innerText).catch(() => '');
        console.log(`     the page at ${current.url()} showed: ${text.slice(0, 1500).replace(/\n+/g, ' | ')}`);
        await shot(current, `failed-${failed}`).catch(() => {});
        await current.context().close().catch(() => {});
      }
    }
  }
  await amqpConn.close();
  await browser.close();
  console.log(`browser: ${tests.length - failed} of ${tests.length} tests passed`);
  process.exit(failed ? 1 : 0);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
