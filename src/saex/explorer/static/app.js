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

  return { overview, feature, game, heatmap };
})();
