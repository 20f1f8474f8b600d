// The hogwild page: sends a problem to /v1/chat/completions with `workers` and a strategy (`mode`, one of those
// the model card lists), reads the server-sent events, and draws what each worker writes in its own column
// (choices[0].delta.hogwild events), the finished steps in the shared history, and the answer (the ordinary
// content). Stop aborts the request; the server cancels the run.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let controller = null;
let texts = []; // one Text node per worker column

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text) {
  $("status").textContent = text;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-label").hidden = false;
    $("model").textContent = "this server needs an API key";
    return false;
  }
  const card = (await response.json()).data[0];
  const ext = card.hogwild;
  model = card.id;
  $("model").textContent = `${card.id}, context ${ext.context_window} tokens`;
  $("layout").replaceChildren(...ext.layouts.map((name) => new Option(name, name)));
  $("opening").replaceChildren(...ext.openings.map((name) => new Option(name, name)));
  // the strategies a run can be, each with its one-line summary, as the server's registry lists them
  $("mode").replaceChildren(
    ...ext.strategies.map((strategy) => {
      const option = new Option(strategy.name, strategy.name);
      option.title = strategy.summary;
      return option;
    }),
  );
  for (const id of ["layout", "mode", "opening"]) $(id).value = ext.defaults[id];
  $("workers").max = ext.max_workers;
  for (const id of ["workers", "budget", "temperature"]) {
    if ($(id).value === "") $(id).value = ext.defaults[id];
  }
  return true;
}

function columns(names) {
  texts = names.map((name) => {
    const column = document.createElement("div");
    column.className = "worker";
    const title = document.createElement("h2");
    title.textContent = name;
    const pre = document.createElement("pre");
    pre.className = "text";
    const text = document.createTextNode("");
    pre.append(text);
    column.append(title, pre);
    $("columns").append(column);
    return text;
  });
}

function append(text, delta) {
  const box = text.parentNode;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  text.appendData(delta);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function onEvent(event, names) {
  switch (event.type) {
    case "start":
      names.push(...event.workers);
      columns(event.workers);
      break;
    case "text":
      append(texts[event.worker], event.text);
      break;
    case "step": {
      const item = document.createElement("li");
      item.textContent = event.text.trim();
      const history = $("history");
      history.append(item);
      history.scrollTop = history.scrollHeight;
      break;
    }
    case "pass":
      status(`forward pass ${event.forward_passes} of ${event.budget}`);
      break;
    case "answer":
      $("answer").textContent = event.answer;
      $("answer").classList.remove("muted");
      status(`${names[event.worker]} gave the answer`);
      break;
    case "done": {
      if (event.answer === null) $("answer").textContent = "(no answer)";
      $("answer").dataset.done = "1";
      const passes = `${event.forward_passes} forward passes, ${event.elapsed_s} s`;
      const repeats = event.redundancy == null ? "" : `, redundancy ${Math.round(100 * event.redundancy)}%`;
      status(`finished by ${event.finished_by} after ${passes}${repeats}`);
      break;
    }
  }
}

async function read(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const names = [];
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.hogwild) onEvent(choice.delta.hogwild, names);
      }
    }
  }
}

async function solve(event) {
  event.preventDefault();
  if (!model && !(await loadModel())) return;
  $("columns").replaceChildren();
  $("history").replaceChildren();
  $("answer").textContent = "…";
  $("answer").classList.add("muted");
  delete $("answer").dataset.done;
  $("solve").disabled = true;
  $("stop").disabled = false;
  status("waiting for the engine…");
  controller = new AbortController();
  const request = {
    model,
    stream: true,
    messages: [{ role: "user", content: $("problem").value }],
    workers: Number($("workers").value),
    layout: $("layout").value,
    opening: $("opening").value,
    mode: $("mode").value,
    budget: Number($("budget").value),
    temperature: Number($("temperature").value),
  };
  if ($("seed").value !== "") request.seed = Number($("seed").value);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      if (response.status === 401) $("key-label").hidden = false;
      throw new Error(body && body.error ? body.error.message : response.statusText);
    }
    await read(response.body);
  } catch (error) {
    status(error.name === "AbortError" ? "stopped" : `error: ${error.message}`);
    if ($("answer").textContent === "…") $("answer").textContent = "—";
  } finally {
    $("solve").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("ask").addEventListener("submit", solve);
$("stop").addEventListener("click", () => controller && controller.abort());
loadModel().catch((error) => status(`cannot reach the server: ${error.message}`));
