// Warren's management UI: one page over the management HTTP API (the same
// /api a RabbitMQ user's tools use), served from the broker's binary. No
// framework and nothing fetched from elsewhere: the DOM is built with
// `el`, every text a client chose (queue names, payloads) goes in as text,
// never as HTML. Pages poll the API every 5 s (the rate the broker samples
// its rates at) and keep the last 5 minutes of rates for the charts.
'use strict';

const POLL_MS = 5000;
const HISTORY = 60;

const state = {
  auth: sessionStorage.getItem('warren-auth'),
  user: null,
  tags: [],
  vhost: sessionStorage.getItem('warren-vhost') || '',
  vhosts: [],
  timer: null,
  generation: 0,
  history: {},
};

// ---------------------------------------------------------------- helpers --

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = v;
    else if (v === true) e.setAttribute(k, '');
    else e.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const enc = encodeURIComponent;

function fmtNum(n) {
  if (n === undefined || n === null) return '';
  return Number(n).toLocaleString('en-US', { maximumFractionDigits: 1 });
}

function fmtRate(n) {
  if (n === undefined || n === null) return '';
  return `${Number(n).toLocaleString('en-US', { maximumFractionDigits: 1 })}/s`;
}

function fmtBytes(n) {
  if (n === undefined || n === null) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toLocaleString('en-US', { maximumFractionDigits: i ? 1 : 0 })} ${units[i]}`;
}

function fmtDuration(ms) {
  const s = Math.floor(ms / 1000);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

function get(obj, path) {
  return path.split('.').reduce((o, k) => (o === undefined || o === null ? undefined : o[k]), obj);
}

function can(what) {
  const t = state.tags;
  if (t.includes('administrator')) return true;
  if (what === 'monitor') return t.includes('monitoring');
  if (what === 'policy') return t.includes('policymaker');
  if (what === 'manage') return t.includes('management') || t.includes('policymaker');
  return false;
}

class ApiError extends Error {
  constructor(status, reason) {
    super(reason);
    this.status = status;
  }
}

async function api(method, path, body, headers) {
  const h = { authorization: `Basic ${state.auth}`, 'x-requested-with': 'XMLHttpRequest', ...(headers || {}) };
  const init = { method, headers: h };
  if (body !== undefined) {
    h['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(`api${path}`, init);
  if (r.status === 401) {
    // Refused for want of a tag, or no longer logged in at all?
    const me = await fetch('api/whoami', { headers: { authorization: h.authorization, 'x-requested-with': 'XMLHttpRequest' } });
    if (me.status === 401) {
      logout('Your session has ended: log in again.');
      throw new ApiError(401, 'not authorised');
    }
  }
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!r.ok) throw new ApiError(r.status, (json && (json.reason || json.error)) || text || r.statusText);
  return json;
}

function errorBox(e) {
  return el('div', { class: 'error', role: 'alert' }, e instanceof Error ? e.message : String(e));
}

// Runs `action`, then shows its outcome in `where` (a message or an error).
async function act(where, action, done) {
  where.replaceChildren();
  try {
    const out = await action();
    if (done) where.append(el('div', { class: 'notice', role: 'status' }, done(out)));
    return out;
  } catch (e) {
    where.append(errorBox(e));
    return undefined;
  }
}

function remember(key, values) {
  const h = state.history[key] || (state.history[key] = []);
  h.push(values);
  if (h.length > HISTORY) h.shift();
  return h;
}

const COLORS = ['#0b5cad', '#1a7f37', '#b35900', '#8250df', '#b42318', '#0f7b8a', '#6e7781'];

// A line chart of `series` ({name, values}) as SVG, with a legend.
function chart(title, series) {
  const w = 600; const hgt = 150; const pad = 4;
  // (The x axis is the whole history: lines grow in from the right.)
  const n = HISTORY;
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `${title}: ${series.map((s) => `${s.name} ${fmtNum(s.values[s.values.length - 1] || 0)}`).join(', ')}`);
  const grid = document.createElementNS(svg.namespaceURI, 'line');
  grid.setAttribute('x1', 0); grid.setAttribute('x2', w);
  grid.setAttribute('y1', hgt - pad); grid.setAttribute('y2', hgt - pad);
  grid.setAttribute('stroke', '#d0d7de');
  svg.append(grid);
  series.forEach((s, i) => {
    const line = document.createElementNS(svg.namespaceURI, 'polyline');
    const pts = s.values.map((v, j) => {
      const x = (w * (j + n - s.values.length)) / (n - 1);
      const y = hgt - pad - ((hgt - 2 * pad) * v) / max;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    line.setAttribute('points', pts.join(' '));
    line.setAttribute('fill', 'none');
    line.setAttribute('stroke', COLORS[i % COLORS.length]);
    line.setAttribute('stroke-width', '2');
    svg.append(line);
  });
  return el('div', { class: 'chart' },
    el('div', { class: 'legend' },
      el('strong', {}, title),
      el('span', {}, `max ${fmtNum(max)}`),
      series.map((s, i) => el('span', { 'data-series': s.name },
        el('i', { class: `c${i % COLORS.length}` }),
        `${s.name} ${fmtNum(s.values[s.values.length - 1] || 0)}`))),
    svg);
}

// ------------------------------------------------------------------ login --

function logout(message) {
  sessionStorage.removeItem('warren-auth');
  state.auth = null;
  state.user = null;
  stopPolling();
  renderLogin(message);
}

function renderLogin(message) {
  const app = document.getElementById('app');
  const out = el('div');
  const user = el('input', { id: 'login-user', name: 'username', autocomplete: 'username', required: true });
  const pass = el('input', { id: 'login-pass', name: 'password', type: 'password', autocomplete: 'current-password' });
  const form = el('form', { class: 'stack login', 'aria-labelledby': 'login-title' },
    el('h2', { id: 'login-title' }, 'Warren management'),
    el('label', { for: 'login-user' }, 'Username', user),
    el('label', { for: 'login-pass' }, 'Password', pass),
    el('button', { type: 'submit' }, 'Log in'),
    out);
  if (message) out.append(el('div', { class: 'notice', role: 'status' }, message));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    out.replaceChildren();
    // (btoa takes Latin-1: encode the UTF-8 bytes first.)
    const raw = new TextEncoder().encode(`${user.value}:${pass.value}`);
    const auth = btoa(String.fromCharCode(...raw));
    const r = await fetch('api/whoami', { headers: { authorization: `Basic ${auth}`, 'x-requested-with': 'XMLHttpRequest' } });
    if (!r.ok) {
      out.append(el('div', { class: 'error', role: 'alert' },
        r.status === 401 ? 'Login failed: wrong username or password, or this user may not use the management UI.' : `Login failed (${r.status}).`));
      return;
    }
    state.auth = auth;
    sessionStorage.setItem('warren-auth', auth);
    start();
  });
  app.replaceChildren(form);
  user.focus();
}

// ------------------------------------------------------------------ shell --

const PAGES = [
  ['overview', 'Overview'],
  ['connections', 'Connections'],
  ['channels', 'Channels'],
  ['exchanges', 'Exchanges'],
  ['queues', 'Queues'],
  ['admin', 'Admin'],
];

async function start() {
  try {
    const me = await api('GET', '/whoami');
    state.user = me.name;
    state.tags = Array.isArray(me.tags) ? me.tags : String(me.tags || '').split(',').filter(Boolean);
    state.vhosts = (await api('GET', '/vhosts')).map((v) => v.name);
    if (state.vhost && !state.vhosts.includes(state.vhost)) state.vhost = '';
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) renderLogin(`Cannot reach the management API: ${e.message}`);
    return;
  }
  route();
}

function shell(current) {
  const vhostSelect = el('select', {
    id: 'vhost',
    onchange: (ev) => {
      state.vhost = ev.target.value;
      sessionStorage.setItem('warren-vhost', state.vhost);
      route();
    },
  }, el('option', { value: '' }, 'All'), state.vhosts.map((v) => el('option', { value: v, selected: v === state.vhost }, v)));
  const header = el('header', {},
    el('h1', {}, 'Warren'),
    el('div', { class: 'who' },
      el('label', { class: 'check', for: 'vhost' }, 'Virtual host', vhostSelect),
      el('span', { id: 'user' }, `${state.user} (${state.tags.join(', ') || 'no tags'})`),
      el('button', { class: 'secondary', id: 'logout', onclick: () => logout('Logged out.') }, 'Log out')));
  const nav = el('nav', { 'aria-label': 'Sections' },
    PAGES.filter(([id]) => id !== 'admin' || can('policy'))
      .map(([id, label]) => el('a', { href: `#/${id}`, 'aria-current': id === current ? 'page' : false }, label)));
  const main = el('main', { id: 'main' });
  document.getElementById('app').replaceChildren(header, nav, main);
  return main;
}

