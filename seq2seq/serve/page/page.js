// The page's script: each source line is sent as its own request as soon as typing pauses (the server
// decodes the requests that arrive together as one batch), and shown as its answer comes. Answers are
// kept per (line, beam, n-best), so an edit translates only the lines it changed.
"use strict";

const apiKey = new URLSearchParams(location.search).get("api_key");
const cache = new Map();
let info = null;
let timer = null;

async function call(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  const response = await fetch(path, body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function settings() {
  const beam = Math.max(1, parseInt(document.getElementById("beam").value, 10) || 1);
  const nbest = Math.min(beam, Math.max(1, parseInt(document.getElementById("nbest").value, 10) || 1));
  return { beam, nbest };
}

function showStatus(text) {
  document.getElementById("status").textContent = text;
}

function translation(line, wanted) {
  const key = JSON.stringify([line, wanted.beam, wanted.nbest]);
  if (!cache.has(key)) {
    const request = call("/translate", { src: [line], beam: wanted.beam, nbest: wanted.nbest })
      .then((data) => data.nbest[0]);
    request.catch(() => cache.delete(key)); // a failed request is asked again on the next edit
    cache.set(key, request);
  }
  return cache.get(key);
}

function render() {
  const lines = document.getElementById("source").value.split("\n");
  const wanted = settings();
  const list = document.getElementById("translations");
  while (list.children.length > lines.length) list.lastChild.remove();
  while (list.children.length < lines.length) list.appendChild(document.createElement("li"));
  showStatus("");
  lines.forEach((line, i) => {
    const item = list.children[i];
    item.dataset.source = line;
    if (!line.trim()) {
      item.className = "";
      item.replaceChildren();
      return;
    }
    item.className = "pending";
    if (!item.querySelector(".tgt")) item.replaceChildren(span("tgt", "…"));
    translation(line, wanted).then(
      (nbest) => { if (item.dataset.source === line) fill(item, line, nbest, i); },
      (error) => showStatus(error.message),
    );
  });
}

function span(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function fill(item, line, nbest, index) {
  item.className = "done";
  const parts = [span("tgt", nbest[0].text), span("score", nbest[0].score.toFixed(3))];
  if (info && info.attention) {
    const button = document.createElement("button");
    button.className = "heatmap-button";
    button.textContent = "heat map";
    button.title = "The attention of this translation over its source";
    button.addEventListener("click", () => heatmap(line, index + 1));
    parts.push(button);
  }
  if (nbest.length > 1) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = nbest.length + "-best";
    const list = document.createElement("ol");
    for (const hypothesis of nbest) {
      const entry = document.createElement("li");
      entry.append(span("text", hypothesis.text), span("score", hypothesis.score.toFixed(3)));
      list.appendChild(entry);
    }
    details.append(summary, list);
    parts.push(details);
  }
  item.replaceChildren(...parts);
}

async function heatmap(line, number) {
  const wanted = settings();
  let data;
  try {
    data = await call("/translate", { src: [line], beam: wanted.beam, attention: true });
  } catch (error) {
    showStatus(error.message);
    return;
  }
  const { source, target, weights } = data.attention[0];
  const table = document.createElement("table");
  table.id = "heatmap";
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (const piece of source) head.appendChild(Object.assign(document.createElement("th"), { textContent: piece }));
  const body = table.createTBody();
  target.forEach((piece, i) => {
    const row = body.insertRow();
    row.appendChild(Object.assign(document.createElement("th"), { textContent: piece }));
    weights[i].forEach((weight, j) => {
      const cell = row.insertCell();
      cell.style.background = `rgba(33, 90, 170, ${weight.toFixed(3)})`;
      cell.title = `${piece} → ${source[j]}: ${weight.toFixed(3)}`;
    });
  });
  document.getElementById("attention-line").textContent = number;
  document.getElementById("heatmap-box").replaceChildren(table);
  document.getElementById("attention").hidden = false;
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(render, 250);
}

async function start() {
  try {
    info = await call("/info");
  } catch (error) {
    document.getElementById("model").textContent = error.message;
    return;
  }
  const { source, target } = info.languages;
  if (source && target) document.getElementById("pair").textContent = `${source} → ${target}`;
  const first = info.checkpoints[0];
  const bleu = first.scores.test_bleu;
  const name = first.path.split("/").slice(-3).join("/");
  document.getElementById("model").textContent =
    `${name}${info.ensemble ? ` and ${info.checkpoints.length - 1} more (an ensemble)` : ""}` +
    `${bleu == null ? "" : `, test BLEU ${bleu.toFixed(2)}`}; ${info.parameters.toLocaleString("en")} parameters` +
    `${info.attention ? ", with attention" : ""}; ${info.precision}`;
  document.getElementById("beam").value = info.decoding.beam;
  document.getElementById("nbest").value = Math.min(3, info.decoding.beam);
  for (const id of ["source", "beam", "nbest"]) document.getElementById(id).addEventListener("input", schedule);
  render();
}

start();
