
"use strict";
// clipcli's HTML report: draws the page from the two JSON blocks above. Every path and label is set as text
// (textContent, never innerHTML), and image cards are created a chunk at a time as they scroll into view, so a
// report of 10,000 images opens as fast as one of 100.
(() => {
  const meta = JSON.parse(document.getElementById("report-meta").textContent);
  const images = JSON.parse(document.getElementById("report-images").textContent);
  const labels = meta.labels;
  const isEval = meta.kind === "eval";
  const CHUNK = 48;  // cards created at a time
  const MARGIN = 1200;  // px: cards are made this far ahead of the viewport
  const root = document.getElementById("report");

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const plural = (n, word) => `${n.toLocaleString("en")} ${word}${n === 1 ? "" : "s"}`;
  const shownScore = s => meta.score === "prob" ? (100 * s).toFixed(1) + "%" : s.toFixed(3);
  const figure = v => v === null ? "–" : v.toFixed(4);
  const top = im => im.k[0];

  // ------------------------------------------------------------------ lazy galleries
  const observer = new IntersectionObserver(entries => {
    for (const entry of entries) if (entry.isIntersecting) entry.target.fill();
  }, {rootMargin: `${MARGIN}px 0px`});

  function near(node) {
    const box = node.getBoundingClientRect();
    return box.height > 0 || box.width > 0 ? box.top < innerHeight + MARGIN && box.bottom > -MARGIN : false;
  }

  // A grid of `indices` (into images) whose cards are created as it comes near the viewport.
  function gallery(indices, mark) {
    const box = el("div", "gallery");
    const grid = el("div", "grid");
    const more = el("div", "more");
    box.append(grid, more);
    let shown = 0;
    more.fill = () => {
      const end = Math.min(indices.length, shown + CHUNK);
      const cards = document.createDocumentFragment();
      for (; shown < end; shown++) cards.append(card(indices[shown], mark));
      grid.append(cards);
      if (shown >= indices.length) {
        observer.unobserve(more);
        more.remove();
        return;
      }
      more.textContent = `${(indices.length - shown).toLocaleString("en")} more…`;
      requestAnimationFrame(() => { if (more.isConnected && near(more)) more.fill(); });
    };
    if (indices.length) observer.observe(more); else more.remove();
    return box;
  }

  function card(index, mark) {
    const im = images[index];
    const [best, score] = top(im);
    const node = el("figure", "card");
    node.dataset.index = index;
    node.title = im.p;
    const thumb = el(im.u ? "a" : "div", "thumb");
    if (im.u) thumb.href = im.u;  // relative, percent-encoded link to the image beside the report
    if (im.t) {
      const img = el("img");
      img.alt = "";
      img.decoding = "async";
      img.loading = "lazy";
      img.src = `data:${meta.mime};base64,${im.t}`;
      thumb.append(img);
    } else {
      thumb.append(el("span", "path", "no preview"));
    }
    const caption = el("figcaption");
    if (isEval) {
      const right = im.y === best;
      node.classList.add(right ? "right" : "wrong");
      caption.append(el("div", "truth", `true: ${labels[im.y]}`));
      if (!right && mark) caption.append(el("span", "badge", "misclassified"));
    } else if (meta.threshold !== null && score < state.threshold) {
      node.classList.add("low");
      caption.append(el("span", "badge", "low confidence"));
    }
    const list = el("ol", "scores");
    for (const [label, value] of im.k) {
      const item = el("li");
      item.append(el("span", "label", labels[label]), el("span", "score", shownScore(value)));
      list.append(item);
    }
    caption.append(list, el("div", "path", im.p));
    node.append(thumb, caption);
    return node;
  }

  function group(view, name, indices, open, mark, note) {
    const box = el("details", "group");
    box.open = open;
    box.dataset.view = view;
    box.dataset.count = indices.length;
    const summary = el("summary");
    summary.append(el("span", "name", name), el("span", "count", plural(indices.length, "image") + (note || "")));
    box.append(summary, gallery(indices, mark));
    return box;
  }

  // ------------------------------------------------------------------ sections
  const state = {threshold: meta.threshold, onlyLow: false};

  function header() {
    root.append(el("h1", null, meta.title));
    for (const line of meta.details) root.append(el("p", "sub", line));
  }

  function byTopLabel() {
    const section = el("section");
    section.id = "by-label";
    const draw = () => {
      section.replaceChildren(el("h2", null, "Images by top label, best first"));
      const groups = labels.map(() => []);
      images.forEach((im, i) => {
        if (!state.onlyLow || top(im)[1] < state.threshold) groups[top(im)[0]].push(i);
      });
      const links = el("p", "sub jump");
      groups.forEach((indices, label) => {
        if (!indices.length) return;
        const low = isEval || state.threshold === null ? 0 : indices.filter(i => top(images[i])[1] < state.threshold).length;
        const box = group("label", labels[label], indices, true, false, low ? `, ${low.toLocaleString("en")} low confidence` : "");
        box.id = `label-${label}`;
        section.append(box);
        const link = el("a", null, `${labels[label]} (${indices.length.toLocaleString("en")})`);
        link.href = `#label-${label}`;
        links.append(link, " ");
      });
      if (links.childElementCount > 1) section.insertBefore(links, section.children[1]);
      if (groups.every(g => !g.length)) section.append(el("p", "sub", "No images."));
    };
    draw();
    return [section, draw];
  }

  function lowConfidenceControls(redraw) {
    if (meta.threshold === null) return;
    const bar = el("div", "controls");
    const count = el("span", "low-count");
    const input = el("input");
    input.type = "number"; input.min = "0"; input.max = "1"; input.step = "0.05"; input.value = meta.threshold;
    const only = el("input");
    only.type = "checkbox";
    const countLow = () => {
      const n = images.filter(im => top(im)[1] < state.threshold).length;
      count.textContent = `${plural(n, "image")} below the threshold`;
    };
    input.addEventListener("change", () => {
      const value = Number(input.value);
      if (Number.isFinite(value)) { state.threshold = value; countLow(); redraw(); }
    });
    only.addEventListener("change", () => { state.onlyLow = only.checked; redraw(); });
    const label1 = el("label", null, "Low confidence: top score below ");
    label1.append(input);
    const label2 = el("label");
    label2.append(only, " show only low-confidence images");
    bar.append(label1, count, label2);
    countLow();
    root.append(bar);
  }

  function metrics() {
    const m = meta.metrics;
    root.append(el("h2", null, "Metrics"));
    const box = el("div", "metrics");
    const withImages = labels.filter(l => m.support[l] > 0).length;
    for (const [key, note] of [
      ["acc1", "share of images whose class is the top label"],
      ["acc5", labels.length < 5 ? "needs at least 5 classes" : "share of images whose class is among the top 5"],
      ["mean_per_class_recall", `mean recall over the ${withImages} classes with images`]]) {
      const item = el("div", "metric");
      item.dataset.metric = key;
      item.append(el("b", null, figure(m[key])), el("div", null, key), el("span", null, note));
      box.append(item);
    }
    root.append(box);
    const table = el("table", "per-class");
    const head = el("tr");
    for (const name of ["class", "images", "recall", "precision"]) head.append(el("th", name === "class" ? "name" : null, name));
    table.append(head);
    labels.forEach(label => {
      const row = el("tr");
      row.append(el("td", "name", label), el("td", null, String(m.support[label])),
                 el("td", null, figure(m.per_class_recall[label])), el("td", null, figure(m.per_class_precision[label])));
      table.append(row);
    });
    root.append(el("h2", null, "Per class"), table);
  }

  function confusion() {
    const matrix = meta.metrics.confusion_matrix;
    const cells = labels.map(() => labels.map(() => []));  // [true][predicted] -> image indices
    images.forEach((im, i) => cells[im.y][top(im)[0]].push(i));
    const picked = el("section");
    picked.id = "picked";
    let pickedCell = null;
    const show = (t, p, cellNode) => {
      if (pickedCell) pickedCell.classList.remove("picked");
      pickedCell = cellNode || null;
      if (pickedCell) pickedCell.classList.add("picked");
      picked.replaceChildren(el("h2", null, `True ${labels[t]}, predicted ${labels[p]}`),
                             group("cell", `${labels[t]} → ${labels[p]}`, cells[t][p], true, false));
      picked.scrollIntoView({block: "start"});
    };
    root.append(el("h2", null, "Confusion matrix (rows: true class, columns: predicted; click a cell for its images)"));
    const shade = (t, p) => {
      const total = meta.metrics.support[labels[t]] || 1;
      const alpha = matrix[t][p] / total;
      return t === p ? `rgba(30, 123, 52, ${alpha})` : `rgba(179, 38, 30, ${alpha})`;
    };
    const wrap = el("div", "matrix-wrap");
    if (labels.length <= 60) {
      const table = el("table", "confusion");
      const head = el("tr");
      head.append(el("th", "name", "true \\ predicted"));
      labels.forEach((label, p) => { const th = el("th", null, String(p + 1)); th.title = label; head.append(th); });
      const thead = el("thead");
      thead.append(head);
      table.append(thead);
      const body = el("tbody");
      labels.forEach((label, t) => {
        const row = el("tr");
        row.append(el("th", "name", `${t + 1}. ${label}`));
        labels.forEach((other, p) => {
          const count = matrix[t][p];
          const cell = el("td", count ? null : "zero", String(count));
          cell.dataset.true = t;
          cell.dataset.pred = p;
          cell.title = `true ${label}, predicted ${other}: ${plural(count, "image")}`;
          cell.style.backgroundColor = shade(t, p);
          if (count) cell.addEventListener("click", () => show(t, p, cell));
          row.append(cell);
        });
        body.append(row);
      });
      table.append(body);
      wrap.append(table);
    } else {  // too many classes for a table: one pixel block per cell
      const size = Math.max(2, Math.floor(900 / labels.length));
      const canvas = el("canvas", "confusion");
      canvas.width = canvas.height = size * labels.length;
      const ctx = canvas.getContext("2d");
      matrix.forEach((row, t) => row.forEach((count, p) => {
        if (count) { ctx.fillStyle = shade(t, p); ctx.fillRect(p * size, t * size, size, size); }
      }));
      const at = event => {
        const box = canvas.getBoundingClientRect();
        const scale = canvas.width / box.width;
        return [Math.floor((event.clientY - box.top) * scale / size), Math.floor((event.clientX - box.left) * scale / size)];
      };
      canvas.addEventListener("mousemove", event => {
        const [t, p] = at(event);
        if (t >= 0 && p >= 0 && t < labels.length && p < labels.length) {
          canvas.title = `true ${labels[t]}, predicted ${labels[p]}: ${plural(matrix[t][p], "image")}`;
        }
      });
      canvas.addEventListener("click", event => {
        const [t, p] = at(event);
        if (t >= 0 && p >= 0 && t < labels.length && p < labels.length && matrix[t][p]) show(t, p, null);
      });
      wrap.append(canvas);
    }
    root.append(wrap);
    // The largest confusions, as buttons: the quickest way in when there are many classes.
    const off = [];
    matrix.forEach((row, t) => row.forEach((count, p) => { if (t !== p && count) off.push([count, t, p]); }));
    off.sort((a, b) => b[0] - a[0] || a[1] - b[1] || a[2] - b[2]);
    if (off.length) {
      const list = el("div", "confusions");
      list.append(el("span", null, "Most confused: "));
      for (const [count, t, p] of off.slice(0, 20)) {
        const button = el("button", null, `${labels[t]} → ${labels[p]} (${count})`);
        button.type = "button";
        button.addEventListener("click", () => show(t, p, root.querySelector(`td[data-true="${t}"][data-pred="${p}"]`)));
        list.append(button);
      }
      root.append(list);
    }
    root.append(picked);
  }

  function misclassified() {
    const section = el("section");
    section.id = "misclassified";
    section.append(el("h2", null, "Misclassified images, by true class"));
    const wrong = labels.map(() => []);
    images.forEach((im, i) => { if (im.y !== top(im)[0]) wrong[im.y].push(i); });
    let any = false;
    wrong.forEach((indices, t) => {
      if (!indices.length) return;
      any = true;
      indices.sort((a, b) => top(images[b])[1] - top(images[a])[1] || a - b);
      section.append(group("wrong", labels[t], indices, true, true));
    });
    if (!any) section.append(el("p", "sub", "None: every image was classified correctly."));
    root.append(section);
  }

  function failures() {
    if (!meta.failed.length) return;
    root.append(el("h2", null, `Inputs that could not be read (${meta.failed.length})`));
    const list = el("ul", "failed");
    for (const item of meta.failed) list.append(el("li", null, `${item.p}: ${item.r}`));
    root.append(list);
  }

  header();
  if (isEval) {
    metrics();
    confusion();
    misclassified();
    const [section] = byTopLabel();
    root.append(section);
  } else {
    const [section, draw] = byTopLabel();
    lowConfidenceControls(draw);
    root.append(section);
  }
  failures();
  document.body.dataset.ready = "true";
})();