function stopPolling() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  state.generation += 1;
}

// Calls `refresh` now and every POLL_MS until the page changes.
function poll(refresh) {
  stopPolling();
  const generation = state.generation;
  const run = async () => {
    if (generation !== state.generation) return;
    try { await refresh(); } catch (e) { if (!(e instanceof ApiError && e.status === 401)) console.warn(e); }
  };
  run();
  state.timer = setInterval(run, POLL_MS);
}

function route() {
  if (!state.auth) { renderLogin(); return; }
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  const page = parts[0] || 'overview';
  const main = shell(page);
  stopPolling();
  switch (page) {
    case 'connections': return parts[1] ? connectionPage(main, parts[1]) : listPage(main, LISTS.connections);
    case 'channels': return listPage(main, LISTS.channels);
    case 'exchanges': return parts.length > 2 ? exchangePage(main, parts[1], parts[2]) : listPage(main, LISTS.exchanges);
    case 'queues': return parts.length > 2 ? queuePage(main, parts[1], parts[2]) : listPage(main, LISTS.queues);
    case 'admin': return adminPage(main);
    default: return overviewPage(main);
  }
}

// --------------------------------------------------------------- overview --

function overviewPage(main) {
  const body = el('div');
  main.append(el('h2', {}, 'Overview'), body);
  poll(async () => {
    // (Nodes are for the monitoring and administrator tags, as in RabbitMQ.)
    const [o, nodes] = await Promise.all([api('GET', '/overview'), can('monitor') ? api('GET', '/nodes') : null]);
    const ms = o.message_stats || {};
    const rate = (k) => get(ms, `${k}_details.rate`) || 0;
    const rates = remember('overview-rates', {
      published: rate('publish'), confirmed: rate('confirm'), delivered: rate('deliver_get'),
      acknowledged: rate('ack'), redelivered: rate('redeliver'), returned: rate('return_unroutable'),
      'dead-lettered': rate('dead_lettered'),
    });
    const qt = o.queue_totals || {};
    const queued = remember('overview-queued', { ready: qt.messages_ready || 0, unacknowledged: qt.messages_unacknowledged || 0 });
    const series = (h) => Object.keys(h[h.length - 1]).map((name) => ({ name, values: h.map((x) => x[name]) }));
    const totals = o.object_totals || {};
    body.replaceChildren(
      el('section', { 'aria-label': 'Totals' },
        el('div', { class: 'tiles' },
          ['connections', 'channels', 'exchanges', 'queues', 'consumers'].map((k) => el('div', { class: 'tile', id: `total-${k}` }, el('b', {}, fmtNum(totals[k] || 0)), el('span', {}, k))),
          el('div', { class: 'tile' }, el('b', {}, fmtNum(qt.messages || 0)), el('span', {}, 'messages queued')))),
      el('section', {}, el('h3', {}, 'Message rates (last 5 minutes)'), chart('Messages per second', series(rates))),
      el('section', {}, el('h3', {}, 'Queued messages'), chart('Messages', series(queued))),
      el('section', {}, el('h3', {}, 'Nodes'), nodes ? nodesTable(nodes, o.listeners || []) : el('p', {}, `Node ${o.node}: its details need the monitoring tag.`)),
      el('p', {}, `${o.product_name || 'Warren'} ${o.product_version || ''}, cluster ${o.cluster_name || ''}`));
  });
}

