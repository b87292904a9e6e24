// The vlmkit playground: a chat over /v1/chat/completions and, for Janus checkpoints that draw,
// image generation over /v1/images/generations, both streamed. Model and user text is always set
// with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "vlmkit-api-key";
let modelName = null;

// --- the API ------------------------------------------------------------------------------------
function headers() {
  const key = $("api-key").value.trim();
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = "Bearer " + key;
  return out;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// A request body as JSON; `exact` holds whole numbers as their digits (seeds up to 2**64 - 1, past what a
// JavaScript number holds exactly), written into the JSON as they are.
function json(body, exact = {}) {
  let text = JSON.stringify(body);
  for (const [key, digits] of Object.entries(exact)) {
    text = text.slice(0, -1) + (text.length > 2 ? "," : "") + JSON.stringify(key) + ":" + digits + "}";
  }
  return text;
}

// POST a streaming request; calls onEvent(name, data) for each server-sent event.
async function stream(path, body, signal, onEvent, exact = {}) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: json(body, exact), signal });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data || data === "[DONE]") continue;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new Error(parsed.error.message);
      onEvent(name, parsed);
    }
  }
}

// --- chat ---------------------------------------------------------------------------------------
const history = [];  // OpenAI messages of this conversation
let attachments = [];  // data: URLs of the pictures for the next message
let chatAbort = null;  // the answer being streamed, if any
let chat = 0;  // which conversation this is ("New chat" counts up)

function addMessage(role, text, images = []) {
  const div = document.createElement("div");
  div.className = "message " + role;
  for (const url of images) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached picture";
    div.append(img);
  }
  const span = document.createElement("span");
  span.textContent = text;
  div.append(span);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return span;
}

function showAttachments() {
  $("attachments").replaceChildren(...attachments.map((url, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "picture to send";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove";
    remove.onclick = () => { attachments.splice(i, 1); showAttachments(); };
    figure.append(img, remove);
    return figure;
  }));
}

function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => { attachments.push(reader.result); showAttachments(); };
    reader.readAsDataURL(file);
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  // one answer at a time (Enter submits even while Send is disabled): the next question waits for it
  if (chatAbort || (!text && !attachments.length)) return;
  showError("");
  // pictures before the question, as the models are trained (and as `vlmkit chat --image` sends them)
  const content = [...attachments.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }];
  history.push({ role: "user", content });
  addMessage("user", text, attachments);
  $("prompt").value = "";
  attachments = [];
  showAttachments();

  const answer = addMessage("assistant", "");
  const body = { model: modelName, messages: history, stream: true,
                 temperature: Number($("chat-temperature").value || 0),
                 max_tokens: Number($("max-tokens").value || 256) };
  const abort = chatAbort = new AbortController();
  const conversation = chat;  // "New chat" starts another: this answer then belongs to none
  setChatBusy(true);
  try {
    await stream("/v1/chat/completions", body, abort.signal, (_, chunk) => {
      for (const choice of chunk.choices) answer.textContent += choice.delta.content || "";
      answer.parentElement.scrollIntoView({ block: "end" });
    });
    if (conversation === chat) history.push({ role: "assistant", content: answer.textContent });
  } catch (err) {
    if (conversation !== chat) {
      // dropped with its conversation
    } else if (err.name === "AbortError") {
      history.push({ role: "assistant", content: answer.textContent });  // a stopped answer stays as far as it got
    } else {  // the turn did not happen: take it back, so it can be sent again
      showError(err.message);
      history.pop();
      answer.parentElement.previousElementSibling.remove();
      answer.parentElement.remove();
      $("prompt").value = text;
      attachments = content.slice(0, -1).map((part) => part.image_url.url);
      showAttachments();
    }
  } finally {
    answer.parentElement.dataset.done = "true";
    if (chatAbort === abort) {
      chatAbort = null;
      setChatBusy(false);
    }
  }
}

function setChatBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function newChat() {
  chat += 1;
  if (chatAbort) chatAbort.abort();
  chatAbort = null;
  setChatBusy(false);
  history.length = 0;
  attachments = [];
  showAttachments();
  $("messages").replaceChildren();
  showError("");
}

