// The InCo web page: sign-in, leaderboard, jobs, one job, models (docs/web.md). Plain JavaScript, no
// build step. Every request carries the team token from sessionStorage as an Authorization header
// (never in a URL, a cookie or storage that outlives the tab); plots come through fetch() with that header and show as
// blob: URLs. Text from the API or the user goes into the page with textContent only, never parsed
// as markup: the page's policy (Trusted Types with no policy allowed) makes any such parsing throw.

const TOKEN_KEY = 'inco.token';
const POLL_MS = 2000;
const CURVES_MS = 10000;
const METHOD_ORDER = ['inco', 'simclr', 'mocov2', 'simsiam', 'supervised'];
const ACTIVE = new Set(['queued', 'running']);
const FORMATS = [['onnx', 'ONNX'], ['torchscript', 'TorchScript'], ['pytorch', 'PyTorch']];

const state = { seq: 0, timer: null, urls: new Set(), files: [] };

// -- small helpers -----------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

/** An element with properties (class, text, data, on<event>, or any DOM property) and children. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'data') Object.assign(node.dataset, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showMessage(node, text, kind = 'error') {
  node.textContent = text;
  node.className = kind;
  node.hidden = false;
}

function hide(node) {
  node.textContent = '';
  node.hidden = true;
}

const pct = (x) => (x * 100).toFixed(2);
const ratioN = (ratio) => Number(ratio.split(':')[1]);
const methodRank = (method) => (METHOD_ORDER.includes(method) ? METHOD_ORDER.indexOf(method) : METHOD_ORDER.length);
const short = (id) => id.slice(0, 8);

/** An API time (ISO 8601; UTC when it names no zone) as local "YYYY-MM-DD HH:MM:SS". */
function when(iso) {
  if (!iso) return '–';
  const stamp = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
  if (Number.isNaN(stamp.getTime())) return iso;
  const two = (n) => String(n).padStart(2, '0');
  return `${stamp.getFullYear()}-${two(stamp.getMonth() + 1)}-${two(stamp.getDate())} ` +
    `${two(stamp.getHours())}:${two(stamp.getMinutes())}:${two(stamp.getSeconds())}`;
}

function schedule(fn, seq) {
  clearTimeout(state.timer);
  state.timer = setTimeout(() => { if (seq === state.seq) fn(); }, POLL_MS);
}

function keepUrl(url) {
  state.urls.add(url);
  return url;
}

function revokeUrls() {
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.urls.clear();
}

// -- the API -----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }

  get readable() {
    return this.status ? `${this.message} (HTTP ${this.status})` : this.message;
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === 'string') return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join('; ');
  } catch {
    // not JSON: the status line says it
  }
  return response.statusText || 'the API refused the request';
}

/**
 * fetch() with the team token. `json`: a body to send as JSON; `as`: 'json' (the parsed body) or
 * 'response'. A 401 signs the page out (the token was revoked); any other error is an ApiError.
 */
async function api(path, { method = 'GET', json, body, as = 'json', candidate } = {}) {
  const headers = { Authorization: `Bearer ${candidate ?? sessionStorage.getItem(TOKEN_KEY) ?? ''}` };
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: 'no-store', credentials: 'omit' });
  } catch (err) {
    throw new ApiError(0, `the API did not answer (${err.message}): is the service running?`);
  }
  if (!response.ok) {
    const error = new ApiError(response.status, await errorText(response));
    error.retryAfter = response.headers.get('Retry-After');
    if (response.status === 401 && candidate === undefined) signOut(`token refused: ${error.message}`);
    throw error;
  }
  return as === 'json' ? response.json() : response;
}

/**
 * Show the PNG (or SVG) at `path` in `figure`; "no plot yet: ..." when the API has none (404). A busy
 * API (429, e.g. another embedding map being computed) is asked again after its Retry-After. An image
 * already shown stays until the new one has come.
 */