function nodesTable(nodes, listeners) {
  const alarm = (on, what) => (on ? el('span', { class: 'alarm' }, `${what} alarm`) : null);
  return el('table', {},
    el('thead', {}, el('tr', {}, ['Node', 'Memory', 'Disk free', 'File descriptors', 'Sockets', 'Uptime', 'Alarms', 'Listeners'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, nodes.map((n) => el('tr', {},
      el('td', {}, n.name, n.running === false ? el('span', { class: 'alarm' }, ' (down)') : null),
      el('td', {}, `${fmtBytes(n.mem_used)} of ${fmtBytes(n.mem_limit)}`),
      el('td', {}, `${fmtBytes(n.disk_free)} (limit ${fmtBytes(n.disk_free_limit)})`),
      el('td', {}, `${fmtNum(n.fd_used)} of ${fmtNum(n.fd_total)}`),
      el('td', {}, `${fmtNum(n.sockets_used)} of ${fmtNum(n.sockets_total)}`),
      el('td', {}, n.uptime !== undefined ? fmtDuration(n.uptime) : ''),
      el('td', {}, alarm(n.mem_alarm, 'memory'), ' ', alarm(n.disk_free_alarm, 'disk'), !n.mem_alarm && !n.disk_free_alarm ? el('span', { class: 'ok' }, 'none') : null),
      el('td', {}, listeners.filter((l) => l.node === n.name).map((l) => `${l.protocol}:${l.port}`).join(', '))))));
}

// ------------------------------------------------------------------ lists --

const vhostLink = (kind) => (row) => el('a', { href: `#/${kind}/${enc(row.vhost)}/${enc(row.name)}` }, row.name === '' ? '(AMQP default)' : row.name);

const LISTS = {
  connections: {
    title: 'Connections', path: '/connections', byVhost: (v) => `/vhosts/${enc(v)}/connections`, sort: 'name',
    columns: [
      { key: 'name', label: 'Name', render: (r) => el('a', { href: `#/connections/${enc(r.name)}` }, r.name) },
      { key: 'user', label: 'User' }, { key: 'vhost', label: 'Virtual host' },
      { key: 'channels', label: 'Channels', num: true },
      { key: 'recv_oct_details.rate', label: 'From client', num: true, fmt: (v) => `${fmtBytes(v)}/s` },
      { key: 'send_oct_details.rate', label: 'To client', num: true, fmt: (v) => `${fmtBytes(v)}/s` },
    ],
  },
  channels: {
    title: 'Channels', path: '/channels', byVhost: (v) => `/vhosts/${enc(v)}/channels`, sort: 'name',
    columns: [
      { key: 'name', label: 'Channel' }, { key: 'user', label: 'User' },
      { key: 'confirm', label: 'Mode', render: (r) => (r.confirm ? 'confirm' : r.transactional ? 'transactional' : '') },
      { key: 'prefetch_count', label: 'Prefetch', num: true },
      { key: 'messages_unacknowledged', label: 'Unacked', num: true },
      { key: 'consumer_count', label: 'Consumers', num: true },
      { key: 'message_stats.publish_details.rate', label: 'Publish', num: true, fmt: fmtRate },
      { key: 'message_stats.deliver_get_details.rate', label: 'Deliver', num: true, fmt: fmtRate },
    ],
  },
  exchanges: {
    title: 'Exchanges', path: '/exchanges', byVhost: (v) => `/exchanges/${enc(v)}`, sort: 'name',
    columns: [
      { key: 'vhost', label: 'Virtual host', narrow: true, phone: false },
      { key: 'name', label: 'Name', render: vhostLink('exchanges') },
      { key: 'type', label: 'Type' },
      { key: 'durable', label: 'Durable', render: (r) => (r.durable ? 'D' : '') },
      { key: 'message_stats.publish_in_details.rate', label: 'In', num: true, fmt: fmtRate },
      { key: 'message_stats.publish_out_details.rate', label: 'Out', num: true, fmt: fmtRate },
    ],
  },
  queues: {
    title: 'Queues', path: '/queues', byVhost: (v) => `/queues/${enc(v)}`, sort: 'name',
    columns: [
      { key: 'vhost', label: 'Virtual host', narrow: true, phone: false },
      { key: 'name', label: 'Name', render: vhostLink('queues') },
      { key: 'type', label: 'Type', phone: false },
      { key: 'policy', label: 'Policy', narrow: true, phone: false },
      { key: 'messages_ready', label: 'Ready', num: true, fmt: fmtNum },
      { key: 'messages_unacknowledged', label: 'Unacked', num: true, fmt: fmtNum },
      { key: 'consumers', label: 'Consumers', num: true, phone: false },
      { key: 'message_stats.publish_details.rate', label: 'Incoming', num: true, fmt: fmtRate },
      { key: 'message_stats.deliver_get_details.rate', label: 'Deliver/get', num: true, fmt: fmtRate },
    ],
  },
};

// A list with RabbitMQ's API paging, name filter (substring or regular
// expression) and sorting, refreshed every 5 s.
function listPage(main, spec, extra) {
  const opts = { page: 1, page_size: 100, name: '', use_regex: false, sort: spec.sort, sort_reverse: false };
  const name = el('input', { id: 'filter', type: 'search', placeholder: 'name contains…' });
  const regex = el('input', { id: 'filter-regex', type: 'checkbox' });
  const size = el('select', { id: 'page-size' }, [20, 100, 500].map((n) => el('option', { value: n, selected: n === 100 }, n)));
  const table = el('div', { id: 'list' });
  const pager = el('div', { class: 'pager' });
  const apply = () => { opts.name = name.value; opts.use_regex = regex.checked; opts.page = 1; opts.page_size = Number(size.value); refresh(); };
  let typing = null;
  name.addEventListener('input', () => { clearTimeout(typing); typing = setTimeout(apply, 250); });
  regex.addEventListener('change', apply);
  size.addEventListener('change', apply);
  main.append(el('h2', {}, spec.title + (state.vhost ? ` in ${state.vhost}` : '')),
    el('div', { class: 'toolbar', role: 'search' },
      el('label', { for: 'filter' }, 'Filter', name),
      el('label', { class: 'check', for: 'filter-regex' }, regex, 'regular expression'),
      el('label', { for: 'page-size' }, 'Per page', size)),
    table, pager, ...(extra ? [extra] : []));
  async function refresh() {
    const q = new URLSearchParams({ page: opts.page, page_size: opts.page_size, pagination: 'true', sort: opts.sort, sort_reverse: opts.sort_reverse });
    if (opts.name) { q.set('name', opts.name); q.set('use_regex', opts.use_regex); }
    const path = state.vhost ? spec.byVhost(state.vhost) : spec.path;
    let r;
    try {
      r = await api('GET', `${path}?${q}`);
    } catch (e) {
      table.replaceChildren(errorBox(e));
      return;
    }
    const cols = spec.columns.filter((c) => !(c.narrow && state.vhost));
    const th = (c) => {
      const sorted = opts.sort === c.key;
      const t = el('th', {
        scope: 'col', class: [c.num ? 'num' : '', c.phone === false ? 'hide-narrow' : ''].join(' ').trim() || null, tabindex: 0,
        'aria-sort': sorted ? (opts.sort_reverse ? 'descending' : 'ascending') : 'none',
      }, c.label, sorted ? (opts.sort_reverse ? ' ▼' : ' ▲') : '');
      const resort = () => { opts.sort_reverse = sorted ? !opts.sort_reverse : false; opts.sort = c.key; refresh(); };
      t.addEventListener('click', resort);
      t.addEventListener('keydown', (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); resort(); } });
      return t;
    };
    const td = (c, row) => {
      const v = get(row, c.key);
      return el('td', { class: [c.num ? 'num' : '', c.phone === false ? 'hide-narrow' : ''].join(' ').trim() || null }, c.render ? c.render(row) : c.fmt ? c.fmt(v) : v === undefined || v === null ? '' : String(v));
    };
    table.replaceChildren(r.items.length === 0
      ? el('p', { class: 'notice' }, opts.name ? 'Nothing matches the filter.' : `No ${spec.title.toLowerCase()}.`)
      : el('table', {}, el('thead', {}, el('tr', {}, cols.map(th))), el('tbody', {}, r.items.map((row) => el('tr', {}, cols.map((c) => td(c, row)))))));
    const go = (p) => { opts.page = p; refresh(); };
    pager.replaceChildren(
      el('button', { class: 'secondary', disabled: r.page <= 1, onclick: () => go(r.page - 1), 'aria-label': 'Previous page' }, '‹'),
      el('span', { id: 'page-info' }, `Page ${r.page} of ${Math.max(1, r.page_count)} — ${fmtNum(r.filtered_count)} shown of ${fmtNum(r.total_count)}`),
      el('button', { class: 'secondary', disabled: r.page >= r.page_count, onclick: () => go(r.page + 1), 'aria-label': 'Next page' }, '›'));
  }
  poll(refresh);
}

