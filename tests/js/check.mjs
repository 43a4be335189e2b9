#!/usr/bin/env node
// transformers.js against onnxruntime on the interop fixtures (tests/fixtures/interop/).
//
//   cd tests/js && npm ci --ignore-scripts && node check.mjs [EXTRA_CASE_DIR...]
//
// For every bundle and dtype listed in reference.json, runs caption.mjs (transformers.js, offline)
// on the PIL-resized 32x32 copies of the test images (images/resized32/: transformers.js resizes
// with sharp, whose pixels differ from PIL's; at the model's size it resizes nothing) and requires
// its greedy tokens to equal onnxruntime's greedy loop over the same graphs, run on this machine by
// ort_greedy.py with the Python in VITGPT2_PYTHON (required under CI): onnxruntime's q8/int8
// products saturate on x86-64 CPUs without VNNI, so their tokens depend on the CPU. The stored
// tokens (reference.json: onnxruntime.<dtype>.greedy.<image>.tokens, computed on a CPU with VNNI,
// exact) are reported beside, and are the reference when no Python is given. The live run's pixel
// values must hash to the stored ones (same preprocessing).
//
// EXTRA_CASE_DIR: a case laid out like ../shared/interop/optimum-merged-fp32 (bundle/,
// images/, expected.json with ort_greedy_tokens); its images are resized with PIL-equivalent
// pre-resized copies only if it has images/resized32/, else used as they are.
//
// Prints one line per case and a JSON summary; exit status 0 when every case agrees.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const fixtures = path.resolve(here, '..', 'fixtures', 'interop');
const ref = JSON.parse(fs.readFileSync(path.join(fixtures, 'reference.json'), 'utf8'));
const images = Object.keys(ref.images);

function caption(bundle, dtype, files) {
    const out = execFileSync(process.execPath, [path.join(here, 'caption.mjs'), bundle, dtype, ...files], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
    });
    return out
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l));
}

const python = process.env.VITGPT2_PYTHON;
if (!python && process.env.CI) {
    console.log('VITGPT2_PYTHON is not set: under CI the live onnxruntime reference is required (see .ci/run)');
    process.exit(1);
}

// onnxruntime's greedy tokens on this machine: { image path: { tokens, pixel_values_sha256_f32le } }.
function ortGreedy(bundle, dtype, files) {
    const out = execFileSync(python, [path.join(here, 'ort_greedy.py'), bundle, dtype, ...files], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
    });
    return JSON.parse(out);
}

const cases = [];
for (const [bundle, info] of Object.entries(ref.bundles)) {
    for (const dtype of info.dtypes) cases.push({ bundle: path.join(fixtures, bundle), dtype, name: `${bundle} ${dtype}` });
}

const summary = { transformers_js: null, cases: {} };
try {
    const pkg = JSON.parse(
        fs.readFileSync(path.join(here, 'node_modules', '@huggingface', 'transformers', 'package.json'), 'utf8'),
    );
    summary.transformers_js = pkg.version;
} catch {}

let ok = true;
for (const c of cases) {
    const files = images.map((n) => path.join(fixtures, ref.images[n].resized32));
    let got;
    try {
        got = caption(c.bundle, c.dtype, files);
    } catch (e) {
        console.log(`${c.name}: FAIL (${String(e.stderr ?? e).trim().split('\n').pop()})`);
        summary.cases[c.name] = 'error';
        ok = false;
        continue;
    }
    const stored = images.map((n) => ref.onnxruntime[c.dtype].greedy[n].tokens);
    let want = stored;
    let where = 'stored onnxruntime';
    if (python) {
        let live;
        try {
            live = ortGreedy(c.bundle, c.dtype, files);
        } catch (e) {
            console.log(`${c.name}: FAIL (onnxruntime reference: ${String(e.stderr ?? e).trim().split('\n').pop()})`);
            summary.cases[c.name] = 'error';
            ok = false;
            continue;
        }
        const pixelsOk = images.every((n, i) => live[files[i]].pixel_values_sha256_f32le === ref.images[n].pixel_values_sha256_f32le);
        if (!pixelsOk) {
            console.log(`${c.name}: FAIL (ort_greedy.py's pixel values differ from the stored ones)`);
            summary.cases[c.name] = 'error';
            ok = false;
            continue;
        }
        want = images.map((n, i) => live[files[i]].tokens);
        where = 'onnxruntime here';
        const storedSame = images.map((n, i) => JSON.stringify(want[i]) === JSON.stringify(stored[i]));
        if (!storedSame.every(Boolean)) {
            console.log(`   ${c.name}: onnxruntime here differs from the stored (exact, VNNI) tokens ${JSON.stringify(storedSame)}: its 8-bit kernel saturates on this CPU`);
        }
    }
    const same = images.map((n, i) => JSON.stringify(got[i].tokens) === JSON.stringify(want[i]));
    const good = same.every(Boolean);
    ok &&= good;
    summary.cases[c.name] = same;
    console.log(`${c.name}: transformers.js greedy == ${where} ${JSON.stringify(same)} ${good ? 'OK' : 'FAIL'}`);
    if (!good) {
        images.forEach((n, i) => {
            if (!same[i]) console.log(`   ${n}: got ${JSON.stringify(got[i].tokens)} want ${JSON.stringify(want[i])}`);
        });
    }
}

for (const dir of process.argv.slice(2)) {
    const expected = JSON.parse(fs.readFileSync(path.join(dir, 'expected.json'), 'utf8'));
    const names = Object.keys(expected.ort_greedy_tokens);
    const imgDir = fs.existsSync(path.join(dir, 'images', 'resized32')) ? path.join(dir, 'images', 'resized32') : path.join(dir, 'images');
    const got = caption(path.join(dir, 'bundle'), 'fp32', names.map((n) => path.join(imgDir, n)));
    const same = names.map((n, i) => JSON.stringify(got[i].tokens) === JSON.stringify(expected.ort_greedy_tokens[n]));
    const good = same.every(Boolean);
    ok &&= good;
    summary.cases[dir] = same;
    console.log(`${dir} (${path.relative(dir, imgDir)}): transformers.js greedy == expected.json ${JSON.stringify(same)} ${good ? 'OK' : 'FAIL'}`);
}

summary.ok = ok;
console.log(JSON.stringify(summary));
process.exit(ok ? 0 : 1);