async function showPlot(figure, path, caption) {
  const seq = state.seq;
  figure.dataset.src = path;
  figure.dataset.state = 'loading';
  const label = caption ? el('figcaption', { text: caption }) : null;
  if (!figure.querySelector('img')) figure.replaceChildren(el('p', { class: 'noplot', text: 'loading plot…' }), label);
  for (let attempt = 0; ; attempt += 1) {
    try {
      const blob = await (await api(path, { as: 'response' })).blob();
      if (seq !== state.seq) return;
      const url = keepUrl(URL.createObjectURL(blob));
      const img = el('img', { src: url, alt: caption || 'plot' });
      const link = el('a', { href: url, target: '_blank', rel: 'noopener', title: 'open full size' }, img);
      figure.replaceChildren(link, label);
      figure.dataset.state = 'shown';
      return;
    } catch (err) {
      if (seq !== state.seq) return;
      if (err.status === 429 && attempt < 20) {
        const wait = Math.min(30, Number(err.retryAfter) || 5);
        figure.replaceChildren(el('p', { class: 'noplot', text: `the API is busy drawing; trying again in ${wait} s` }), label);
        await new Promise((done) => setTimeout(done, wait * 1000));
        if (seq !== state.seq) return;
        continue;
      }
      const text = err.status === 404 ? `no plot yet: ${err.message}` : `plot not shown: ${err.readable}`;
      figure.replaceChildren(el('p', { class: 'noplot', text }), label);
      figure.dataset.state = 'missing';
      return;
    }
  }
}

// -- sign-in, sign-out and the hash routes -----------------------------------------------------
const VIEWS = ['signin', 'leaderboard', 'jobs', 'job', 'models'];

function show(view) {
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  const signedIn = view !== 'signin';
  $('nav').hidden = !signedIn;
  $('sign-out').hidden = !signedIn;
  const tab = view === 'job' ? 'jobs' : view;
  for (const link of $('nav').querySelectorAll('a')) {
    link.classList.toggle('active', link.dataset.view === tab);
    if (link.dataset.view === tab) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = `InCo · ${tab === 'signin' ? 'sign in' : tab}`;
}

function route() {
  state.seq += 1;
  clearTimeout(state.timer);
  revokeUrls();
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    show('signin');
    $('token').focus();
    return;
  }
  const hash = location.hash;
  const job = hash.match(/^#\/jobs\/([0-9a-f]{1,32})$/);
  if (hash === '#/jobs') showJobs();
  else if (job) showJob(job[1]);
  else if (hash === '#/models') showModels();
  else if (hash === '#/leaderboard') showLeaderboard();
  else location.replace('#/leaderboard'); // the hashchange routes again
}

async function signIn(event) {
  event.preventDefault();
  const input = $('token');
  const candidate = input.value.trim();
  input.value = '';
  const out = $('signin-error');
  hide(out);
  if (!candidate) {
    showMessage(out, 'paste a token first');
    return;
  }
  try {
    await api('/v1/jobs?limit=1', { candidate });
  } catch (err) {
    const refused = err.status === 401 || err.status === 403;
    showMessage(out, refused ? `token refused: ${err.message}` : err.readable);
    input.focus();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  if (!location.hash || location.hash === '#/signin') location.hash = '#/leaderboard';
  else route();
}

/** Forget the token and everything shown with it; `message` says why on the sign-in form. */
function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.seq += 1;
  clearTimeout(state.timer);
  revokeUrls();
  state.files = [];
  for (const id of ['board-tables', 'figure4', 'job-id', 'job-facts', 'job-progress', 'job-results', 'job-curves',
    'job-confusions', 'job-embeddings', 'job-trials', 'job-trials-plot', 'job-logs', 'chosen', 'predictions',
    'predict-model', 'submit-dataset']) {
    $(id).replaceChildren();
  }
  for (const table of ['jobs-table', 'models-table']) $(table).tBodies[0].replaceChildren();
  $('board-dataset').replaceChildren(el('option', { value: '', text: 'all' }));
  for (const form of ['board-filters', 'submit-form', 'predict-form']) $(form).reset();
  for (const id of ['board-error', 'jobs-error', 'job-error', 'models-error', 'submit-message', 'predict-message',
    'signin-error']) {
    hide($(id));
  }
  history.replaceState(null, '', '#/signin');
  show('signin');
  if (message) showMessage($('signin-error'), message);
}

// -- data sets (the leaderboard's filter and the submit form) ----------------------------------
async function fillDatasets() {
  const datasets = await api('/v1/datasets');
  const names = datasets.map((d) => d.name);
  const board = $('board-dataset');
  const keep = board.value;
  board.replaceChildren(el('option', { value: '', text: 'all' }), ...names.map((n) => el('option', { value: n, text: n })));
  board.value = names.includes(keep) ? keep : '';
  const submit = $('submit-dataset');
  const chosen = submit.value;
  submit.replaceChildren(...datasets.map((d) => el('option', {
    value: d.name, text: `${d.name} (${d.images} images, ${d.classes.length} classes)`,
  })));
  if (names.includes(chosen)) submit.value = chosen;
  else if (names.includes('default')) submit.value = 'default';
}

// -- leaderboard -------------------------------------------------------------------------------
function boardQuery() {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData($('board-filters'))) if (value) params.set(key, value);
  const text = params.toString();
  return text ? `?${text}` : '';
}

