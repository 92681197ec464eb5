// sigil service map: polls /api/graph every second and draws identities as boxes and flows as
// edges. Every label is user input: text goes into the DOM only through textContent and
// attribute values, never as markup.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const BOX_W = 250;
const BOX_H = 46;
let selected = null;
const hash = /^#edge=(\d+)-(\d+)$/.exec(window.location.hash);
if (hash) {
  selected = hash[1] + '-' + hash[2];
}
let graph = null;

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    e.setAttribute(k, String(v));
  }
  return e;
}

function html(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) {
    e.textContent = String(text);
  }
  if (cls) {
    e.className = cls;
  }
  return e;
}

function clip(s, n) {
  return s.length > n ? s.slice(0, n - 1) + '…' : s;
}

// What a box says: the SPIFFE ID first, else the labels, then the numeric identity.
function title(id) {
  if (id.spiffe_id) {
    return id.spiffe_id;
  }
  const labels = id.labels.filter((l) => !l.startsWith('k8s:io.kubernetes.pod.namespace'));
  if (labels.length > 0) {
    return labels.join(' ');
  }
  return 'identity ' + id.id;
}

function subtitle(id) {
  const eps = Array.from(id.endpoints || []);
  return 'identity ' + id.id + (eps.length ? ' · ' + eps.join(', ') : '');
}

function edgeKey(e) {
  return e.src + '-' + e.dst;
}

function edgeClass(e) {
  return e.denied > 0 ? 'denied' : 'allowed';
}

function edgeText(e) {
  return 'allowed ' + e.allowed + ' · denied ' + e.denied;
}

function layout(ids) {
  const n = ids.length;
  const radius = Math.max(160, (n * (BOX_H + 30)) / Math.PI);
  const w = 2 * radius + BOX_W + 40;
  const h = 2 * radius + BOX_H + 40;
  const pos = new Map();
  ids.forEach((id, i) => {
    const a = (2 * Math.PI * i) / Math.max(n, 1) - Math.PI / 2;
    pos.set(id.id, { x: w / 2 + radius * Math.cos(a), y: h / 2 + radius * Math.sin(a) });
  });
  return { pos, w, h };
}

function select(key) {
  selected = key;
  if (graph) {
    render(graph);
  }
}

function drawMap(g, names) {
  const map = document.getElementById('map');
  map.replaceChildren();
  const { pos, w, h } = layout(g.identities);
  map.setAttribute('width', w);
  map.setAttribute('height', h);
  map.setAttribute('viewBox', '0 0 ' + w + ' ' + h);
  const defs = svg('defs');
  for (const cls of ['allowed', 'denied']) {
    const m = svg('marker', {
      id: 'arrow-' + cls, viewBox: '0 0 10 10', refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse',
    });
    m.appendChild(svg('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow ' + cls }));
    defs.appendChild(m);
  }
  map.appendChild(defs);
  for (const e of g.edges) {
    const a = pos.get(e.src);
    const b = pos.get(e.dst);
    if (!a || !b) {
      continue;
    }
    const cls = edgeClass(e);
    const grp = svg('g', {
      class: 'edge ' + cls + (edgeKey(e) === selected ? ' selected' : ''),
      'data-src': e.src, 'data-dst': e.dst,
    });
    // Stop at the destination box's edge so the arrow shows.
    const dx = b.x - a.x;
    const dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    const t = Math.min(0.45, (BOX_H / 2 + 6) / len);
    const line = svg('line', {
      x1: a.x, y1: a.y, x2: b.x - dx * t, y2: b.y - dy * t,
      'marker-end': 'url(#arrow-' + cls + ')',
    });
    const tip = svg('title');
    tip.textContent = names(e.src) + ' → ' + names(e.dst) + ': ' + edgeText(e);
    line.appendChild(tip);
    grp.appendChild(line);
    const label = svg('text', { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 4, 'text-anchor': 'middle' });
    label.textContent = e.allowed + ' / ' + e.denied;
    grp.appendChild(label);
    grp.addEventListener('click', () => select(edgeKey(e)));
    map.appendChild(grp);
  }
  for (const id of g.identities) {
    const p = pos.get(id.id);
    const grp = svg('g', { class: 'identity', 'data-identity': id.id });
    grp.appendChild(svg('rect', { x: p.x - BOX_W / 2, y: p.y - BOX_H / 2, width: BOX_W, height: BOX_H }));
    const full = svg('title');
    full.textContent = title(id) + '\n' + id.labels.join('\n');
    grp.appendChild(full);
    const t1 = svg('text', { x: p.x, y: p.y - 4, 'text-anchor': 'middle' });
    t1.textContent = clip(title(id), 40);
    grp.appendChild(t1);
    const t2 = svg('text', { x: p.x, y: p.y + 13, 'text-anchor': 'middle', class: 'sub' });
    t2.textContent = clip(subtitle(id), 44);
    grp.appendChild(t2);
    map.appendChild(grp);
  }
}

