// shoal chat page: plain JavaScript against the OpenAI-compatible API of the same server.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation sent with each request: {role, content}
let model = null;
let controller = null; // AbortController of the answer being streamed
let epoch = 0; // bumped by Clear: an answer from before it is not kept

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = $("token").value.trim();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

// The message of an OpenAI error object, else the HTTP status.
async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${resp.status} ${resp.statusText}`.trim();
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function loadModel() {
  const resp = await fetch("v1/models", { headers: headers(false) });
  if (!resp.ok) throw new Error(await errorMessage(resp));
  const body = await resp.json();
  if (!body.data || !body.data.length) throw new Error("the server lists no model");
  model = body.data[0].id;
  $("model").textContent = model;
  return model;
}

// Keep the newest text in view, inside the conversation box only (the page itself stays put,
// so the Stop button does not move), unless the reader scrolled up.
function follow(change) {
  const box = $("messages");
  const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  change();
  if (atEnd) box.scrollTop = box.scrollHeight;
}

function addMessage(role, text) {
  const el = document.createElement("article");
  el.className = "msg " + role;
  el.innerHTML = '<div class="role"></div><div class="text"></div><div class="meta"></div>';
  el.querySelector(".role").textContent = role;
  el.querySelector(".text").textContent = text;
  follow(() => $("messages").append(el));
  return el;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function number(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

// Server-sent events: events are separated by a blank line; `data:` lines carry the payload.
function parseEvent(block) {
  const data = block.split("\n").filter((l) => l.startsWith("data:"))
    .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
  return data === "" ? null : data;
}

async function send(text) {
  const started = performance.now();
  const mine = epoch;
  const user = { role: "user", content: text };
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const out = bubble.querySelector(".text");
  const end = (state, note) => follow(() => {
    bubble.dataset.state = state;
    bubble.querySelector(".meta").textContent = note;
  });
  bubble.dataset.state = "streaming";
  controller = new AbortController();
  setBusy(true);
  setStatus("Answering…");
  let answer = "";
  let finish = null;
  try {
    if (!model) await loadModel();
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history, user);
    const body = { model, messages, stream: true,
                   max_tokens: number("max-tokens", (v) => parseInt(v, 10)),
                   temperature: number("temperature", parseFloat),
                   seed: number("seed", (v) => parseInt(v, 10)) };
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer = (buffer + decoder.decode(chunk.value, { stream: true })).replace(/\r\n/g, "\n");
      let cut;
      while (!done && (cut = buffer.indexOf("\n\n")) >= 0) {
        const data = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (data === null) continue;
        if (data === "[DONE]") { done = true; break; }
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "error from the server");
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          follow(() => { out.textContent = answer; });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    if (!done) throw new Error("the stream ended before [DONE]");
    bubble.dataset.finish = finish || "";
    const took = ((performance.now() - started) / 1000).toFixed(1);
    end("done", `finish: ${finish || "?"} · ${took} s`);
    setStatus("Done (" + (finish || "no finish reason") + ").");
  } catch (err) {
    if (err.name === "AbortError") {
      end("stopped", "stopped");
      setStatus("Stopped.");
    } else {
      end("error", "error: " + err.message);
      setStatus("Error: " + err.message, true);
    }
  } finally {
    controller.abort(); // after an error mid-stream: close the connection, the server cancels
    controller = null;
    setBusy(false);
  }
  // Keep what was answered, even a stopped partial answer, so the conversation goes on.
  if (bubble.dataset.state !== "error" && mine === epoch) history.push(user, { role: "assistant", content: answer });
}

async function refreshStats() {
  try {
    const resp = await fetch("stats", { headers: headers(false), cache: "no-store" });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const s = await resp.json();
    $("stat-queue").textContent = s.pending_queue_length;
    $("stat-running").textContent = s.running;
    $("stat-waiting").textContent = s.waiting;
    $("stat-tps").textContent = Number(s.tokens_per_s).toFixed(1);
    $("stat-workers").textContent = s.workers_alive;
    if (s.model && !model) $("model").textContent = s.model;
    $("stats").removeAttribute("title");
  } catch (err) {
    for (const id of ["queue", "running", "waiting", "tps", "workers"]) {
      $("stat-" + id).textContent = "–";
    }
    $("stats").title = "stats unavailable: " + err.message;
  } finally {
    setTimeout(refreshStats, 1000);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (!text || controller) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  epoch += 1;
  history.length = 0;
  $("messages").replaceChildren();
  setStatus("");
});
$("token").addEventListener("change", () => { model = null; loadModel().catch(() => {}); });

loadModel().catch((err) => setStatus("Could not list the models: " + err.message, true));
refreshStats();