async function showLeaderboard() {
  show('leaderboard');
  const seq = state.seq;
  const out = $('board-error');
  hide(out);
  let rows;
  try {
    await fillDatasets();
    rows = await api(`/v1/results${boardQuery()}`);
  } catch (err) {
    if (seq === state.seq) showMessage(out, `cannot show the leaderboard: ${err.readable}`);
    return;
  }
  if (seq !== state.seq) return;
  renderBoard(rows);
  showPlot($('figure4'), `/v1/results/figure4.png${boardQuery()}`, 'Figure 4: test accuracy against label ratio');
}

/** Table 1: one table per (data set, preset and setup, evaluation); a row per method variant, a
 * column per ratio from 1:32 to 1:2, cells "mean ± std (n)" in %, the best of a column in bold. */
function renderBoard(rows) {
  const box = $('board-tables');
  if (!rows.length) {
    box.replaceChildren(el('p', { class: 'hint', text: 'No results yet: submit a job on the Jobs page, or loosen the filters.' }));
    return;
  }
  const groups = new Map();
  for (const row of rows) {
    const key = JSON.stringify([row.dataset, row.preset, row.setup, row.eval]);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(row);
  }
  const tables = [];
  for (const [key, cells] of [...groups].sort(([a], [b]) => a.localeCompare(b))) {
    const [dataset, preset, setup, evaluation] = JSON.parse(key);
    const ratios = [...new Set(cells.map((c) => c.ratio))].sort((a, b) => ratioN(b) - ratioN(a));
    const variants = [...new Map(cells.map((c) => [c.variant, c.method]))]
      .sort(([va, ma], [vb, mb]) => methodRank(ma) - methodRank(mb) || va.localeCompare(vb));
    const best = new Map(ratios.map((r) => [r, Math.max(...cells.filter((c) => c.ratio === r).map((c) => c.mean))]));
    const byCell = new Map(cells.map((c) => [`${c.variant}\u0000${c.ratio}`, c]));
    const body = variants.map(([variant]) => el('tr', { data: { variant } },
      el('th', { scope: 'row', text: variant }),
      ratios.map((ratio) => {
        const c = byCell.get(`${variant}\u0000${ratio}`);
        if (!c) return el('td', { class: 'num empty', data: { ratio }, text: '–' });
        const top = variants.length > 1 && c.mean === best.get(ratio);
        return el('td', {
          class: top ? 'num best' : 'num',
          data: { ratio },
          title: `seeds ${c.seeds.join(', ')}`,
          text: `${pct(c.mean)} ± ${pct(c.std)} (${c.count})`,
        });
      })));
    const title = `${dataset} · ${preset} preset${setup ? ` (${setup})` : ''} · ${evaluation}`;
    tables.push(el('table', { class: 'data board-table', data: { dataset, preset, setup, eval: evaluation } },
      el('caption', { text: title }),
      el('thead', {}, el('tr', {}, el('th', { scope: 'col', text: 'method' }),
        ratios.map((r) => el('th', { scope: 'col', class: 'num', text: r })))),
      el('tbody', {}, body)));
  }
  box.replaceChildren(...tables);
}

