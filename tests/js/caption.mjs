#!/usr/bin/env node
// Greedy captions from a vision-encoder-decoder bundle in transformers.js, fully offline.
//
//   node tests/js/caption.mjs BUNDLE_DIR DTYPE IMAGE...
//
// BUNDLE_DIR is laid out as transformers.js repositories are (config.json, generation_config.json,
// preprocessor_config.json, tokenizer.json, tokenizer_config.json at the root; graphs in onnx/:
// encoder_model{suffix}.onnx + decoder_model_merged{suffix}.onnx). DTYPE is a transformers.js
// dtype: fp32 | fp16 | q8 (= *_quantized.onnx) | int8 | uint8 | q4 | q4f16 | bnb4.
//
// Prints one JSON line per image: {"image": path, "tokens": [...], "text": "..."}; tokens are the
// generated ids without the decoder start token, up to and including </s> (as vitgpt2-node prints
// them). Greedy search (num_beams 1, no sampling); max_length comes from the bundle's
// generation_config.json / config.json (transformers.js's default is 20) unless MAX_LENGTH is set
// in the environment. Exit status 1 with one line on stderr if loading or a caption fails.
//
// Set-up (once; no install scripts run, onnxruntime-node's CPU binary ships inside the package):
//   cd tests/js && npm ci --ignore-scripts
import fs from 'node:fs';
import path from 'node:path';
import {
    AutoImageProcessor,
    AutoModelForVision2Seq,
    AutoTokenizer,
    RawImage,
    env,
} from '@huggingface/transformers';

const [bundleArg, dtype, ...images] = process.argv.slice(2);
if (!bundleArg || !dtype || images.length === 0) {
    console.error('usage: node caption.mjs BUNDLE_DIR DTYPE IMAGE...');
    process.exit(2);
}

// Offline: files come from BUNDLE_DIR only, never from the Hub or a cache.
const bundle = path.resolve(bundleArg);
if (!fs.existsSync(path.join(bundle, 'config.json'))) {
    console.error(`error: ${bundle}: no config.json`);
    process.exit(1);
}
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(bundle) + path.sep;
env.useFSCache = false;
env.useBrowserCache = false;
const modelId = path.basename(bundle);
const opts = { local_files_only: true };

try {
    const model = await AutoModelForVision2Seq.from_pretrained(modelId, { ...opts, dtype, device: 'cpu' });
    const processor = await AutoImageProcessor.from_pretrained(modelId, opts);
    const tokenizer = await AutoTokenizer.from_pretrained(modelId, opts);
    const eos = model.generation_config?.eos_token_id ?? model.config.eos_token_id ?? model.config.decoder?.eos_token_id;
    const eosIds = new Set([eos].flat().filter((x) => x !== undefined && x !== null).map(Number));
    const genArgs = { do_sample: false, num_beams: 1 };
    if (process.env.MAX_LENGTH) genArgs.max_length = Number(process.env.MAX_LENGTH);

    for (const file of images) {
        const image = await RawImage.read(path.resolve(file));
        const { pixel_values } = await processor(image);
        const out = await model.generate({ pixel_values, ...genArgs });
        const seq = out.tolist()[0].map(Number);
        const tokens = [];
        for (const t of seq.slice(1)) {
            tokens.push(t);
            if (eosIds.has(t)) break;
        }
        const text = tokenizer.decode(tokens, { skip_special_tokens: true });
        console.log(JSON.stringify({ image: file, tokens, text }));
    }
    await Promise.all(Object.values(model.sessions ?? {}).map((s) => s?.release?.()));
} catch (e) {
    console.error(`error: ${String(e?.message ?? e).split('\n')[0]}`);
    process.exit(1);
}