// ------------------------------------------------------------ one queue --

function kv(pairs) {
  return el('dl', { class: 'kv' }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== '').map(([k, v]) => [el('dt', {}, k), el('dd', {}, v instanceof Node ? v : String(v))]));
}

function jsonText(v) {
  return el('pre', {}, JSON.stringify(v, null, 1));
}

function queuePage(main, vhost, name) {
  const base = `/queues/${enc(vhost)}/${enc(name)}`;
  const summary = el('div');
  const charts = el('div');
  const bindings = el('div');
  const consumers = el('div');
  main.append(el('h2', {}, 'Queue ', el('span', { class: 'path', id: 'queue-name' }, name), ` in ${vhost}`), summary, charts,
    el('h3', {}, 'Consumers'), consumers, el('h3', {}, 'Bindings'), bindings);
  const writable = can('manage');
  if (writable) main.append(queueActions(vhost, name, base));
  const key = `queue:${vhost}/${name}`;
  let deadLetterKey = null;
  let deadLetterQueues = null;
  poll(async () => {
    const q = await api('GET', base);
    const ms = q.message_stats || {};
    const rate = (k) => get(ms, `${k}_details.rate`) || 0;
    const rates = remember(`${key}:rates`, { incoming: rate('publish'), delivered: rate('deliver_get'), acknowledged: rate('ack'), redelivered: rate('redeliver') });
    const depth = remember(`${key}:depth`, { ready: q.messages_ready || 0, unacknowledged: q.messages_unacknowledged || 0 });
    const series = (h) => Object.keys(h[h.length - 1]).map((n) => ({ name: n, values: h.map((x) => x[n]) }));
    const args = q.arguments || {};
    const eff = q.effective_policy_definition || {};
    const dlx = args['x-dead-letter-exchange'] ?? eff['dead-letter-exchange'];
    const dlk = args['x-dead-letter-routing-key'] ?? eff['dead-letter-routing-key'];
    summary.replaceChildren(kv([
      ['Type', q.type], ['Node', q.node], ['State', q.state],
      ['Features', [q.durable ? 'durable' : 'transient', q.auto_delete ? 'auto-delete' : '', q.exclusive ? 'exclusive' : ''].filter(Boolean).join(', ')],
      ['Ready', el('span', { id: 'queue-ready' }, fmtNum(q.messages_ready))],
      ['Unacknowledged', fmtNum(q.messages_unacknowledged)],
      ['Consumers', fmtNum(q.consumers)], ['Consumer utilisation', q.consumer_utilisation !== undefined ? `${Math.round(q.consumer_utilisation * 100)}%` : ''],
      ['Policy', q.policy || 'none'], ['Operator policy', q.operator_policy || 'none'],
      ['Effective policy', Object.keys(eff).length ? jsonText(eff) : 'none'],
      ['Arguments', Object.keys(args).length ? jsonText(args) : 'none'],
      ['Dead letters', dlx !== undefined ? el('span', { id: 'dead-letter-path' }, 'to exchange ', dlx === '' ? el('span', {}, '(AMQP default)') : el('a', { href: `#/exchanges/${enc(vhost)}/${enc(dlx)}` }, dlx), dlk !== undefined ? ` with routing key ${dlk}` : ' with their own routing keys') : 'dropped (no dead-letter exchange)'],
    ]));
    if (dlx !== undefined && dlk !== undefined && deadLetterKey !== `${dlx}\u0000${dlk}`) {
      deadLetterKey = `${dlx}\u0000${dlk}`;
      deadLetterQueues = await api('POST', `/exchanges/${enc(vhost)}/${enc(dlx || 'amq.default')}/route`, { routing_key: dlk })
        .then((t) => t.queues).catch(() => null);
    }
    const path = summary.querySelector('#dead-letter-path');
    if (path && dlk !== undefined && deadLetterQueues) {
      path.append(deadLetterQueues.length
        ? el('span', {}, ', which reaches ', deadLetterQueues.map((d, i) => [i ? ', ' : '', el('a', { href: `#/queues/${enc(vhost)}/${enc(d)}` }, d)]))
        : el('span', { class: 'alarm' }, ', which reaches no queue: they are lost'));
    }
    charts.replaceChildren(chart('Messages per second', series(rates)), chart('Messages', series(depth)));
    const cs = q.consumer_details || [];
    consumers.replaceChildren(cs.length === 0 ? el('p', {}, 'None.') : el('table', {},
      el('thead', {}, el('tr', {}, ['Tag', 'Channel', 'Ack required', 'Prefetch'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, cs.map((c) => el('tr', {}, el('td', {}, c.consumer_tag), el('td', {}, get(c, 'channel_details.name') || ''), el('td', {}, c.ack_required ? 'yes' : 'no'), el('td', {}, String(c.prefetch_count ?? '')))))));
    const bs = await api('GET', `${base}/bindings`);
    bindings.replaceChildren(bindingsTable(vhost, bs, 'source', writable));
  });
}

function bindingsTable(vhost, bs, show, writable) {
  if (bs.length === 0) return el('p', {}, 'None.');
  return el('table', { id: `bindings-${show}` },
    el('thead', {}, el('tr', {}, [show === 'source' ? 'From exchange' : 'To', 'Routing key', 'Arguments', writable ? '' : null].filter((x) => x !== null).map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, bs.map((b) => {
      const other = show === 'source' ? b.source : b.destination;
      const status = el('span');
      const unbind = writable && b.source !== '' ? el('button', {
        class: 'danger',
        'aria-label': `Unbind ${b.routing_key} from ${b.source}`,
        onclick: () => act(status, () => api('DELETE', `/bindings/${enc(vhost)}/e/${enc(b.source)}/${b.destination_type === 'queue' ? 'q' : 'e'}/${enc(b.destination)}/${enc(b.properties_key)}`), () => 'Unbound').then(() => route()),
      }, 'Unbind') : null;
      return el('tr', {},
        el('td', {}, other === '' ? '(AMQP default)' : el('a', { href: `#/${show === 'source' || b.destination_type === 'exchange' ? 'exchanges' : 'queues'}/${enc(vhost)}/${enc(other)}` }, other)),
        el('td', {}, b.routing_key), el('td', {}, Object.keys(b.arguments || {}).length ? JSON.stringify(b.arguments) : ''),
        writable ? el('td', {}, unbind, status) : null);
    })));
}

function queueActions(vhost, name, base) {
  const out = el('section', { 'aria-label': 'Queue actions' });
  // Bind.
  const bx = el('input', { id: 'bind-exchange', required: true });
  const bk = el('input', { id: 'bind-key' });
  const bstatus = el('div');
  const bind = el('form', { class: 'inline', id: 'bind-form' },
    el('label', { for: 'bind-exchange' }, 'From exchange', bx), el('label', { for: 'bind-key' }, 'Routing key', bk),
    el('button', { type: 'submit' }, 'Bind'), bstatus);
  bind.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(bstatus, () => api('POST', `/bindings/${enc(vhost)}/e/${enc(bx.value)}/q/${enc(name)}`, { routing_key: bk.value, arguments: {} }), () => 'Bound').then((r) => { if (r !== undefined) route(); });
  });
  // Publish (through the default exchange, as RabbitMQ's queue page does).
  const payload = el('textarea', { id: 'publish-payload' });
  const persistent = el('input', { id: 'publish-persistent', type: 'checkbox' });
  const pstatus = el('div', { id: 'publish-status' });
  const publish = el('form', { class: 'stack', id: 'publish-form' },
    el('label', { for: 'publish-payload' }, 'Payload', payload),
    el('label', { class: 'check', for: 'publish-persistent' }, persistent, 'persistent'),
    el('button', { type: 'submit' }, 'Publish message'), pstatus);
  publish.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(pstatus, () => api('POST', `/exchanges/${enc(vhost)}/amq.default/publish`, {
      routing_key: name, payload: payload.value, payload_encoding: 'string',
      properties: persistent.checked ? { delivery_mode: 2 } : {},
    }), (r) => (r.routed ? 'Published.' : 'Not routed.'));
  });
  // Get.
  const count = el('input', { id: 'get-count', type: 'number', min: 1, value: 1 });
  const mode = el('select', { id: 'get-ackmode' },
    [['ack_requeue_true', 'Nack, requeue'], ['ack_requeue_false', 'Ack (remove)'], ['reject_requeue_true', 'Reject, requeue'], ['reject_requeue_false', 'Reject, drop']].map(([v, l]) => el('option', { value: v }, l)));
  const got = el('div', { id: 'get-result' });
  const getForm = el('form', { class: 'inline', id: 'get-form' },
    el('label', { for: 'get-ackmode' }, 'Ack mode', mode), el('label', { for: 'get-count' }, 'Messages', count),
    el('button', { type: 'submit' }, 'Get messages'));
  getForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(got, () => api('POST', `${base}/get`, { count: Number(count.value), ackmode: mode.value, encoding: 'auto' })).then((ms) => {
      if (ms === undefined) return;
      got.append(ms.length === 0 ? el('p', { class: 'notice' }, 'Queue is empty.') : el('table', {},
        el('thead', {}, el('tr', {}, ['#', 'Routing key', 'Redelivered', 'Properties', 'Payload'].map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ms.map((m, i) => el('tr', {}, el('td', {}, String(i + 1)), el('td', {}, m.routing_key), el('td', {}, m.redelivered ? 'yes' : 'no'),
          el('td', {}, JSON.stringify(m.properties || {})), el('td', { class: 'payload' }, m.payload))))));
    });
  });
  // Purge, delete.
  const dstatus = el('div');
  const danger = el('div', { class: 'toolbar' },
    el('button', { class: 'danger', id: 'purge', onclick: () => { if (confirm(`Purge every ready message of ${name}?`)) act(dstatus, () => api('DELETE', `${base}/contents`), () => 'Purged.'); } }, 'Purge'),
    el('button', { class: 'danger', id: 'delete-queue', onclick: () => { if (confirm(`Delete queue ${name}?`)) act(dstatus, () => api('DELETE', base)).then((r) => { if (r !== undefined) location.hash = '#/queues'; }); } }, 'Delete queue'),
    dstatus);
  out.append(el('h3', {}, 'Add binding'), bind, el('h3', {}, 'Publish message'), publish, el('h3', {}, 'Get messages'), getForm, got, el('h3', {}, 'Purge or delete'), danger);
  return out;
}