// -- jobs --------------------------------------------------------------------------------------
/** How far a job is: the latest epoch of its current stage (GET /v1/jobs/{id}/metrics?stage=). */
async function jobProgress(job) {
  if (job.status === 'succeeded') return { value: 1, max: 1, label: 'done' };
  if (!ACTIVE.has(job.status)) return { value: 0, max: 1, label: job.status };
  if (job.status === 'queued') return { value: 0, max: 1, label: 'waiting for a worker' };
  if (!job.stage) return { value: 0, max: 1, label: 'starting' };
  const metrics = await api(`/v1/jobs/${job.id}/metrics?stage=${encodeURIComponent(job.stage)}`);
  if (!metrics.length) return { value: 0, max: 1, label: 'starting', stage: job.stage };
  const last = metrics.reduce((a, b) => (b.epoch >= a.epoch ? b : a));
  return { value: last.epoch, max: last.epochs, label: `epoch ${last.epoch}/${last.epochs}`, stage: last.stage };
}

function progressBar(job, p, withStage = false) {
  const label = withStage && p.stage && ACTIVE.has(job.status) ? `${p.stage}: ${p.label}` : p.label;
  return el('div', { class: 'progress', data: { status: job.status, stage: p.stage || '' } },
    el('progress', { max: p.max, value: p.value, title: label }),
    el('span', { class: 'progress-label', text: label }));
}

const statusBadge = (status) => el('span', { class: `status status-${status}`, text: status });

async function showJobs() {
  show('jobs');
  const seq = state.seq;
  try {
    await fillDatasets();
  } catch (err) {
    if (seq === state.seq) showMessage($('jobs-error'), `cannot list the data sets: ${err.readable}`);
  }
  await refreshJobs(seq);
}

async function refreshJobs(seq) {
  const out = $('jobs-error');
  let jobs;
  let progress;
  try {
    jobs = await api('/v1/jobs?limit=50');
    progress = await Promise.all(jobs.map(jobProgress));
  } catch (err) {
    if (seq === state.seq) showMessage(out, `cannot list the jobs: ${err.readable}`);
    if (seq === state.seq && err.status !== 401) schedule(() => refreshJobs(seq), seq);
    return;
  }
  if (seq !== state.seq) return;
  hide(out);
  $('jobs-empty').hidden = jobs.length > 0;
  $('jobs-table').tBodies[0].replaceChildren(...jobs.map((job, i) => {
    const spec = job.spec || {};
    const cancel = ACTIVE.has(job.status)
      ? el('button', { type: 'button', class: 'quiet small', text: 'Cancel', onclick: () => cancelJob(job.id, seq) })
      : null;
    return el('tr', { data: { jobId: job.id, status: job.status } },
      el('td', {}, el('a', { href: `#/jobs/${job.id}`, class: 'mono', title: job.id, text: short(job.id) })),
      el('td', { text: job.kind }),
      el('td', {}, spec.method || '–', el('span', { class: 'hint small', text: ` · ${spec.preset || '?'}` })),
      el('td', { text: (spec.ratios || []).join(', ') }),
      el('td', {}, statusBadge(job.status)),
      el('td', { text: job.stage || '–' }),
      el('td', {}, progressBar(job, progress[i])),
      el('td', { class: 'nowrap', title: when(job.created_at), text: when(job.created_at).slice(0, 16) }),
      el('td', {}, cancel));
  }));
  if (jobs.some((j) => ACTIVE.has(j.status))) schedule(() => refreshJobs(seq), seq);
}