// --- images -------------------------------------------------------------------------------------
let drawAbort = null;

function optionalNumber(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

async function draw(event) {
  event.preventDefault();
  const prompt = $("image-prompt").value.trim();
  if (!prompt) return;
  showError("");
  const n = Number($("image-n").value || 1);
  const body = { model: modelName, prompt, n, stream: true, partial_images: 3,
                 guidance_scale: optionalNumber("guidance"), temperature: optionalNumber("image-temperature") };
  // a seed is sent as its digits: a JavaScript number would round one past 2**53 to another seed
  const seed = $("seed").value.trim();
  const exact = /^-?\d+$/.test(seed) ? { seed } : {};
  if (seed && !exact.seed) body.seed = Number(seed);  // not a whole number: the server says so
  const figures = [];
  for (let i = 0; i < n; i++) figures.push(newFigure(i));
  $("gallery").prepend(...figures.map((f) => f.figure));
  drawAbort = new AbortController();
  $("draw").disabled = true;
  $("stop-drawing").disabled = false;
  try {
    await stream("/v1/images/generations", body, drawAbort.signal, (name, data) => {
      const figure = figures[data.index || 0];
      figure.img.src = "data:image/png;base64," + data.b64_json;
      if (name === "image_generation.completed") {
        figure.status.textContent = "done";
        figure.img.dataset.final = "true";
        figure.download.href = figure.img.src;
        figure.download.hidden = false;
      } else {
        figure.status.textContent = `preview ${data.partial_image_index + 1}`;
        figure.img.dataset.previews = data.partial_image_index + 1;
      }
    }, exact);
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    $("draw").disabled = false;
    $("stop-drawing").disabled = true;
    // pictures the request did not finish (stopped, or an error): say so; drop those with nothing drawn
    for (const f of figures.filter((f) => !f.img.dataset.final)) {
      if (!f.img.getAttribute("src")) f.figure.remove();
      else f.status.textContent = drawAbort.signal.aborted ? "stopped" : "not finished";
    }
  }
}

function newFigure(index) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = "generated picture";
  const caption = document.createElement("figcaption");
  const status = document.createElement("span");
  status.textContent = "drawing…";
  const download = document.createElement("a");
  download.textContent = "download";
  download.download = `vlmkit-${Date.now()}-${index}.png`;
  download.hidden = true;
  caption.append(status, download);
  figure.append(img, caption);
  return { figure, img, status, download };
}

// --- the page -----------------------------------------------------------------------------------
function showTab(name) {
  $("chat-panel").hidden = name !== "chat";
  $("images-panel").hidden = name !== "images";
  $("tab-chat").classList.toggle("active", name === "chat");
  $("tab-images").classList.toggle("active", name === "images");
}

async function loadInfo() {
  try {
    const info = await (await fetch("/playground/info")).json();
    if (!info.ready) { setTimeout(loadInfo, 1000); return; }
    modelName = info.model;
    $("model").textContent = info.model;
    $("tab-images").hidden = !info.can_generate_images;
    if (info.api_key_required) $("api-key").placeholder = "this server needs one";
  } catch (err) {
    showError("cannot reach the server: " + err.message);
  }
}

function setUp() {
  $("api-key").value = sessionStorage.getItem(KEY) || "";
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY, $("api-key").value));
  $("tab-chat").onclick = () => showTab("chat");
  $("tab-images").onclick = () => showTab("images");
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("prompt").addEventListener("paste", (e) => attach(e.clipboardData.files));
  $("file").addEventListener("change", (e) => { attach(e.target.files); e.target.value = ""; });
  const composer = $("composer");
  composer.addEventListener("dragover", (e) => { e.preventDefault(); composer.classList.add("dragging"); });
  composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
  composer.addEventListener("drop", (e) => { e.preventDefault(); composer.classList.remove("dragging"); attach(e.dataTransfer.files); });
  $("stop").onclick = () => chatAbort && chatAbort.abort();
  $("new-chat").onclick = newChat;
  $("draw-form").addEventListener("submit", draw);
  $("stop-drawing").onclick = () => drawAbort && drawAbort.abort();
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
