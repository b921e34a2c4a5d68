// The page: reads /settings.json, starts the model in worker.js, sends it the image and question,
// and shows the answer as it streams, with its time to first token and decode speed.
// Query parameters: ?variant=int8|int4|fp32|fp16 (one the export has), ?device=wasm|webgpu,
// ?threads=N (WASM threads; 1 unless the page is cross-origin isolated).

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const state = { ready: false, busy: false, asked: 0, answered: 0, first_ms: null };

function status(text, kind = "loading") {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

function figures(d) {
  const rate = d.tokens > 1 ? (d.tokens - 1) / ((d.total_ms - d.ttft_ms) / 1000) : null;
  const end = d.stopped === "stop" ? "end of answer" : "token limit";
  const speed = rate === null ? "n/a (one token)" : `${rate.toFixed(1)} tokens/s`;
  const stats = $("stats");
  Object.assign(stats.dataset, {
    ttftMs: d.ttft_ms.toFixed(2),
    totalMs: d.total_ms.toFixed(2),
    tokens: String(d.tokens),
    tokensPerS: rate === null ? "" : rate.toFixed(3),
  });
  return `first token ${Math.round(d.ttft_ms)} ms · decode ${speed} · ${d.tokens} token${d.tokens === 1 ? "" : "s"} (${end})`;
}

function canAsk() {
  $("ask").disabled = !(state.ready && !state.busy && $("image-file").files.length && $("question").value.trim());
}

function onMessage({ data: d }) {
  const answer = $("answer");
  if (d.type === "progress") status(d.text);
  else if (d.type === "ready") {
    state.ready = true;
    const threads = d.device === "wasm" ? `, ${d.threads} thread${d.threads === 1 ? "" : "s"}` : "";
    const fell = d.fallback ? ` (WebGPU failed: ${d.fallback})` : "";
    $("backend").textContent = `${d.device === "webgpu" ? "WebGPU" : "WASM"}${threads}${fell}`;
    status("ready: choose an image and ask", "ready");
  } else if (d.type === "first") $("stats").textContent = `first token ${Math.round(d.ttft_ms)} ms · answering…`;
  else if (d.type === "text") answer.textContent += d.text;
  else if (d.type === "done") {
    answer.textContent = d.text; // the whole answer decoded at once: what the stream showed, settled
    $("stats").textContent = figures(d);
    answer.dataset.state = "done";
  } else if (d.type === "error") {
    if (!state.ready) status(`error: ${d.message}`, "error");
    else {
      $("stats").textContent = `error: ${d.message}`;
      answer.dataset.state = "error";
    }
  }
  if (d.type === "done" || (d.type === "error" && d.id !== null)) {
    state.busy = false;
    answer.dataset.answered = String(++state.answered);
  }
  canAsk();
}

function ask(worker, settings) {
  const max = Math.max(1, Math.min(Number($("max-new-tokens").value) || 1, settings.max_new_tokens));
  state.busy = true;
  canAsk();
  $("answer").textContent = "";
  $("answer").dataset.state = "running";
  $("stats").textContent = "waiting for the first token…";
  worker.postMessage({
    type: "ask",
    id: ++state.asked,
    image: $("image-file").files[0],
    question: $("question").value.trim(),
    max_new_tokens: max,
    ignore_eos: $("ignore-eos").checked,
  });
}

async function main() {
  const settings = await (await fetch("settings.json")).json();
  const asked = query.get("variant");
  if (asked && !(asked in settings.variants)) {
    status(`error: ?variant=${asked}: this export has ${Object.keys(settings.variants).join(", ")}`, "error");
    return;
  }
  const variant = asked || settings.variant;
  settings.dtype = settings.variants[variant];
  $("model").innerHTML =
    `<b>model</b> ${settings.name} · <b>variant</b> <span id="variant">${variant}</span> ` +
    `(transformers.js dtype ${settings.dtype}) · <b>backend</b> <span id="backend">…</span> · ` +
    `transformers.js ${settings.transformers_version}`;
  $("max-new-tokens").max = String(settings.max_new_tokens);
  const worker = new Worker("worker.js", { type: "module" });
  worker.onmessage = onMessage;
  worker.onerror = (e) => status(`error: the model's worker failed: ${e.message || "see the console"}`, "error");
  worker.postMessage({
    type: "load",
    settings,
    device: query.get("device") || "auto",
    threads: Number(query.get("threads")) || null,
  });
  $("image-file").addEventListener("change", () => {
    const file = $("image-file").files[0];
    if (file) Object.assign($("preview"), { src: URL.createObjectURL(file), hidden: false });
    canAsk();
  });
  $("question").addEventListener("input", canAsk);
  $("ask").addEventListener("click", () => ask(worker, settings));
}

main().catch((e) => status(`error: ${e.message}`, "error"));