async function cancelJob(id, seq) {
  try {
    await api(`/v1/jobs/${id}/cancel`, { method: 'POST' });
  } catch (err) {
    showMessage($('jobs-error'), `cannot cancel job ${short(id)}: ${err.readable}`);
  }
  if (seq === state.seq) refreshJobs(seq);
}

async function submitJob(event) {
  event.preventDefault();
  const form = $('submit-form');
  const out = $('submit-message');
  const data = new FormData(form);
  const seeds = Array.from({ length: Number(data.get('seeds')) }, (_, i) => i);
  const spec = {
    method: data.get('method'),
    preset: data.get('preset'),
    ratios: data.getAll('ratio'),
    evals: data.getAll('eval'),
    seeds,
  };
  if (data.get('dataset')) spec.data = { dataset: data.get('dataset') };
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  hide(out);
  const seq = state.seq;
  try {
    const job = await api('/v1/jobs', { method: 'POST', json: { kind: 'experiment', spec } });
    out.replaceChildren('Job ', el('a', { href: `#/jobs/${job.id}`, class: 'mono', text: short(job.id) }), ` ${job.status}.`);
    out.className = 'ok';
    out.hidden = false;
    if (seq === state.seq) refreshJobs(seq);
  } catch (err) {
    showMessage(out, `not submitted: ${err.readable}`);
  } finally {
    button.disabled = false;
  }
}

// -- one job -----------------------------------------------------------------------------------
async function showJob(id) {
  show('job');
  const seq = state.seq;
  $('job-id').textContent = id;
  for (const box of ['job-facts', 'job-progress', 'job-results', 'job-curves', 'job-confusions', 'job-embeddings',
    'job-trials', 'job-trials-plot', 'job-logs']) {
    $(box).replaceChildren();
  }
  $('job-tune').hidden = true;
  hide($('job-error'));
  let shownActive = null; // whether the outputs on the page are those of a job still running
  let lastLabel = null;
  let curvesAt = 0; // when the curves were last asked for: they follow a running job's epochs
  const tick = async () => {
    let job;
    let logs;
    let progress;
    try {
      [job, logs] = await Promise.all([api(`/v1/jobs/${id}`), api(`/v1/jobs/${id}/logs`)]);
      progress = await jobProgress(job);
    } catch (err) {
      if (seq !== state.seq) return;
      showMessage($('job-error'), `cannot show job ${id}: ${err.readable}`);
      if (err.status !== 404 && err.status !== 401) schedule(tick, seq);
      return;
    }
    if (seq !== state.seq) return;
    const active = ACTIVE.has(job.status);
    renderFacts(job);
    $('job-progress').replaceChildren(progressBar(job, progress, true));
    renderLogs(logs);
    if (job.error) showMessage($('job-error'), job.error);
    if (shownActive === null || (shownActive && !active)) {
      renderOutputs(job, seq);
      curvesAt = Date.now();
    } else if (active && progress.label !== lastLabel && Date.now() - curvesAt > CURVES_MS) {
      showPlot($('job-curves'), `/v1/jobs/${id}/plots/curves.png`, 'training curves, per epoch');
      curvesAt = Date.now();
    }
    lastLabel = progress.label;
    shownActive = active;
    if (active) schedule(tick, seq);
  };
  await tick();
}

function renderFacts(job) {
  const spec = job.spec || {};
  const facts = [
    ['status', statusBadge(job.status)],
    ['kind', job.kind],
    ['method', spec.method],
    ['data set', spec.data && spec.data.dataset],
    ['preset', spec.preset],
    ['ratios', (spec.ratios || []).join(', ')],
    ['evaluations', (spec.evals || []).join(', ')],
    ['seeds', (spec.seeds || []).join(', ')],
    ['stage', job.stage],
    ['created', when(job.created_at)],
    ['started', when(job.started_at)],
    ['finished', when(job.finished_at)],
  ];
  $('job-facts').replaceChildren(...facts.flatMap(([name, value]) => [
    el('dt', { text: name }), el('dd', {}, value === null || value === undefined || value === '' ? '–' : value),
  ]));
  if (ACTIVE.has(job.status)) {
    $('job-facts').append(el('dt', { text: '' }), el('dd', {}, el('button', {
      type: 'button', class: 'quiet small', text: 'Cancel job',
      onclick: async () => {
        try {
          await api(`/v1/jobs/${job.id}/cancel`, { method: 'POST' });
        } catch (err) {
          showMessage($('job-error'), `cannot cancel: ${err.readable}`);
        }
      },
    })));
  }
}