// --------------------------------------------------------- one exchange --

function exchangePage(main, vhost, name) {
  const base = `/exchanges/${enc(vhost)}/${enc(name === '' ? 'amq.default' : name)}`;
  const summary = el('div');
  const from = el('div');
  const to = el('div');
  main.append(el('h2', {}, 'Exchange ', el('span', { class: 'path' }, name || '(AMQP default)'), ` in ${vhost}`), summary,
    el('h3', {}, 'Bindings from it'), from, el('h3', {}, 'Bindings to it'), to);
  main.append(el('h3', {}, "Why didn't my message arrive?"), traceForm(vhost, name));
  const writable = can('manage');
  if (writable) {
    const key = el('input', { id: 'xpublish-key' });
    const payload = el('textarea', { id: 'xpublish-payload' });
    const status = el('div', { id: 'xpublish-status' });
    const form = el('form', { class: 'stack', id: 'xpublish-form' },
      el('label', { for: 'xpublish-key' }, 'Routing key', key), el('label', { for: 'xpublish-payload' }, 'Payload', payload),
      el('button', { type: 'submit' }, 'Publish message'), status);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      act(status, () => api('POST', `${base}/publish`, { routing_key: key.value, payload: payload.value, payload_encoding: 'string', properties: {} }),
        (r) => (r.routed ? 'Published and routed.' : 'Published, but routed to no queue.'));
    });
    main.append(el('h3', {}, 'Publish message'), form);
  }
  poll(async () => {
    const x = await api('GET', base);
    const ms = x.message_stats || {};
    summary.replaceChildren(kv([
      ['Type', x.type], ['Features', [x.durable ? 'durable' : 'transient', x.auto_delete ? 'auto-delete' : '', x.internal ? 'internal' : ''].filter(Boolean).join(', ')],
      ['Arguments', Object.keys(x.arguments || {}).length ? jsonText(x.arguments) : 'none'],
      ['Published in', ms.publish_in !== undefined ? `${fmtNum(ms.publish_in)} (${fmtRate(get(ms, 'publish_in_details.rate'))})` : '0'],
      ['Routed out', ms.publish_out !== undefined ? `${fmtNum(ms.publish_out)} (${fmtRate(get(ms, 'publish_out_details.rate'))})` : '0'],
    ]));
    if (name === '') return;
    const [src, dst] = await Promise.all([api('GET', `${base}/bindings/source`), api('GET', `${base}/bindings/destination`)]);
    from.replaceChildren(bindingsTableFrom(vhost, src));
    to.replaceChildren(bindingsTable(vhost, dst, 'source', false));
  });
}

