"use strict";
// The operator page's script: polls the sidecar's JSON API and drives its forms. Polling, not
// server-sent events: EventSource cannot send the Authorization header the local API token
// needs, and a poll a second costs /health's p99 nothing measurable (see the README).
(() => {
  const TOKEN_KEY = "unlockd.apiToken";
  const NAME = /^[A-Za-z0-9._-]{1,255}$/;
  const FAST_MS = 1000;    // the unlock while it runs
  const SLOW_MS = 10000;   // readiness, login state, the cache list, an idle unlock
  const PULL_MS = 500;     // a pull in progress
  const RUNNING = new Set(["authenticating", "downloading_key", "decrypting", "loading_images"]);
  const $ = (id) => document.getElementById(id);

  class TokenNeeded extends Error {}

  // --- HTTP -------------------------------------------------------------------------------

  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function call(method, path, body) {
    const init = { method, headers: authHeaders(), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    if ((response.headers.get("Content-Type") || "").startsWith("application/json")) {
      data = await response.json().catch(() => null);
    }
    // The local token's 401 carries a challenge; "not logged in at the upstream" does not.
    if (response.status === 401 && response.headers.get("WWW-Authenticate") === "Bearer") {
      askToken();
      throw new TokenNeeded();
    }
    const detail = data && typeof data.detail === "string" ? data.detail : `HTTP ${response.status}`;
    return { status: response.status, ok: response.ok, data, detail };
  }

  const path = (...names) => names.map(encodeURIComponent).join("/");

  // --- Formatting -------------------------------------------------------------------------

  function formatBytes(n) {
    if (typeof n !== "number" || !Number.isFinite(n)) return "?";
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i === 0 ? `${n} bytes` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
  }

  function formatTime(value) {
    if (value === null || value === undefined) return "never";
    const date = new Date(typeof value === "number" ? value * 1000 : value);
    return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
  }

  function setMessage(id, text, kind) {
    const el = $(id);
    el.textContent = text;
    el.className = `message${kind ? ` ${kind}` : ""}`;
  }

  function setProgress(bar, done, total) {
    if (typeof total === "number" && total > 0) {
      bar.max = total;
      bar.value = Math.min(done || 0, total);
    } else {
      bar.removeAttribute("value");  // indeterminate until the size is known
    }
  }

  function element(tag, props = {}, ...children) {
    const el = Object.assign(document.createElement(tag), props);
    el.append(...children);
    return el;
  }

  // --- The token ----------------------------------------------------------------------------

  let tokenNeeded = false;

  function askToken() {
    const rejected = sessionStorage.getItem(TOKEN_KEY) !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    if (tokenNeeded) return;
    tokenNeeded = true;
    $("app").hidden = true;
    $("token-section").hidden = false;
    setBadge("Needs the API token", "");
    setMessage("token-message", rejected ? "That token was not accepted." : "", rejected ? "bad" : "");
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token-input").value = "";
    tokenNeeded = false;
    $("token-section").hidden = true;
    refreshAll();
  });

  // --- Refreshers -------------------------------------------------------------------------

  let unlockRunning = false;

  function setBadge(text, kind) {
    const badge = $("readiness");
    badge.textContent = text;
    badge.className = `badge${kind ? ` ${kind}` : ""}`;
  }

  async function refreshReady() {
    const reply = await call("GET", "/ready");
    const reasons = reply.ok ? [] : (reply.data && reply.data.reasons) || [reply.detail];
    setBadge(reply.ok ? "Ready" : "Not ready", reply.ok ? "ok" : "bad");
    $("ready-state").textContent = reply.ok ? "Ready" : "Not ready";
    $("ready-reasons").replaceChildren(...reasons.map((r) => element("li", { textContent: r })));
    $("app").hidden = false;
  }

  async function refreshStatus() {
    const reply = await call("GET", "/status");
    if (!reply.ok) return;
    const s = reply.data;
    $("login-state").textContent = s.authenticated
      ? `Logged in as ${s.email}`
      : s.email ? `Not logged in (the upstream did not accept ${s.email})` : "Not logged in";
    $("upstream-url").textContent = s.upstream_url || "?";
    $("cache-dir").textContent = s.model_cache_dir;
    for (const id of ["login-email", "unlock-email"]) {
      if (!$(id).value && s.email) $(id).value = s.email;
    }
  }

  async function refreshCache() {
    const reply = await call("GET", "/cache");
    if (reply.status === 404 || reply.status === 405) {
      $("cache-list").replaceChildren();
      $("cache-message").textContent = "This sidecar does not list its cache.";
      return;
    }
    if (!reply.ok) {
      $("cache-message").textContent = `Could not list the cache: ${reply.detail}`;
      return;
    }
    const entries = Array.isArray(reply.data) ? reply.data : (reply.data && reply.data.entries) || [];
    $("cache-list").replaceChildren(...entries.map(cacheEntry));
    $("cache-message").textContent = entries.length ? "" : "Nothing cached yet.";
  }

  function cacheEntry(entry) {
    const name = `${entry.folder}/${entry.filename}`;
    // A plain link cannot carry the local token: with one set, names are not links.
    const label = sessionStorage.getItem(TOKEN_KEY)
      ? element("span", { textContent: name })
      : element("a", { href: `/resources/${path(entry.folder, entry.filename)}`, download: entry.filename, textContent: name });
    const facts = [formatBytes(entry.size), `last used ${formatTime(entry.last_used)}`];
    if (entry.complete === false) facts.push("incomplete");
    const remove = element("button", { type: "button", className: "quiet", textContent: "Remove" });
    remove.setAttribute("aria-label", `Remove ${name}`);
    remove.addEventListener("click", () => removeEntry(entry, remove));
    return element(
      "li", {},
      element("span", { className: "entry-name" }, label),
      element("span", { className: "entry-facts", textContent: facts.join(" · ") }),
      remove,
    );
  }

  async function removeEntry(entry, button) {
    button.disabled = true;
    try {
      const reply = await call("DELETE", `/cache/${path(entry.folder, entry.filename)}`);
      $("cache-message").textContent = reply.ok || reply.status === 404
        ? `Removed ${entry.folder}/${entry.filename}.`
        : `Could not remove ${entry.folder}/${entry.filename}: ${reply.detail}`;
    } finally {
      await refreshCache();
    }
  }

  async function refreshUnlock() {
    const reply = await call("GET", "/unlock/status");
    if (!reply.ok) return;
    const s = reply.data;
    const wasRunning = unlockRunning;
    unlockRunning = RUNNING.has(s.state);
    if (wasRunning && !unlockRunning) setMessage("unlock-message", "");  // the state says it now
    $("unlock-state").textContent = s.state;
    const { bytes_done: done, bytes_total: total } = s.progress;
    setProgress($("unlock-progress"), done, total || 1);
    if (s.state === "idle") $("unlock-progress").value = 0;
    $("unlock-bytes").textContent = total ? `${formatBytes(done)} of ${formatBytes(total)}` : "";
    $("unlock-error").hidden = !s.error;
    $("unlock-error").textContent = s.error || "";
    const images = s.images.length ? s.images : [];
    $("unlock-images").replaceChildren(...images.map((tag) => element("li", { textContent: tag })));
  }

  // --- The poll loop ------------------------------------------------------------------------

  const refreshers = { ready: refreshReady, status: refreshStatus, cache: refreshCache, unlock: refreshUnlock };
  const due = { ready: 0, status: 0, cache: 0, unlock: 0 };
  let timer = null;
  let ticking = false;

  function interval(name) {
    return name === "unlock" && unlockRunning ? FAST_MS : SLOW_MS;
  }

  async function tick() {
    timer = null;
    if (ticking || tokenNeeded || document.hidden) return;
    ticking = true;
    const now = Date.now();
    const names = Object.keys(due).filter((name) => due[name] <= now);
    try {
      await Promise.all(names.map(async (name) => {
        await refreshers[name]();
        due[name] = Date.now() + interval(name);
      }));
    } catch (error) {
      if (!(error instanceof TokenNeeded)) setBadge("Sidecar unreachable", "bad");
      for (const name of names) due[name] = Math.max(due[name], Date.now() + FAST_MS);
    } finally {
      ticking = false;
    }
    if (!tokenNeeded) schedule();
  }

  function schedule() {
    if (timer !== null) clearTimeout(timer);
    const wait = Math.max(50, Math.min(...Object.values(due)) - Date.now());
    timer = setTimeout(tick, wait);
  }

  function refreshSoon(...names) {
    for (const name of names) due[name] = 0;
    if (!ticking) schedule();
  }

  function refreshAll() {
    refreshSoon(...Object.keys(due));
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshAll(); });

  // --- Forms ----------------------------------------------------------------------------------

  function onSubmit(formId, handler) {
    const form = $(formId);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        await handler(form);
      } catch (error) {
        if (!(error instanceof TokenNeeded)) {
          setMessage(form.querySelector(".message").id, "The sidecar did not answer.", "bad");
        }
      } finally {
        button.disabled = false;
      }
    });
  }

  function credentials(prefix) {
    return { email: $(`${prefix}-email`).value.trim(), password: $(`${prefix}-password`).value };
  }

  onSubmit("login-form", async () => {
    setMessage("login-message", "Logging in…");
    const reply = await call("POST", "/login", credentials("login"));
    if (reply.ok) {
      $("login-password").value = "";
      setMessage("login-message", "Logged in.", "ok");
    } else if (reply.status === 401) {
      setMessage("login-message", "The upstream rejected these credentials.", "bad");
    } else if (reply.status === 502) {
      setMessage("login-message", `The upstream is unreachable: ${reply.detail}`, "bad");
    } else {
      setMessage("login-message", reply.detail, "bad");
    }
    refreshSoon("status", "ready");
  });

  onSubmit("unlock-form", async () => {
    setMessage("unlock-message", "Starting…");
    const reply = await call("POST", "/unlock", credentials("unlock"));
    if (reply.ok) {
      $("unlock-password").value = "";
      unlockRunning = true;
      setMessage("unlock-message", "Unlock started.", "ok");
    } else if (reply.status === 404) {
      setMessage("unlock-message", "This device has no encrypted image archive.", "bad");
    } else {
      setMessage("unlock-message", reply.detail, "bad");
    }
    refreshSoon("unlock", "status");
  });

  function names(folderId, filename) {
    const folder = $(folderId).value.trim();
    if (!NAME.test(folder) || folder === "." || folder === "..") return [null, "Folder: use 1-255 of A-Z a-z 0-9 . _ -"];
    if (!NAME.test(filename) || filename === "." || filename === "..") return [null, "Filename: use 1-255 of A-Z a-z 0-9 . _ -"];
    return [[folder, filename], null];
  }

  onSubmit("pull-form", async () => {
    const [pair, problem] = names("pull-folder", $("pull-filename").value.trim());
    if (problem) { setMessage("pull-message", problem, "bad"); return; }
    const [folder, filename] = pair;
    const reply = await call("POST", `/pull/${path(folder, filename)}`);
    if (reply.ok) {
      setMessage("pull-message", "");
      trackPull(folder, filename, reply.data);
    } else if (reply.status === 401) {
      setMessage("pull-message", "Log in to the upstream first.", "bad");
    } else {
      setMessage("pull-message", reply.detail, "bad");
    }
  });

  const pulls = new Map();

  function trackPull(folder, filename, first) {
    const key = `${folder}/${filename}`;
    let pull = pulls.get(key);
    if (!pull) {
      const bar = element("progress", { max: 1 });
      bar.setAttribute("aria-label", `Pull ${key}`);
      const text = element("span", { className: "entry-facts" });
      const item = element("li", {}, element("span", { className: "entry-name", textContent: key }), text, bar);
      $("pulls").prepend(item);
      pull = { bar, text, timer: null };
      pulls.set(key, pull);
    }
    const show = (s) => {
      setProgress(pull.bar, s.bytes_done, s.bytes_total);
      const amount = s.bytes_total ? `${formatBytes(s.bytes_done)} of ${formatBytes(s.bytes_total)}` : "";
      const what = s.state === "error" ? `error: ${s.detail || "failed"}` : s.state;
      pull.text.textContent = [what, amount].filter(Boolean).join(" · ");
      if (s.state === "complete") pull.bar.value = pull.bar.max;
      return s.state === "complete" || s.state === "error";
    };
    const poll = async () => {
      pull.timer = null;
      try {
        const reply = await call("GET", `/pull/${path(folder, filename)}`);
        if (!reply.ok) { show({ state: "error", detail: reply.detail }); return; }
        if (show(reply.data)) { refreshSoon("cache"); return; }
      } catch (error) {
        if (error instanceof TokenNeeded) return;
      }
      pull.timer = setTimeout(poll, PULL_MS);
    };
    if (pull.timer !== null) clearTimeout(pull.timer);
    if (first && show(first)) { refreshSoon("cache"); return; }
    pull.timer = setTimeout(poll, PULL_MS);
  }

  onSubmit("upload-form", async () => {
    const file = $("upload-file").files[0];
    if (!file) { setMessage("upload-message", "Choose a file.", "bad"); return; }
    const [pair, problem] = names("upload-folder", file.name);
    if (problem) { setMessage("upload-message", problem, "bad"); return; }
    const [folder, filename] = pair;
    const form = new FormData();
    form.append("folder", folder);  // before the data: validated before any byte is encrypted
    form.append("data", file, filename);
    const bar = $("upload-progress");
    bar.hidden = false;
    setProgress(bar, 0, file.size);
    setMessage("upload-message", `Uploading ${folder}/${filename}…`);
    const reply = await new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/upload/${path(filename)}`);
      for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
      xhr.upload.addEventListener("progress", (e) => setProgress(bar, e.loaded, e.total));
      xhr.addEventListener("load", () => {
        let data = null;
        try { data = JSON.parse(xhr.responseText); } catch { data = null; }
        resolve({ status: xhr.status, data, challenged: xhr.getResponseHeader("WWW-Authenticate") === "Bearer" });
      });
      xhr.addEventListener("error", () => reject(new Error("network")));
      xhr.send(form);
    });
    if (reply.status === 401 && reply.challenged) { bar.hidden = true; askToken(); return; }
    if (reply.status === 200) {
      setMessage("upload-message", `Uploaded ${folder}/${filename} (${formatBytes(reply.data.size)}).`, "ok");
      $("upload-file").value = "";
    } else if (reply.status === 401) {
      setMessage("upload-message", "Log in to the upstream first.", "bad");
    } else {
      setMessage("upload-message", (reply.data && reply.data.detail) || `HTTP ${reply.status}`, "bad");
    }
    bar.hidden = true;
    refreshSoon("cache");
  });

  refreshAll();
})();