function renderLogs(logs) {
  const box = $('job-logs');
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.replaceChildren(...logs.slice(-500).map((line) => el('li', { class: `level-${line.level}` },
    el('span', { class: 'time', text: when(line.created_at).slice(11) }),
    el('span', { class: 'level', text: line.level }),
    el('span', { class: 'msg', text: line.message }))));
  if (!logs.length) box.append(el('li', { class: 'hint', text: 'no log lines yet' }));
  if (atEnd) box.scrollTop = box.scrollHeight;
}

async function renderOutputs(job, seq) {
  const base = `/v1/jobs/${job.id}`;
  showPlot($('job-curves'), `${base}/plots/curves.png`, 'training curves, per epoch');
  let results = [];
  try {
    results = await api(`${base}/results`);
  } catch (err) {
    if (seq === state.seq) showMessage($('job-error'), `cannot show the results: ${err.readable}`);
  }
  if (seq !== state.seq) return;
  renderResults(results);
  const confusions = $('job-confusions');
  confusions.replaceChildren();
  if (!results.length) confusions.append(el('p', { class: 'hint', text: 'no results yet' }));
  for (const r of results) {
    const figure = el('figure', { class: 'plot', data: { ratio: r.ratio, eval: r.eval, seed: String(r.seed) } });
    confusions.append(figure);
    const query = new URLSearchParams({ ratio: r.ratio, eval: r.eval, seed: String(r.seed) });
    showPlot(figure, `${base}/plots/confusion.png?${query}`, `${r.ratio} · ${r.eval} · seed ${r.seed}`);
  }
  if (job.kind === 'tune') renderTrials(job, seq);
  const embeddings = $('job-embeddings');
  const seeds = (job.spec && job.spec.seeds) || [0];
  const figures = seeds.map((seed) => el('figure', { class: 'plot', data: { seed: String(seed) } }));
  embeddings.replaceChildren(...figures);
  for (const [i, seed] of seeds.entries()) { // one after another: the API computes one map at a time
    await showPlot(figures[i], `${base}/plots/embedding.png?seed=${seed}`, `test images by the backbone of seed ${seed}`);
    if (seq !== state.seq) return;
  }
}

function renderResults(results) {
  const box = $('job-results');
  if (!results.length) {
    box.replaceChildren(el('p', { class: 'hint', text: 'No results yet: they appear when the job ends.' }));
    return;
  }
  const classes = results[0].classes;
  box.replaceChildren(el('table', { class: 'data results' },
    el('thead', {}, el('tr', {},
      ['ratio', 'eval', 'seed', 'labelled', 'accuracy'].map((h) => el('th', { text: h })),
      el('th', { class: 'group', colSpan: classes.length, text: 'recall per class (%)' })),
    el('tr', {}, el('th', { colSpan: 5 }), classes.map((c) => el('th', { class: 'num small', text: c })))),
    el('tbody', {}, results.map((r) => el('tr', { data: { ratio: r.ratio, eval: r.eval, seed: String(r.seed) } },
      el('td', { text: r.ratio }),
      el('td', { text: r.eval }),
      el('td', { class: 'num', text: String(r.seed) }),
      el('td', { class: 'num', text: String(r.labelled_images) }),
      el('td', { class: 'num accuracy', text: `${pct(r.accuracy)} %` }),
      classes.map((c) => el('td', { class: 'num', text: c in r.per_class_recall ? pct(r.per_class_recall[c]) : '–' })))))));
}