function drawLists(g, names) {
  const ids = document.getElementById('identities');
  ids.replaceChildren();
  for (const id of g.identities) {
    const li = html('li', undefined, 'identity');
    li.setAttribute('data-identity', id.id);
    li.appendChild(html('strong', title(id)));
    li.appendChild(html('span', ' — ' + subtitle(id) + ' — labels: ' + id.labels.join(', ')));
    ids.appendChild(li);
  }
  const edges = document.getElementById('edges');
  edges.replaceChildren();
  for (const e of g.edges) {
    const li = html('li', undefined, 'edge ' + edgeClass(e) + (edgeKey(e) === selected ? ' selected' : ''));
    li.setAttribute('data-src', e.src);
    li.setAttribute('data-dst', e.dst);
    li.setAttribute('data-allowed', e.allowed);
    li.setAttribute('data-denied', e.denied);
    li.textContent = names(e.src) + ' → ' + names(e.dst) + ': ' + edgeText(e) + ' · replies ' + e.replies;
    li.addEventListener('click', () => select(edgeKey(e)));
    edges.appendChild(li);
  }
}

function drawDetails(g, names) {
  const box = document.getElementById('details');
  box.replaceChildren();
  const e = g.edges.find((x) => edgeKey(x) === selected);
  if (!e) {
    box.appendChild(html('p', 'Click an edge to see its verdicts and the policies that decided them.', 'hint'));
    return;
  }
  box.setAttribute('data-src', e.src);
  box.setAttribute('data-dst', e.dst);
  box.appendChild(html('h3', names(e.src) + ' → ' + names(e.dst)));
  box.appendChild(html('p', 'allowed ' + e.allowed + ', denied ' + e.denied + ', replies ' + e.replies, 'verdicts'));
  const reasons = Object.entries(e.drop_reasons).map(([r, n]) => r + ' ' + n);
  if (reasons.length) {
    box.appendChild(html('p', 'drop reasons: ' + reasons.join(', '), 'reasons'));
  }
  if (e.ports.length) {
    box.appendChild(html('p', 'ports: ' + e.ports.join(', ')));
  }
  if (e.details_dropped) {
    box.appendChild(html('p', e.details_dropped + ' details not kept (bounds)'));
  }
  if (!e.policies.length) {
    box.appendChild(html('p', 'No policy rule named (default allow or default deny).', 'hint'));
    return;
  }
  const table = html('table', undefined, 'policies');
  const head = html('tr');
  for (const c of ['verdict', 'direction', 'kind', 'namespace', 'name', 'rule', 'flows']) {
    head.appendChild(html('th', c));
  }
  table.appendChild(head);
  for (const p of e.policies) {
    const tr = html('tr', undefined, 'policy ' + p.verdict);
    for (const c of [p.verdict, p.direction, p.kind, p.namespace, p.name, p.rule, p.count]) {
      tr.appendChild(html('td', c));
    }
    table.appendChild(tr);
  }
  box.appendChild(table);
}

function render(g) {
  const byId = new Map(g.identities.map((i) => [i.id, i]));
  const names = (n) => (byId.has(n) ? title(byId.get(n)) : 'identity ' + n);
  drawMap(g, names);
  drawLists(g, names);
  drawDetails(g, names);
  const status = document.getElementById('status');
  status.className = '';
  status.textContent = 'node ' + g.node_name + ' · ' + g.flows + ' flows · ' + g.identities.length +
    ' identities · ' + g.edges.length + ' edges' +
    (g.flows_dropped ? ' · ' + g.flows_dropped + ' flows over the edge bound' : '') +
    (g.flows_missed ? ' · ' + g.flows_missed + ' flows missed' : '') +
    (g.lost_events ? ' · ' + g.lost_events + ' events lost' : '');
}

async function poll() {
  try {
    const r = await fetch('/api/graph', { cache: 'no-store' });
    if (!r.ok) {
      throw new Error('HTTP ' + r.status);
    }
    graph = await r.json();
    render(graph);
  } catch (err) {
    const status = document.getElementById('status');
    status.className = 'error';
    status.textContent = 'cannot reach netd: ' + err.message;
  }
  setTimeout(poll, 1000);
}

poll();