// Routing explained: the broker's router does a dry run for a routing key
// (and headers) and says which bindings match, hop by hop.
function traceForm(vhost, name) {
  const key = el('input', { id: 'trace-key' });
  const headers = el('textarea', { id: 'trace-headers', placeholder: '{"x-tenant": "a"} (for headers exchanges)' });
  const result = el('div', { id: 'trace-result' });
  const form = el('form', { class: 'stack', id: 'trace-form' },
    el('label', { for: 'trace-key' }, 'Routing key', key),
    el('label', { for: 'trace-headers' }, 'Headers (JSON, optional)', headers),
    el('button', { type: 'submit' }, 'Show where it goes'), result);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(result, async () => {
      let h;
      if (headers.value.trim()) {
        try { h = JSON.parse(headers.value); } catch (e) { throw new Error(`The headers are not JSON: ${e.message}`); }
      }
      return api('POST', `/exchanges/${enc(vhost)}/${enc(name || 'amq.default')}/route`, { routing_key: key.value, headers: h });
    }).then((t) => { if (t) result.append(traceView(vhost, t)); });
  });
  return form;
}

function traceView(vhost, t) {
  const qlink = (q) => el('a', { href: `#/queues/${enc(vhost)}/${enc(q)}` }, q);
  const hops = t.hops.map((h) => el('li', {},
    `Exchange ${h.exchange}: `,
    h.bindings.length === 0 ? 'no binding matches' : el('ul', {}, h.bindings.map((b) => el('li', {},
      `binding with key "${b.routing_key}"${Object.keys(b.arguments || {}).length ? ` and arguments ${JSON.stringify(b.arguments)}` : ''} → ${b.destination_type} `,
      b.destination_type === 'queue' ? qlink(b.destination) : b.destination))),
    h.alternate_exchange ? el('span', {}, `; passed to its alternate exchange ${h.alternate_exchange}`) : null));
  return el('div', { class: 'notice', role: 'status' },
    hops.length ? el('ol', {}, hops) : null,
    t.routed ? el('p', { id: 'trace-queues' }, 'Reaches: ', t.queues.map((q, i) => [i ? ', ' : '', qlink(q)])) :
      el('p', { id: 'trace-queues' }, 'Reaches no queue: the message is dropped, or returned to its publisher if it was mandatory.'));
}

function bindingsTableFrom(vhost, bs) {
  if (bs.length === 0) return el('p', {}, 'None.');
  return el('table', {},
    el('thead', {}, el('tr', {}, ['To', 'Type', 'Routing key', 'Arguments'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, bs.map((b) => el('tr', {},
      el('td', {}, el('a', { href: `#/${b.destination_type === 'queue' ? 'queues' : 'exchanges'}/${enc(vhost)}/${enc(b.destination)}` }, b.destination)),
      el('td', {}, b.destination_type), el('td', {}, b.routing_key), el('td', {}, Object.keys(b.arguments || {}).length ? JSON.stringify(b.arguments) : '')))));
}

// ------------------------------------------------------- one connection --

function connectionPage(main, name) {
  const base = `/connections/${enc(name)}`;
  const summary = el('div');
  const channels = el('div');
  main.append(el('h2', {}, 'Connection ', el('span', { class: 'path' }, name)), summary, el('h3', {}, 'Channels'), channels);
  if (can('manage')) {
    const reason = el('input', { id: 'close-reason', value: 'Closed via management UI' });
    const status = el('div');
    const form = el('form', { class: 'inline' }, el('label', { for: 'close-reason' }, 'Reason', reason), el('button', { class: 'danger', type: 'submit' }, 'Close connection'), status);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      act(status, () => api('DELETE', base, undefined, { 'x-reason': reason.value }), () => 'Closed.');
    });
    main.append(el('h3', {}, 'Close'), form);
  }
  poll(async () => {
    const c = await api('GET', base);
    summary.replaceChildren(kv([
      ['User', c.user], ['Virtual host', c.vhost], ['Client', `${c.peer_host}:${c.peer_port}`], ['Protocol', c.protocol],
      ['TLS', c.ssl ? 'yes' : 'no'], ['Heartbeat', c.timeout !== undefined ? `${c.timeout} s` : ''], ['Frame max', c.frame_max],
      ['From client', `${fmtBytes(c.recv_oct)} (${fmtBytes(get(c, 'recv_oct_details.rate'))}/s)`],
      ['To client', `${fmtBytes(c.send_oct)} (${fmtBytes(get(c, 'send_oct_details.rate'))}/s)`],
      ['Client properties', jsonText(c.client_properties || {})],
    ]));
    const chs = await api('GET', `${base}/channels`);
    channels.replaceChildren(chs.length === 0 ? el('p', {}, 'None.') : el('table', {},
      el('thead', {}, el('tr', {}, ['Channel', 'Prefetch', 'Unacked', 'Consumers'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, chs.map((ch) => el('tr', {}, el('td', {}, ch.name), el('td', {}, String(ch.prefetch_count)), el('td', {}, String(ch.messages_unacknowledged)), el('td', {}, String(ch.consumer_count)))))));
  });
}

// ------------------------------------------------------------------ admin --

function adminPage(main) {
  main.append(el('h2', {}, 'Admin'));
  const sections = el('div');
  main.append(sections);
  const load = async () => {
    const parts = [];
    if (can('admin')) parts.push(await usersSection(), await vhostsSection(), await permissionsSection(), await topicPermissionsSection());
    parts.push(await policiesSection());
    if (can('admin')) parts.push(definitionsSection());
    sections.replaceChildren(...parts);
  };
  load().catch((e) => sections.replaceChildren(errorBox(e)));
}

function simpleTable(headers, rows) {
  return el('table', {}, el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))), el('tbody', {}, rows.map((r) => el('tr', {}, r.map((c) => el('td', {}, c))))));
}

