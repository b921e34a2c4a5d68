// The model, in a worker so the page stays responsive and its streamed text shows as it arrives.
// Messages in: {type: "load", settings, device, threads}, {type: "ask", id, image, question,
// max_new_tokens, ignore_eos}. Out: progress, ready, first, text, done, error (see app.js).

let T = null; // the transformers.js module
let processor = null;
let model = null;
let eosIds = new Set();

const post = (message) => self.postMessage(message);

self.onmessage = async ({ data }) => {
  try {
    if (data.type === "load") await load(data);
    else if (data.type === "ask") await ask(data);
  } catch (e) {
    post({ type: "error", id: data.id ?? null, message: String(e?.message ?? e).split("\n")[0] });
  }
};

function configure(settings, threads) {
  const { env } = T;
  // Only the files this server hands out: no hub, no CDN, and no copy kept in the browser's cache
  // (an export written again under the same name must be read again).
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = settings.model_root;
  env.useBrowserCache = false;
  env.useWasmCache = false;
  const wasm = env.backends.onnx.wasm;
  wasm.wasmPaths = {
    mjs: `${settings.wasm_prefix}ort-wasm-simd-threaded.asyncify.mjs`,
    wasm: `${settings.wasm_prefix}ort-wasm-simd-threaded.asyncify.wasm`,
  };
  if (threads) wasm.numThreads = threads;
}

async function webgpuAdapter() {
  try {
    return Boolean(navigator.gpu && (await navigator.gpu.requestAdapter()));
  } catch {
    return false;
  }
}

async function load({ settings, device, threads }) {
  T = await import(settings.transformers);
  configure(settings, threads);
  const progress_callback = (p) => {
    if (p.status === "progress" && p.file) post({ type: "progress", text: `${p.file} ${Math.round(p.progress)}%` });
  };
  processor = await T.AutoProcessor.from_pretrained(settings.model_id, { progress_callback });
  const tries = device === "auto" ? ((await webgpuAdapter()) ? ["webgpu", "wasm"] : ["wasm"]) : [device];
  let failed = null;
  for (const on of tries) {
    try {
      post({ type: "progress", text: `loading the ${settings.dtype} graphs on ${on}…` });
      model = await T.LlavaForConditionalGeneration.from_pretrained(settings.model_id, {
        dtype: settings.dtype,
        device: on,
        progress_callback,
      });
      device = on;
      break;
    } catch (e) {
      failed = failed ?? `${on}: ${String(e?.message ?? e).split("\n")[0]}`;
    }
  }
  if (!model) throw new Error(`the model did not load (${failed})`);
  const eos = model.generation_config?.eos_token_id ?? [];
  eosIds = new Set((Array.isArray(eos) ? eos : [eos]).map(Number));
  post({
    type: "ready",
    device,
    fallback: device !== tries[0] ? failed : null,
    threads: T.env.backends.onnx.wasm.numThreads ?? 1,
    isolated: self.crossOriginIsolated,
  });
}

async function ask({ id, image, question, max_new_tokens, ignore_eos }) {
  // The clock starts before the image is read: the time to first token counts preprocessing too,
  // as lsd-edge's own runners count it.
  const t0 = performance.now();
  const picture = await T.RawImage.fromBlob(image);
  const messages = [{ role: "user", content: [{ type: "image" }, { type: "text", text: question }] }];
  const prompt = processor.tokenizer.apply_chat_template(messages, {
    add_generation_prompt: true,
    tokenize: false,
  });
  const inputs = await processor(picture, prompt);
  let first = null;
  const streamer = new T.TextStreamer(processor.tokenizer, {
    skip_prompt: true,
    skip_special_tokens: true,
    callback_function: (text) => post({ type: "text", id, text }),
    token_callback_function: () => {
      if (first === null) {
        first = performance.now();
        post({ type: "first", id, ttft_ms: first - t0 });
      }
    },
  });
  const output = await model.generate({
    ...inputs,
    max_new_tokens,
    do_sample: false,
    streamer,
    ...(ignore_eos ? { min_new_tokens: max_new_tokens } : {}),
  });
  const end = performance.now();
  const ids = output.slice(null, [inputs.input_ids.dims.at(-1), null]);
  const list = Array.from(ids.data, Number);
  const stopped = list.length > 0 && eosIds.has(list.at(-1)) ? "stop" : "length";
  post({
    type: "done",
    id,
    text: processor.batch_decode(ids, { skip_special_tokens: true })[0],
    tokens: list.length - (stopped === "stop" ? 1 : 0), // the stop token is not part of the answer
    prompt_tokens: inputs.input_ids.dims.at(-1),
    ttft_ms: (first ?? end) - t0,
    total_ms: end - t0,
    stopped,
  });
}
