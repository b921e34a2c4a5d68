// Greedy answers of an lsd-edge export in transformers.js (Node, onnxruntime-node), loaded as an app
// would load it: `from_pretrained(folder, { dtype })` and nothing else.
//
//   node web/answers.mjs EXPORT_DIR DTYPE QUESTIONS.json MAX_NEW_TOKENS [THREADS]
//
// QUESTIONS.json: [{"image": "path.png", "question": "..."}]. Prints one JSON line: a list of
// {"text", "ids", "seconds", "first_token_s"} (seconds of generate alone, the load excluded).
import { AutoProcessor, LlavaForConditionalGeneration, RawImage, TextStreamer, env } from '@huggingface/transformers';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';

const [folder, dtype, questionsFile, maxNew, threads] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = '/';
const dir = resolve(folder);
const session_options = threads ? { intraOpNumThreads: Number(threads), interOpNumThreads: 1 } : {};
const processor = await AutoProcessor.from_pretrained(dir);
const model = await LlavaForConditionalGeneration.from_pretrained(dir, { dtype, session_options });
const out = [];
for (const { image, question } of JSON.parse(readFileSync(questionsFile, 'utf8'))) {
  const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];
  const prompt = processor.tokenizer.apply_chat_template(messages, { add_generation_prompt: true, tokenize: false });
  const inputs = await processor(await RawImage.read(resolve(image)), prompt);
  const t0 = performance.now();
  let first = null;
  const streamer = new TextStreamer(processor.tokenizer, {
    skip_prompt: true,
    callback_function: () => { first ??= performance.now(); },
  });
  const ids = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false, streamer });
  const seconds = (performance.now() - t0) / 1000;
  const answer = ids.slice(null, [inputs.input_ids.dims.at(-1), null]);
  out.push({
    text: processor.batch_decode(answer, { skip_special_tokens: true })[0],
    ids: Array.from(answer.data, Number),
    seconds,
    first_token_s: first === null ? null : (first - t0) / 1000,
  });
}
console.log(JSON.stringify(out));