async function usersSection() {
  const users = await api('GET', '/users');
  const status = el('div');
  const name = el('input', { id: 'user-name', required: true, autocomplete: 'off' });
  const pass = el('input', { id: 'user-pass', type: 'password', autocomplete: 'new-password' });
  const tags = el('input', { id: 'user-tags', placeholder: 'administrator, monitoring, …' });
  const form = el('form', { class: 'inline', id: 'user-form' },
    el('label', { for: 'user-name' }, 'Username', name), el('label', { for: 'user-pass' }, 'Password', pass),
    el('label', { for: 'user-tags' }, 'Tags', tags), el('button', { type: 'submit' }, 'Add or update user'), status);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(status, () => api('PUT', `/users/${enc(name.value)}`, { password: pass.value, tags: tags.value }), () => 'Saved.').then((r) => { if (r !== undefined) route(); });
  });
  return el('section', { id: 'users' }, el('h3', {}, 'Users'),
    simpleTable(['Name', 'Tags', ''], users.map((u) => [u.name, Array.isArray(u.tags) ? u.tags.join(', ') : u.tags,
      u.name === state.user ? '' : el('button', { class: 'danger', 'aria-label': `Delete user ${u.name}`, onclick: () => { if (confirm(`Delete user ${u.name}?`)) act(status, () => api('DELETE', `/users/${enc(u.name)}`)).then(() => route()); } }, 'Delete')])),
    form);
}

async function vhostsSection() {
  const vhosts = await api('GET', '/vhosts');
  const limits = await api('GET', '/vhost-limits');
  const status = el('div');
  const name = el('input', { id: 'vhost-name', required: true });
  const form = el('form', { class: 'inline', id: 'vhost-form' }, el('label', { for: 'vhost-name' }, 'Name', name), el('button', { type: 'submit' }, 'Add virtual host'), status);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(status, () => api('PUT', `/vhosts/${enc(name.value)}`, {}), () => 'Added.').then((r) => { if (r !== undefined) start(); });
  });
  const limitOf = (v) => JSON.stringify((limits.find((l) => l.vhost === v) || {}).value || {});
  const lname = el('select', { id: 'limit-name' }, ['max-connections', 'max-queues'].map((n) => el('option', { value: n }, n)));
  const lvhost = el('select', { id: 'limit-vhost' }, vhosts.map((v) => el('option', { value: v.name }, v.name)));
  const lvalue = el('input', { id: 'limit-value', type: 'number', value: -1 });
  const lform = el('form', { class: 'inline', id: 'limit-form' }, el('label', { for: 'limit-vhost' }, 'Virtual host', lvhost), el('label', { for: 'limit-name' }, 'Limit', lname),
    el('label', { for: 'limit-value' }, 'Value (negative: none)', lvalue), el('button', { type: 'submit' }, 'Set limit'));
  lform.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(status, () => api('PUT', `/vhost-limits/${enc(lvhost.value)}/${lname.value}`, { value: Number(lvalue.value) }), () => 'Limit set.').then((r) => { if (r !== undefined) route(); });
  });
  return el('section', { id: 'vhosts' }, el('h3', {}, 'Virtual hosts'),
    simpleTable(['Name', 'Messages', 'Limits', ''], vhosts.map((v) => [v.name, fmtNum(v.messages || 0), limitOf(v.name),
      el('button', { class: 'danger', 'aria-label': `Delete virtual host ${v.name}`, onclick: () => { if (confirm(`Delete virtual host ${v.name} and everything in it?`)) act(status, () => api('DELETE', `/vhosts/${enc(v.name)}`)).then(() => start()); } }, 'Delete')])),
    form, lform);
}

async function permissionsSection() {
  const perms = await api('GET', '/permissions');
  const status = el('div');
  const f = (id, label, value) => { const i = el('input', { id, value }); return [i, el('label', { for: id }, label, i)]; };
  const [user, ul] = f('perm-user', 'User', '');
  const [vhost, vl] = f('perm-vhost', 'Virtual host', state.vhost || '/');
  const [conf, cl] = f('perm-configure', 'Configure', '.*');
  const [write, wl] = f('perm-write', 'Write', '.*');
  const [read, rl] = f('perm-read', 'Read', '.*');
  const form = el('form', { class: 'inline', id: 'perm-form' }, ul, vl, cl, wl, rl, el('button', { type: 'submit' }, 'Set permissions'), status);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(status, () => api('PUT', `/permissions/${enc(vhost.value)}/${enc(user.value)}`, { configure: conf.value, write: write.value, read: read.value }), () => 'Set.').then((r) => { if (r !== undefined) route(); });
  });
  return el('section', { id: 'permissions' }, el('h3', {}, 'Permissions'),
    simpleTable(['User', 'Virtual host', 'Configure', 'Write', 'Read', ''], perms.map((p) => [p.user, p.vhost, p.configure, p.write, p.read,
      el('button', { class: 'danger', 'aria-label': `Clear permissions of ${p.user} in ${p.vhost}`, onclick: () => act(status, () => api('DELETE', `/permissions/${enc(p.vhost)}/${enc(p.user)}`)).then(() => route()) }, 'Clear')])),
    form);
}