async function renderTrials(job, seq) {
  $('job-tune').hidden = false;
  showPlot($('job-trials-plot'), `/v1/jobs/${job.id}/plots/trials.png`, 'validation accuracy of each trial');
  let trials;
  try {
    trials = await api(`/v1/jobs/${job.id}/trials`);
  } catch (err) {
    if (seq === state.seq) $('job-trials').replaceChildren(el('p', { class: 'error', text: err.readable }));
    return;
  }
  if (seq !== state.seq) return;
  $('job-trials').replaceChildren(el('table', { class: 'data' },
    el('thead', {}, el('tr', {}, ['rank', 'trial', 'status', 'validation accuracy', 'epoch', 'settings', 'error']
      .map((h) => el('th', { text: h })))),
    el('tbody', {}, trials.map((t, i) => el('tr', {},
      el('td', { class: 'num', text: String(i + 1) }),
      el('td', { class: 'num', text: String(t.number) }),
      el('td', {}, statusBadge(t.status)),
      el('td', { class: 'num', text: t.score === null ? '–' : `${pct(t.score)} %` }),
      el('td', { class: 'num', text: `${t.epoch}/${t.epochs}` }),
      el('td', { class: 'mono small', text: Object.entries(t.params).map(([k, v]) => `${k}=${v}`).join('  ') }),
      el('td', { class: 'small', text: t.error || '' }))))));
}

// -- models: list, download, predict -----------------------------------------------------------
async function showModels() {
  show('models');
  const seq = state.seq;
  const out = $('models-error');
  hide(out);
  renderChosen();
  let models;
  try {
    models = await api('/v1/models');
  } catch (err) {
    if (seq === state.seq) showMessage(out, `cannot list the models: ${err.readable}`);
    return;
  }
  if (seq !== state.seq) return;
  $('models-empty').hidden = models.length > 0;
  $('models-table').tBodies[0].replaceChildren(...models.map((m) => el('tr', { data: { modelId: String(m.id) } },
    el('td', { class: 'num', text: String(m.id) }),
    el('td', {}, el('a', { href: `#/jobs/${m.job_id}`, class: 'mono', title: m.job_id, text: short(m.job_id) })),
    el('td', { text: m.dataset }),
    el('td', { text: m.variant }),
    el('td', { text: m.ratio }),
    el('td', { text: m.eval }),
    el('td', { class: 'num', text: String(m.seed) }),
    el('td', { class: 'num', text: `${pct(m.accuracy)} %` }),
    el('td', { class: 'nowrap', text: when(m.created_at) }),
    el('td', { class: 'nowrap' }, FORMATS.map(([format, name]) => el('button', {
      type: 'button', class: 'quiet small', text: name, title: `download model ${m.id} as ${name}`,
      onclick: (event) => download(m.id, format, event.currentTarget),
    }))))));
  const select = $('predict-model');
  const keep = select.value;
  select.replaceChildren(...models.map((m) => el('option', {
    value: String(m.id), text: `#${m.id} · ${m.variant} · ${m.ratio} ${m.eval} · seed ${m.seed} (${pct(m.accuracy)} %)`,
  })));
  if (models.some((m) => String(m.id) === keep)) select.value = keep;
}

function fileName(response, fallback) {
  const header = response.headers.get('Content-Disposition') || '';
  const star = header.match(/filename\*=(?:UTF-8|utf-8)''([^;]+)/);
  if (star) return decodeURIComponent(star[1]);
  const plain = header.match(/filename="?([^";]+)"?/);
  return plain ? plain[1] : fallback;
}

