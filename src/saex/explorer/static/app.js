// The explorer's client side: plots drawn on canvases from the server's JSON, and the game's scoring.
const saex = (() => {
  const pad = { l: 58, r: 10, t: 10, b: 30 };

  function axes(ctx, w, h, xr, yr, xl, yl) {
    ctx.strokeStyle = "#98a2b3"; ctx.fillStyle = "#475467"; ctx.font = "11px system-ui";
    ctx.beginPath(); ctx.moveTo(pad.l, pad.t); ctx.lineTo(pad.l, h - pad.b); ctx.lineTo(w - pad.r, h - pad.b); ctx.stroke();
    for (let i = 0; i <= 4; i++) {
      const x = xr[0] + (xr[1] - xr[0]) * i / 4, y = yr[0] + (yr[1] - yr[0]) * i / 4;
      ctx.textAlign = "center";
      ctx.fillText(x.toFixed(1), pad.l + (w - pad.l - pad.r) * i / 4, h - pad.b + 14);
      ctx.textAlign = "right";
      ctx.fillText(y.toFixed(1), pad.l - 4, h - pad.b - (h - pad.t - pad.b) * i / 4 + 4);
    }
    ctx.textAlign = "left";
    ctx.fillText(xl, w / 2 - 30, h - 3);
    ctx.save(); ctx.translate(11, h / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center"; ctx.fillText(yl, 0, 0);
    ctx.restore();
  }

  function histogram(canvas, values, bins, xl) {
    const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
    if (!values.length) { ctx.fillText("no data", w / 2 - 20, h / 2); return; }
    const lo = Math.min(...values), hi = Math.max(...values) + 1e-9, counts = new Array(bins).fill(0);
    values.forEach(v => counts[Math.min(bins - 1, Math.floor((v - lo) / (hi - lo) * bins))]++);
    const top = Math.max(...counts), bw = (w - pad.l - pad.r) / bins;
    axes(ctx, w, h, [lo, hi], [0, top], xl, "count");
    ctx.fillStyle = "#2f5fd0";
    counts.forEach((c, i) => { const bh = (h - pad.t - pad.b) * c / top; ctx.fillRect(pad.l + i * bw + 1, h - pad.b - bh, bw - 2, bh); });
  }

  function colour(e) {  // label entropy: 0 -> blue, high -> orange
    if (e === null) return "rgba(120,120,120,.6)";
    const t = Math.min(1, e / 3);
    return `rgba(${Math.round(40 + 215 * t)},${Math.round(90 + 60 * t)},${Math.round(220 - 200 * t)},.7)`;
  }

  async function overview() {
    const data = await (await fetch("/api/scatter")).json();
    const logd = data.density.map(d => Math.log10(d));
    histogram(document.getElementById("density-hist"), logd, 40, "log10 density");
    const canvas = document.getElementById("scatter"), ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
    const logm = data.mean_top20.map(m => Math.log10(Math.max(m, 1e-6)));
    const xr = [Math.min(...logd), Math.max(...logd) + 1e-9], yr = [Math.min(...logm), Math.max(...logm) + 1e-9];
    axes(ctx, w, h, xr, yr, "log10 density", "log10 mean top-20 act");
    const px = logd.map(v => pad.l + (v - xr[0]) / (xr[1] - xr[0]) * (w - pad.l - pad.r));
    const py = logm.map(v => h - pad.b - (v - yr[0]) / (yr[1] - yr[0]) * (h - pad.t - pad.b));
    px.forEach((x, i) => { ctx.fillStyle = colour(data.entropy[i]); ctx.fillRect(x - 1.5, py[i] - 1.5, 3, 3); });
    canvas.style.cursor = "crosshair";
    canvas.addEventListener("click", ev => {
      const r = canvas.getBoundingClientRect(), x = ev.clientX - r.left, y = ev.clientY - r.top;
      let best = -1, bd = 1e9;
      px.forEach((p, i) => { const d = (p - x) ** 2 + (py[i] - y) ** 2; if (d < bd) { bd = d; best = i; } });
      if (best >= 0 && bd < 100) location.href = `/feature/${data.id[best]}`;
    });
    canvas.dataset.points = String(px.length);
  }

  async function feature(id, randomRange) {
    const f = await (await fetch(`/api/feature/${id}`)).json();
    histogram(document.getElementById("act-hist"), f.examples.map(e => e.value), 20, "activation");
    const a = document.getElementById("alignment");
    if (a && f.neuron_max_cos !== null) {
      const ctx = a.getContext("2d"), w = a.width, x = v => 20 + v * (w - 40);
      ctx.fillStyle = "#e4e7ec"; ctx.fillRect(x(randomRange[0]), 30, x(randomRange[1]) - x(randomRange[0]), 24);
      ctx.fillStyle = "#475467"; ctx.font = "11px system-ui";
      ctx.fillText("random range", x(randomRange[0]), 25); ctx.fillText("0", 16, 75); ctx.fillText("1", w - 24, 75);
      ctx.fillStyle = "#f04438"; ctx.fillRect(x(f.neuron_max_cos) - 2, 26, 4, 32);
      ctx.fillText(`max cos ${f.neuron_max_cos.toFixed(3)}`, Math.min(x(f.neuron_max_cos) + 4, w - 90), 70);
    }
  }

  function game() {  // the page holds a round token, not the answer: the server tells it after the guess
    const key = "saex-game", state = JSON.parse(localStorage.getItem(key) || '{"score":0,"streak":0}');
    const options = document.getElementById("options"), verdict = document.getElementById("verdict");
    const show = () => { document.getElementById("score").textContent = state.score; document.getElementById("streak").textContent = state.streak; };
    show();
    options.querySelectorAll(".option").forEach(b => b.addEventListener("click", async () => {
      if (options.dataset.done) return;
      options.dataset.done = "1";
      const r = await fetch(`/api/game/check?round=${encodeURIComponent(options.dataset.round)}&choice=${b.dataset.choice}`);
      if (!r.ok) { verdict.textContent = "This round was answered already or is too old: play the next one."; return; }
      const { correct, answer } = await r.json();
      b.classList.add(correct ? "right" : "wrong");
      options.querySelector(`.option[data-choice="${answer}"]`).classList.add("right");
      state.score += correct ? 1 : 0; state.streak = correct ? state.streak + 1 : 0;
      localStorage.setItem(key, JSON.stringify(state)); show();
      verdict.textContent = correct ? "Right!" : "Not this one: the right answer is outlined in green.";
    }));
  }

  async function heatmap(example, first) {
    const canvas = document.getElementById("heatmap"), ctx = canvas.getContext("2d");
    const draw = async feature => {
      const h = await (await fetch(`/api/example/${example}/patches?feature=${feature}`)).json();
      const cell = canvas.width / h.side;
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      h.values.forEach((v, i) => {
        ctx.fillStyle = `rgba(255, 80, 0, ${0.75 * v / h.max})`;
        ctx.fillRect((i % h.side) * cell, Math.floor(i / h.side) * cell, cell, cell);
      });
      document.getElementById("heat-caption").textContent = `patch heatmap of feature ${feature} (max ${h.max.toFixed(3)})`;
      canvas.dataset.feature = String(feature);
    };
    document.querySelectorAll("tr[data-feature]").forEach(row => row.addEventListener("click", ev => {
      if (ev.target.tagName !== "A") draw(row.dataset.feature);
    }));
    await draw(first);
  }

  // Experiments: the effect of an edit list on one example (/api/edit), drawn by the steer control and the edit page.
  function el(tag, props = {}, ...children) {
    const e = Object.assign(document.createElement(tag), props);
    e.append(...children.flat().map(c => c instanceof Node ? c : String(c)));  // text, never HTML
    return e;
  }
  const fmt = (x, digits = 4) => x === null || x === undefined ? "–" : x.toFixed(digits);
  const small = x => x === null || x === undefined ? "–" : x === 0 || Math.abs(x) >= 1e-3 ? x.toFixed(4) : x.toExponential(2);
  const pct = p => p === null ? "–" : `${(100 * p).toFixed(p < 0.001 ? 3 : 1)}%`;

  function probBars(probs) {  // every class: the clean probability (grey) over the edited one (blue)
    return el("div", { className: "probs" }, probs.map(p => {
      const bar = el("i", {}, el("b", { className: "clean" }), el("b", { className: "edited" }));
      bar.children[0].style.width = `${100 * (p.clean || 0)}%`;
      bar.children[1].style.width = `${100 * (p.edited || 0)}%`;
      const row = el("div", {}, el("span", {}, p.name), bar, el("em", {}, `${pct(p.clean)} → ${pct(p.edited)}`));
      row.dataset.edited = String(p.edited);
      return row;
    }));
  }

  function changes(title, items) {
    return el("p", {}, el("b", {}, `${title}: `), items.map(c => `${c.name} ${c.delta > 0 ? "+" : ""}${pct(c.delta)}`).join(" · ") || "none");
  }

  function neighbours(title, items, examples) {
    return el("div", { className: "neighbours" }, el("b", {}, title), items.map(n => {
      const e = examples[n.example] || {}, label = `${e.id ?? n.example}${e.label ? " · " + e.label : ""} · cos ${fmt(n.cosine, 3)}`;
      const a = el("a", { href: `/example/${n.example}`, title: label });
      a.append(e.thumb ? el("img", { src: e.thumb, alt: label }) : el("span", {}, (e.text || label).slice(0, 90)));
      return a;
    }));
  }

  function showEffect(box, data) {
    const fx = data.effect, out = fx.effect || {}, stats = [];
    if ("kl" in out) stats.push(`KL ${small(out.kl)} nats`);
    if ("top_clean" in out) stats.push(out.top_clean === out.top_edited ? `top: ${out.top_clean} (unchanged)` : `top: ${out.top_clean} → ${out.top_edited}`);
    if ("embedding_cosine" in out) stats.push(`embedding cosine ${fmt(out.embedding_cosine)}`);
    const n = fx.features_changed.length;
    stats.push(`${n} feature${n === 1 ? "" : "s"} changed`);
    const parts = [el("p", { className: "stats summary" }, stats.join(" · "))];
    if (out.probs) parts.push(probBars(out.probs));
    else if (out.gained) parts.push(changes("gained", out.gained), changes("lost", out.lost));
    if (fx.continuation) parts.push(el("p", {}, el("b", {}, "clean: "), fx.continuation.clean), el("p", {}, el("b", {}, "edited: "), fx.continuation.edited));
    if (fx.neighbours) parts.push(neighbours("nearest before", fx.neighbours.before, data.examples), neighbours("nearest after", fx.neighbours.after, data.examples));
    box.replaceChildren(...parts);
    box.dataset.kl = out.kl ?? "";
    box.dataset.version = String(+(box.dataset.version || 0) + 1);
  }

  function effectRunner(box, onError, onResult = () => {}) {  // the latest request wins; a burst of input sends one
    let seq = 0, timer = null;
    return (example, edits, delay = 150) => {
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const mine = ++seq;
        box.classList.add("busy");
        try {
          const r = await fetch(`/api/edit?example=${example}&edits=${encodeURIComponent(JSON.stringify(edits))}`);
          const data = await r.json().catch(() => ({ detail: `the server answered ${r.status}` }));
          if (mine !== seq) return;
          if (!r.ok) onError(data.detail); else { showEffect(box, data); onResult(data); }
        } catch (e) {
          if (mine === seq) onError(`the server did not answer (${e})`);
        } finally {
          if (mine === seq) box.classList.remove("busy");
        }
      }, delay);
    };
  }

  function steer(feature) {
    const $ = id => document.getElementById(id), alpha = $("alpha"), pick = $("steer-example"), box = $("steer-effect");
    if (!alpha) return;  // a dead feature: no top example to steer
    const run = effectRunner(box, detail => box.replaceChildren(el("p", { className: "error" }, detail)));
    const update = () => {
      const edits = [{ op: "add", features: [feature], value: +alpha.value }];
      $("alpha-value").textContent = alpha.value;
      $("steer-edit").href = `/edit/${pick.value}?edits=${encodeURIComponent(JSON.stringify(edits))}`;
      run(pick.value, edits);
    };
    alpha.addEventListener("input", update);
    pick.addEventListener("change", update);
  }

  function editor(example, initial) {
    const $ = id => document.getElementById(id), q = (row, c) => row.querySelector(c), box = $("effect");
    const rows = [...document.querySelectorAll("#edit-features tr[data-feature]")], byFeature = new Map(rows.map(r => [+r.dataset.feature, r]));
    let extra = [];  // edits the feature table does not hold, in their order, after the table's
    const fail = detail => { $("edit-error").textContent = detail; };
    const run = effectRunner(box, fail, data => {
      const after = new Map(data.effect.features_changed.map(c => [c.feature, c.after]));
      rows.forEach(r => { q(r, ".after").textContent = after.has(+r.dataset.feature) ? fmt(after.get(+r.dataset.feature), 3) : ""; });
    });

    function edits() {
      const out = [];
      rows.forEach(r => {
        const j = +r.dataset.feature, clamp = q(r, ".clamp").value.trim(), scale = q(r, ".scale").value.trim();
        if (!q(r, ".on").checked) return out.push({ op: "zero", features: [j] });
        if (clamp !== "") out.push({ op: "clamp", features: [j], value: +clamp });
        if (scale !== "") out.push({ op: "scale", features: [j], value: +scale });
      });
      return out.concat(extra);
    }

    function refresh(delay = 250) {
      const list = edits();
      $("edit-list").value = list.length ? "[\n" + list.map(e => "  " + JSON.stringify(e)).join(",\n") + "\n]" : "[]";
      $("download").href = `/api/edits?edits=${encodeURIComponent(JSON.stringify(list))}`;
      rows.forEach(r => { q(r, ".clamp").disabled = q(r, ".scale").disabled = !q(r, ".on").checked; });
      $("extra").replaceChildren(...extra.map((e, i) => {
        const remove = el("button", { type: "button", title: "remove this edit" }, "×");
        remove.addEventListener("click", () => { extra.splice(i, 1); refresh(0); });
        return el("li", {}, JSON.stringify(e), " ", remove);
      }));
      fail("");
      run(example, list, delay);
    }

    function apply(items) {  // the table takes the longest prefix it can hold in the order it writes (zero, or clamp then scale)
      rows.forEach(r => { q(r, ".on").checked = true; q(r, ".clamp").value = q(r, ".scale").value = ""; });
      const taken = new Map();
      let i = 0;
      for (; i < items.length; i++) {
        const e = items[i], j = (e.features || [])[0], row = (e.features || []).length === 1 && !e.positions && byFeature.get(j);
        const ops = taken.get(j) || [];
        const fits = row && (e.op === "zero" || e.op === "clamp" ? !ops.length : e.op === "scale" && !ops.some(o => o !== "clamp"));
        if (!fits) break;
        if (e.op === "zero") q(row, ".on").checked = false; else q(row, `.${e.op}`).value = e.value ?? 0;
        taken.set(j, [...ops, e.op]);
      }
      extra = items.slice(i);
    }

    async function load(text) {  // the server checks the list and gives it in the edit file's form
      try {
        const r = await fetch(`/api/edits?edits=${encodeURIComponent(text)}`), data = await r.json();
        if (!r.ok) return fail(data.detail);
        apply(data);
        refresh(0);
      } catch (e) { fail(`could not load the edit list (${e})`); }
    }

    rows.forEach(r => r.querySelectorAll("input").forEach(i => i.addEventListener("input", () => refresh())));
    const ids = text => (text || "").split(/[\s,]+/).filter(Boolean).map(Number);
    const form = (id, make) => $(id).addEventListener("submit", ev => { ev.preventDefault(); extra.push(make(new FormData(ev.target))); refresh(0); });
    form("add-form", d => ({ op: "add", features: [+d.get("feature")], value: +d.get("value") }));
    form("copy-form", d => ({ op: "copy", source: d.get("source"), features: ids(d.get("features")) }));
    form("pair-form", d => ({ op: "pair", source: d.get("source"), target: d.get("target"), features: ids(d.get("features")) }));
    $("load").addEventListener("click", () => load($("edit-list").value));
    $("upload").addEventListener("change", async ev => { if (ev.target.files[0]) { $("edit-list").value = await ev.target.files[0].text(); load($("edit-list").value); } });
    $("reset").addEventListener("click", () => { apply([]); refresh(0); });
    apply(initial);
    refresh(0);
  }

  // The feature page's attribution toggle: each top image swapped for its overlay PNG, or each top text's
  // tokens coloured by their attribution (/api/attribution); the browser asks for each one when shown.
  function attribution() {
    const form = document.getElementById("attribution");
    if (!form) return;  // a dead feature: no top example
    const on = form.querySelector("#attr-on"), method = form.querySelector("#attr-method"), { feature, version } = form.dataset;
    const url = (base, ex) => `${base}/${ex}/${feature}${form.dataset.modality === "image" ? ".png" : ""}?method=${method.value}&v=${version}`;
    const imgs = [...document.querySelectorAll("#top-grid img[data-example]")];
    imgs.forEach(img => {
      img.dataset.thumb = img.getAttribute("src");
      img.addEventListener("error", () => { if (on.checked) { img.classList.add("failed"); img.title = "no attribution: the server refused it"; } });
    });
    const texts = [...document.querySelectorAll("#top-grid li[data-example]")];
    let seq = 0;
    async function colour(li, mine) {
      const box = li.querySelector(".attr-tokens") || li.appendChild(el("div", { className: "attr-tokens" }));
      box.classList.add("busy");
      try {
        const r = await fetch(url("/api/attribution", li.dataset.example)), data = await r.json();
        if (mine !== seq) return;
        if (!r.ok) return box.replaceChildren(el("span", { className: "error" }, data.detail));
        const top = Math.max(1e-9, ...data.tokens.map(([, v]) => Math.abs(v)));
        box.replaceChildren(...data.tokens.map(([t, value], i) => {
          const v = value ?? 0;  // null: not a finite number
          const s = el("span", { className: `tok attr ${v < 0 ? "neg" : "pos"}`, title: `${t} ${v.toFixed(4)}` }, (data.text || [])[i] ?? t);
          s.style.setProperty("--a", (Math.abs(v) / top).toFixed(3));
          return s;
        }));
      } catch (e) {
        if (mine === seq) box.replaceChildren(el("span", { className: "error" }, `the server did not answer (${e})`));
      } finally { box.classList.remove("busy"); }
    }
    const update = () => {
      const mine = ++seq;
      imgs.forEach(img => {
        img.classList.remove("failed");
        img.classList.toggle("attribution", on.checked);
        img.src = on.checked ? url("/attribution", img.dataset.example) : img.dataset.thumb;
      });
      texts.forEach(li => {
        li.classList.toggle("attributed", on.checked);
        if (on.checked) colour(li, mine);
      });
    };
    on.addEventListener("change", update);
    method.addEventListener("change", () => { if (on.checked) update(); });
  }

  return { overview, feature, game, heatmap, steer, editor, attribution };
})();