async function topicPermissionsSection() {
  const perms = await api('GET', '/topic-permissions');
  const status = el('div');
  const f = (id, label, value) => { const i = el('input', { id, value }); return [i, el('label', { for: id }, label, i)]; };
  const [user, ul] = f('topic-user', 'User', '');
  const [vhost, vl] = f('topic-vhost', 'Virtual host', state.vhost || '/');
  const [exchange, xl] = f('topic-exchange', 'Topic exchange', 'amq.topic');
  const [write, wl] = f('topic-write', 'Write (routing keys)', '.*');
  const [read, rl] = f('topic-read', 'Read (binding keys)', '.*');
  const form = el('form', { class: 'inline', id: 'topic-form' }, ul, vl, xl, wl, rl, el('button', { type: 'submit' }, 'Set topic permissions'), status);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(status, () => api('PUT', `/topic-permissions/${enc(vhost.value)}/${enc(user.value)}`, { exchange: exchange.value, write: write.value, read: read.value }), () => 'Set.').then((r) => { if (r !== undefined) route(); });
  });
  return el('section', { id: 'topic-permissions' }, el('h3', {}, 'Topic permissions'),
    perms.length === 0 ? el('p', {}, 'None: topic exchanges check nothing beyond the permissions above.') :
      simpleTable(['User', 'Virtual host', 'Exchange', 'Write', 'Read', ''], perms.map((p) => [p.user, p.vhost, p.exchange, p.write, p.read,
        el('button', { class: 'danger', 'aria-label': `Clear the topic permissions of ${p.user} in ${p.vhost}`, onclick: () => act(status, () => api('DELETE', `/topic-permissions/${enc(p.vhost)}/${enc(p.user)}`)).then(() => route()) }, 'Clear')])),
    form);
}

async function policiesSection() {
  const path = state.vhost ? `/policies/${enc(state.vhost)}` : '/policies';
  const policies = await api('GET', path);
  const status = el('div');
  const name = el('input', { id: 'policy-name', required: true });
  const vhost = el('input', { id: 'policy-vhost', value: state.vhost || '/' });
  const pattern = el('input', { id: 'policy-pattern', value: '.*' });
  const applyTo = el('select', { id: 'policy-apply-to' }, ['all', 'queues', 'exchanges'].map((v) => el('option', { value: v }, v)));
  const priority = el('input', { id: 'policy-priority', type: 'number', value: 0 });
  const definition = el('textarea', { id: 'policy-definition', placeholder: '{"max-length": 1000, "dead-letter-exchange": "dlx"}' });
  const form = el('form', { class: 'stack', id: 'policy-form' },
    el('label', { for: 'policy-name' }, 'Name', name), el('label', { for: 'policy-vhost' }, 'Virtual host', vhost),
    el('label', { for: 'policy-pattern' }, 'Pattern (regular expression on names)', pattern), el('label', { for: 'policy-apply-to' }, 'Apply to', applyTo),
    el('label', { for: 'policy-priority' }, 'Priority', priority),
    el('label', { for: 'policy-definition' }, 'Definition (JSON: message-ttl, expires, max-length, max-length-bytes, overflow, dead-letter-exchange, dead-letter-routing-key, delivery-limit, alternate-exchange, …)', definition),
    el('button', { type: 'submit' }, 'Add or update policy'), status);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(status, async () => {
      let def;
      try { def = JSON.parse(definition.value || '{}'); } catch (e) { throw new Error(`The definition is not JSON: ${e.message}`); }
      return api('PUT', `/policies/${enc(vhost.value)}/${enc(name.value)}`, { pattern: pattern.value, 'apply-to': applyTo.value, priority: Number(priority.value), definition: def });
    }, () => 'Saved.').then((r) => { if (r !== undefined) route(); });
  });
  return el('section', { id: 'policies' }, el('h3', {}, 'Policies'),
    simpleTable(['Virtual host', 'Name', 'Pattern', 'Apply to', 'Priority', 'Definition', ''], policies.map((p) => [p.vhost, p.name, p.pattern, p['apply-to'], String(p.priority), JSON.stringify(p.definition),
      el('button', { class: 'danger', 'aria-label': `Delete policy ${p.name}`, onclick: () => act(status, () => api('DELETE', `/policies/${enc(p.vhost)}/${enc(p.name)}`)).then(() => route()) }, 'Delete')])),
    form);
}

function definitionsSection() {
  const status = el('div', { id: 'definitions-status' });
  const exportButton = el('button', {
    id: 'export',
    onclick: () => act(status, async () => {
      const path = state.vhost ? `/definitions/${enc(state.vhost)}` : '/definitions';
      const defs = await api('GET', path);
      const a = el('a', { href: URL.createObjectURL(new Blob([JSON.stringify(defs, null, 2)], { type: 'application/json' })), download: 'warren-definitions.json' });
      document.body.append(a);
      a.click();
      a.remove();
      return defs;
    }, () => 'Downloaded.'),
  }, 'Download definitions');
  const file = el('input', { id: 'import-file', type: 'file', accept: 'application/json,.json' });
  const form = el('form', { class: 'inline', id: 'import-form' }, el('label', { for: 'import-file' }, 'Definitions file', file), el('button', { type: 'submit' }, 'Upload definitions'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    act(status, async () => {
      if (!file.files.length) throw new Error('Choose a definitions file first.');
      let defs;
      try { defs = JSON.parse(await file.files[0].text()); } catch (e) { throw new Error(`The file is not JSON: ${e.message}`); }
      const path = state.vhost ? `/definitions/${enc(state.vhost)}` : '/definitions';
      return api('POST', path, defs);
    }, () => 'Definitions imported.');
  });
  return el('section', { id: 'definitions' }, el('h3', {}, `Definitions${state.vhost ? ` of ${state.vhost}` : ''}`), el('div', { class: 'toolbar' }, exportButton), form, status);
}

// ------------------------------------------------------------------- boot --

window.addEventListener('hashchange', route);
if (state.auth) start(); else renderLogin();