async function download(id, format, button) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = '…';
  try {
    const response = await api(`/v1/models/${id}/file?format=${format}`, { as: 'response' });
    const url = URL.createObjectURL(await response.blob());
    const link = el('a', { href: url, download: fileName(response, `inco-model-${id}.${format}`) });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    showMessage($('models-error'), `cannot download model ${id} as ${format}: ${err.readable}`);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

function addFiles(list) {
  for (const file of list) {
    if (!state.files.some((f) => f.name === file.name && f.size === file.size)) state.files.push(file);
  }
  renderChosen();
}

function renderChosen() {
  const box = $('chosen');
  box.replaceChildren(...state.files.map((file, i) => el('li', {},
    el('span', { text: `${file.name} (${Math.max(1, Math.round(file.size / 1024))} KiB)` }),
    el('button', {
      type: 'button', class: 'link', title: `leave out ${file.name}`, text: '×',
      onclick: () => { state.files.splice(i, 1); renderChosen(); },
    }))));
}

async function predict(event) {
  event.preventDefault();
  const out = $('predict-message');
  hide(out);
  const model = $('predict-model').value;
  if (!model) {
    showMessage(out, 'no model to run: a finished job makes one');
    return;
  }
  if (!state.files.length) {
    showMessage(out, 'choose or drop images first');
    return;
  }
  const files = [...state.files];
  const body = new FormData();
  for (const file of files) body.append('files', file, file.name);
  const button = $('predict-form').querySelector('button[type=submit]');
  button.disabled = true;
  showMessage(out, `classifying ${files.length} image(s)…`, 'hint');
  const seq = state.seq;
  try {
    const answer = await api(`/v1/models/${model}/predict`, { method: 'POST', body });
    if (seq !== state.seq) return;
    showMessage(out, `model #${answer.model}: ${answer.images.length} image(s) in ${Math.round(answer.took_ms)} ms; ` +
      `prediction sets at ${Math.round(answer.level * 100)} % coverage`, 'ok');
    renderPredictions(answer, files);
  } catch (err) {
    if (seq === state.seq) showMessage(out, `not classified: ${err.readable}`);
  } finally {
    button.disabled = false;
  }
}

function renderPredictions(answer, files) {
  const byName = new Map(files.map((f) => [f.name, f]));
  $('predictions').replaceChildren(...answer.images.map((p, i) => {
    const local = answer.images.length === files.length ? files[i] : byName.get(p.file);
    const thumb = local && local.type !== 'application/zip'
      ? el('img', { src: keepUrl(URL.createObjectURL(local)), alt: p.file })
      : null;
    const rows = Object.entries(p.probabilities).sort(([, a], [, b]) => b - a).map(([name, prob]) => el('tr',
      { data: { class: name } },
      el('th', { text: name }),
      el('td', {}, el('progress', { max: 1, value: prob })),
      el('td', { class: 'num', text: `${(prob * 100).toFixed(1)} %` })));
    const verdict = p.needs_review
      ? el('p', { class: 'review', text: `needs review: could be ${p.prediction_set.join(', ')}` })
      : el('p', { class: 'sure', text: 'sure at this level' });
    return el('article', { class: 'prediction', data: { file: p.file } },
      thumb,
      el('div', {},
        el('h3', { class: 'file', text: p.file }),
        el('p', { class: 'predicted' },
          el('span', { class: 'hint', text: 'predicted ' }),
          el('strong', { class: 'class', text: p.predicted })),
        verdict,
        el('table', { class: 'probabilities' }, el('tbody', {}, rows))));
  }));
}

// -- wiring ------------------------------------------------------------------------------------
function wire() {
  $('signin-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', () => signOut());
  $('board-filters').addEventListener('submit', (event) => event.preventDefault());
  $('board-filters').addEventListener('change', () => {
    state.seq += 1;
    revokeUrls();
    showLeaderboard();
  });
  $('submit-form').addEventListener('submit', submitJob);
  $('predict-form').addEventListener('submit', predict);
  $('predict-files').addEventListener('change', (event) => {
    addFiles(event.target.files);
    event.target.value = '';
  });
  const drop = $('drop');
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    addFiles(event.dataTransfer.files);
  });
  window.addEventListener('hashchange', route);
  route();
}

wire();
