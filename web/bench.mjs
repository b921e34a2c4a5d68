// Speed of an lsd-edge export in transformers.js (Node, onnxruntime-node CPU), as an app runs it.
//
//   node web/bench.mjs EXPORT_DIR DTYPE QUESTIONS.json NEW_TOKENS [THREADS]
//
// One warm-up answer, then every question answered with exactly NEW_TOKENS new tokens
// (min_new_tokens = max_new_tokens, greedy). Prints one JSON line: the median time to first token
// (image encoding and prefill included) and the median decode tokens/s after the first token.
import { AutoProcessor, LlavaForConditionalGeneration, RawImage, TextStreamer, env } from '@huggingface/transformers';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';

const [folder, dtype, questionsFile, newTokens, threads] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = './';
const session_options = threads ? { intraOpNumThreads: Number(threads), interOpNumThreads: 1 } : {};
const processor = await AutoProcessor.from_pretrained(resolve(folder));
const model = await LlavaForConditionalGeneration.from_pretrained(resolve(folder), { dtype, session_options });
const n = Number(newTokens);
const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function once(image, question) {
  const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];
  const prompt = processor.tokenizer.apply_chat_template(messages, { add_generation_prompt: true, tokenize: false });
  const t0 = performance.now();
  const inputs = await processor(await RawImage.read(resolve(image)), prompt);
  let first = null;
  const streamer = new TextStreamer(processor.tokenizer, { skip_prompt: true, callback_function: () => { first ??= performance.now(); } });
  await model.generate({ ...inputs, max_new_tokens: n, min_new_tokens: n, do_sample: false, streamer });
  const end = performance.now();
  return { ttft: (first - t0) / 1000, decode: (n - 1) / ((end - first) / 1000) };
}

const questions = JSON.parse(readFileSync(questionsFile, 'utf8'));
await once(questions[0].image, questions[0].question);
const runs = [];
for (const { image, question } of questions) runs.push(await once(image, question));
console.log(JSON.stringify({
  dtype, threads: threads ? Number(threads) : null, questions: runs.length, new_tokens: n,
  ttft_s: median(runs.map((r) => r.ttft)), decode_tokens_per_s: median(runs.map((r) => r.decode)),
}));
