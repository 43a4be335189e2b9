//! The training loop (`vitgpt2-host train`), plain like nanoGPT's train.py: AdamW with weight
//! decay, warmup + linear/cosine decay, global-norm clipping, gradient accumulation, optional
//! frozen encoder; atomic checkpoints with optimizer state and step, from which `--resume`
//! continues exactly (the data order is a function of the seed and the position alone);
//! evaluation (loss, BLEU, ROUGE-L, CIDEr-D) into a JSON-lines log; a progress bar; a plot.
//!
//! Exactness of resume: bitwise on CPU when dropout is 0 (the synthetic presets). Dropout
//! draws from candle's generator, which cannot be seeded, so a resumed run with dropout > 0
//! continues with other masks (same data, optimizer and schedule).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::data::{load_captions, CaptionSet, FailureLog, Prefetcher, Sample};
use super::eval::{caption_set, make_labels, validation_loss, Evaluation};
use super::metrics::Scores;
use super::optim::{clip_global_norm, AdamW, Schedule};
use super::options::{ComputeDtype, Decay, PositionInit, TrainOptions, TrainerState};
use super::progress::Progress;
use super::run_dir::RunDir;
use super::setup::{default_pre, preset_config, select_device};
use crate::assets::{ModelAssets, Origin};
use crate::bundle::contract;
use crate::captioner::Captioner;
use crate::error::{write_json, Error, Result};
use crate::generate::GenerationConfig;
use crate::model::vit::sincos_position_embeddings;
use crate::model::{CandleEngine, VisionEncoderDecoder};
use crate::tokenizer::CaptionTokenizer;

#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    pub steps: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub final_eval: Option<Scores>,
    pub model_dir: PathBuf,
}

fn rt(stage: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::runtime(stage, e)
}

fn load_sets(args: &TrainOptions) -> Result<(CaptionSet, CaptionSet)> {
    let train = load_captions(&args.train, args.train_images.as_deref(), &args.caption_field)?;
    let (mut train, mut val) = match &args.val {
        Some(v) => (train, load_captions(v, args.val_images.as_deref(), &args.caption_field)?),
        None => train.split(args.val_fraction),
    };
    if let Some(r) = train.skip_report("training captions") {
        eprintln!("{r}");
    }
    if let Some(r) = val.skip_report("validation captions") {
        eprintln!("{r}");
    }
    if args.verify_images {
        let a = train.verify_images(args.workers);
        let b = val.verify_images(args.workers);
        eprintln!("verified images: {a} training and {b} validation image(s) dropped");
    }
    if train.samples.is_empty() {
        return Err(Error::setting("--train", "no training pairs left"));
    }
    Ok((train, val))
}

fn encode_all(tok: &CaptionTokenizer, samples: &[Sample]) -> Result<Vec<Vec<u32>>> {
    samples.iter().map(|s| tok.encode(&s.caption)).collect()
}

/// A fresh run: the run's `assets/` (tokenizer, processor, generation settings) and the model,
/// from a checkpoint or a preset.
fn start_fresh(args: &TrainOptions, run: &RunDir, train_set: &CaptionSet, device: &Device) -> Result<VisionEncoderDecoder> {
    let assets = run.assets();
    if assets.exists() {
        std::fs::remove_dir_all(&assets).map_err(|e| Error::io(&assets, "remove", e))?;
    }
    std::fs::create_dir_all(&assets).map_err(|e| Error::io(&assets, "create", e))?;
    match std::fs::remove_file(run.log()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(run.log(), "remove", e)),
        _ => {}
    }
    // Tokenizer: trained on the captions (presets), or the given/checkpoint's files.
    if let Some(n) = args.bpe_vocab.or(if args.tokenizer.is_none() && args.checkpoint.is_none() { Some(512) } else { None }) {
        let caps: Vec<String> = train_set.samples.iter().map(|s| s.caption.clone()).collect();
        super::tokenizer::train_bpe(&caps, n, &assets)?;
        eprintln!("trained a byte-level BPE of {n} ids on {} captions", caps.len());
    } else if let Some(from) = args.tokenizer.as_ref().or(args.checkpoint.as_ref()) {
        for name in contract::TOKENIZER_FILES {
            let p = from.join(name);
            if p.is_file() {
                std::fs::copy(&p, assets.join(name)).map_err(|e| Error::io(assets.join(name), "write", e))?;
            }
        }
    }
    let vocab = CaptionTokenizer::from_dir(&assets)?.vocab_size();
    let (model, pre) = match (&args.checkpoint, args.init_preset) {
        (Some(ck), _) => {
            let (m, report) = VisionEncoderDecoder::from_checkpoint(ck, device)?;
            eprintln!("model: {} ({} tensors)", ck.display(), report.loaded.len());
            let pp = ck.join(contract::PREPROCESSOR_CONFIG);
            let pre = if pp.is_file() { crate::preprocess::PreprocessConfig::from_file(&pp)? } else { default_pre(m.config.encoder.image_size) };
            let g = ck.join(contract::GENERATION_CONFIG);
            if g.is_file() {
                let to = assets.join(contract::GENERATION_CONFIG);
                std::fs::copy(&g, &to).map_err(|e| Error::io(&to, "write", e))?;
            }
            (m, pre)
        }
        (None, Some(p)) => {
            let mut cfg = preset_config(p, vocab);
            cfg.encoder.image_size = args.image_size.unwrap_or(cfg.encoder.image_size);
            cfg.encoder.patch_size = args.patch_size.unwrap_or(cfg.encoder.patch_size);
            cfg.validate().map_err(|m| Error::setting("--image-size/--patch-size", m))?;
            let m = VisionEncoderDecoder::random_init(&cfg, args.seed, device)?;
            if args.position_init == PositionInit::Sincos {
                sincos_position_embeddings(&cfg.encoder)
                    .and_then(|t| m.set_param("encoder.embeddings.position_embeddings", &t))
                    .map_err(|e| Error::runtime("position embeddings", e))?;
            }
            let n: usize = m.params().values().map(|v| v.elem_count()).sum();
            eprintln!("model: random {p:?} preset, {:.2} M parameters", n as f64 / 1e6);
            (m, default_pre(cfg.encoder.image_size))
        }
        (None, None) => return Err(Error::setting("--checkpoint", "give a starting checkpoint (--checkpoint DIR) or --init-preset tiny")),
    };
    write_json(&assets.join(contract::PREPROCESSOR_CONFIG), &pre)?;
    if !assets.join(contract::GENERATION_CONFIG).is_file() {
        let c = &model.config;
        let gen = serde_json::json!({
            "decoder_start_token_id": c.decoder_start_token_id, "bos_token_id": c.decoder.bos_token_id,
            "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "max_length": args.max_tokens + 1, "num_beams": 1,
        });
        write_json(&assets.join(contract::GENERATION_CONFIG), &gen)?;
    }
    // Both tokenizer forms (tokenizer.json, vocab.json + merges.txt) and their configs, so that
    // the run's checkpoints load in transformers' fast and slow tokenizers alike.
    let a = ModelAssets::with_config(&assets, model.config.clone(), Origin::Checkpoint)?;
    a.tokenizer.complete_files(&assets, &a.special, model.config.decoder.n_positions)?;
    Ok(model)
}

/// Validation loss and greedy captions of the first `eval_images` validation images.
struct EvalRound {
    val_loss: f64,
    captions: Evaluation,
}

struct EvalData {
    samples: Vec<Sample>,
    tokens: Vec<Vec<u32>>,
    refs: Vec<(PathBuf, Vec<String>)>,
}

fn evaluate(model: &VisionEncoderDecoder, captioner: &Captioner, data: &EvalData, args: &TrainOptions) -> Result<EvalRound> {
    let a = captioner.assets();
    let n = args.eval_batches * args.micro_batch;
    let val_loss = validation_loss(model, &a.special, &a.preprocess, &data.samples, &data.tokens, n, args.micro_batch, args.max_tokens, args.workers)?;
    let gen = GenerationConfig::greedy(&a.special, args.max_tokens + 1);
    let refs = &data.refs[..data.refs.len().min(args.eval_images)];
    let captions = caption_set("eval", captioner, refs, &gen, true)?;
    Ok(EvalRound { val_loss, captions })
}

fn log_eval(run: &RunDir, step: u64, r: &EvalRound) -> Result<()> {
    let s = &r.captions.scores;
    let examples: Vec<(&String, &Vec<String>)> = r.captions.captions.iter().take(4).map(|c| (&c.1, &c.2)).collect();
    run.append_log(&serde_json::json!({
        "step": step, "kind": "eval", "val_loss": r.val_loss,
        "bleu1": s.bleu[0], "bleu2": s.bleu[1], "bleu3": s.bleu[2], "bleu4": s.bleu[3],
        "rouge_l": s.rouge_l, "cider_d": s.cider_d, "exact": s.exact, "n": s.n, "failed": r.captions.failed,
        "examples": examples,
    }))
}

/// `vitgpt2-host train`.
pub fn train(args: &TrainOptions) -> Result<TrainSummary> {
    if args.micro_batch == 0 || !args.batch_size.is_multiple_of(args.micro_batch) {
        return Err(Error::setting("--batch-size", format!("{} is not a multiple of --micro-batch {}", args.batch_size, args.micro_batch)));
    }
    let accum = args.batch_size / args.micro_batch;
    let device = select_device(&args.device)?;
    let run = RunDir::new(&args.out);
    std::fs::create_dir_all(&run.out).map_err(|e| Error::io(&run.out, "create", e))?;
    let (train_set, val_set) = load_sets(args)?;
    eprintln!("data: {} training pairs, {} validation pairs ({} images)", train_set.samples.len(), val_set.samples.len(), val_set.references().len());

    let resume_from = if args.resume { run.latest_checkpoint() } else { None };
    if !args.resume && run.latest_checkpoint().is_some() {
        return Err(Error::setting("--out", format!("{} already has checkpoints: pass --resume to continue, or another --out", run.out.display())));
    }
    let (model, assets_dir, state0) = match &resume_from {
        Some(ck) => {
            let (model, _) = VisionEncoderDecoder::from_checkpoint(ck, &device)?;
            let path = ck.join("trainer_state.json");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, "read", e))?;
            let st: TrainerState = serde_json::from_str(&text).map_err(|e| Error::checkpoint(&path, e))?;
            eprintln!("resuming from {} (step {})", ck.display(), st.step);
            (model, ck.clone(), Some(st))
        }
        None => (start_fresh(args, &run, &train_set, &device)?, run.assets(), None),
    };
    let model = Arc::new(model);
    // One set of assets (tokenizer, processor, special tokens) for training and its evaluations.
    let assets = ModelAssets::with_config(&assets_dir, model.config.clone(), Origin::Checkpoint)?;
    let captioner = Captioner::new(assets, Box::new(CandleEngine::new(Arc::clone(&model), Vec::new())), 0.0);
    let (tok, pre, special) = (&captioner.assets().tokenizer, captioner.assets().preprocess.clone(), captioner.assets().special.clone());

    let train_tokens = encode_all(tok, &train_set.samples)?;
    let eval_data = EvalData { tokens: encode_all(tok, &val_set.samples)?, refs: val_set.references(), samples: val_set.samples };
    let n_train = train_set.samples.len();
    let total_steps = args.steps.unwrap_or_else(|| ((args.epochs * n_train as f64) / args.batch_size as f64).ceil().max(1.0) as u64);
    let mut state = TrainerState {
        step: 0,
        total_steps,
        seed: args.seed,
        micro_batch: args.micro_batch,
        accum,
        n_train,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        decay: args.decay,
        weight_decay: args.weight_decay,
        clip: args.clip,
        freeze_encoder: args.freeze_encoder,
        max_tokens: args.max_tokens,
    };
    // The ViT pooler takes no part in captions (no gradient); a frozen encoder is not trained.
    let params: Vec<(String, candle_core::Var)> = model
        .params()
        .iter()
        .filter(|(n, _)| !n.starts_with("encoder.pooler.") && (!args.freeze_encoder || !n.starts_with("encoder.")))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(params, args.weight_decay, args.beta1, args.beta2, args.adam_eps)?;
    if let (Some(ck), Some(st)) = (&resume_from, &state0) {
        let mut expect = state.clone();
        expect.step = st.step;
        if &expect != st {
            return Err(Error::setting("--resume", format!("the settings or data differ from the checkpoint's ({}); resume with the same arguments", st.diff(&expect))));
        }
        opt.load(&ck.join("optimizer.safetensors"), st.step)?;
        state.step = st.step;
        run.truncate_log(st.step)?;
    }
    let sched = Schedule { lr: args.lr, min_lr: args.min_lr, warmup: args.warmup_steps, total: total_steps, cosine: args.decay == Decay::Cosine };

    let prefetch = Prefetcher::start(Arc::new(train_set.samples), args.seed, args.micro_batch, state.step * accum as u64, pre.clone(), args.workers, args.prefetch);
    let mut failures = FailureLog::default();
    let mut summary = TrainSummary { model_dir: run.model(), ..Default::default() };
    let first_step = state.step;
    let stop_at = args.stop_after.map(|k| (first_step + k).min(total_steps)).unwrap_or(total_steps);
    let mut progress = Progress::new("train", total_steps, args.quiet);
    let t_run = Instant::now();
    let mut window = (0usize, Instant::now());
    eprintln!("training {} steps from step {first_step} (batch {} = {} × {accum}), on {:?}", total_steps, args.batch_size, args.micro_batch, device);
    while state.step < stop_at {
        let step = state.step;
        let lr = sched.at(step);
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.params.len()];
        let mut loss_sum = 0.0;
        let mut micro_done = 0;
        let mut rows = 0;
        // bf16: a fresh view of the f32 master weights for this step (the last step moved them).
        let view = match args.dtype {
            ComputeDtype::F32 => None,
            ComputeDtype::Bf16 => Some(model.compute_view(DType::BF16).map_err(rt("bf16 weights"))?),
        };
        for _ in 0..accum {
            let batch = prefetch.next()?;
            failures.report(&batch.failed);
            if batch.rows.is_empty() {
                continue;
            }
            let labels = make_labels(&train_tokens, &batch.rows, special.eos(), args.max_tokens);
            rows += batch.rows.len();
            let px = Tensor::from_vec(batch.pixels, (batch.rows.len(), 3, pre.size.height, pre.size.width), &device).map_err(rt("batch"))?;
            let (loss, _) = match &view {
                None => model.loss(&px, &labels, &special, true, args.freeze_encoder),
                Some(v) => px.to_dtype(DType::BF16).and_then(|px| v.loss(&px, &labels, &special, true, args.freeze_encoder)),
            }
            .map_err(rt("training step"))?;
            let g = (&loss / accum as f64).and_then(|l| l.backward()).map_err(rt("backward"))?;
            for (i, (_, var, _)) in opt.params.iter().enumerate() {
                if let Some(gi) = g.get(var) {
                    // Detached: a gradient carries the graph of the step that made it.
                    let gi = gi.detach();
                    grads[i] = Some(match grads[i].take() {
                        Some(a) => (a + gi).map_err(rt("backward"))?,
                        None => gi,
                    });
                }
            }
            loss_sum += loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(rt("loss"))?;
            micro_done += 1;
        }
        if micro_done == 0 {
            progress.println(&format!("warning: step {step}: no image of the batch decoded; skipped"));
            state.step += 1;
            continue;
        }
        let loss = loss_sum / micro_done as f64;
        if !loss.is_finite() {
            return Err(Error::runtime("training", format!("loss is {loss} at step {step}: lower --lr or check the data")));
        }
        let norm = clip_global_norm(&mut grads, args.clip)?;
        opt.step(&grads, lr)?;
        state.step += 1;
        summary.first_loss.get_or_insert(loss);
        summary.last_loss = Some(loss);
        window.0 += rows;
        let sps = window.0 as f64 / window.1.elapsed().as_secs_f64().max(1e-9);
        progress.update(state.step, format!("loss {loss:.4} lr {lr:.2e} {sps:.1} samples/s"));
        if state.step.is_multiple_of(args.log_every.max(1)) || state.step == stop_at {
            run.append_log(&serde_json::json!({"step": state.step, "kind": "train", "loss": loss, "lr": lr, "grad_norm": norm, "samples_per_s": sps, "elapsed_s": t_run.elapsed().as_secs_f64()}))?;
            window = (0, Instant::now());
        }
        let last = state.step == total_steps;
        if (last || (args.eval_every > 0 && state.step.is_multiple_of(args.eval_every))) && !eval_data.samples.is_empty() {
            let r = evaluate(&model, &captioner, &eval_data, args)?;
            log_eval(&run, state.step, &r)?;
            let s = &r.captions.scores;
            progress.println(&format!(
                "step {}: val loss {:.4}, BLEU-4 {:.3}, ROUGE-L {:.3}, CIDEr-D {:.3}, exact {:.1}% — « {} »",
                state.step,
                r.val_loss,
                s.bleu[3],
                s.rouge_l,
                s.cider_d,
                100.0 * s.exact,
                r.captions.captions.first().map(|c| c.1.as_str()).unwrap_or("")
            ));
            if last {
                summary.final_eval = Some(r.captions.scores);
            }
        }
        if (args.save_every > 0 && state.step.is_multiple_of(args.save_every)) || state.step == stop_at {
            run.save_checkpoint(&model, &opt, &state, 2)?;
        }
    }
    progress.finish(String::new());
    summary.steps = state.step;
    if state.step == total_steps {
        run.save_model(&model)?;
        if let Err(e) = super::plot::plot_log(&run.log(), &run.out.join("plot.png")) {
            eprintln!("warning: no plot: {e}");
        }
        eprintln!("saved the trained model to {}", run.model().display());
    }
    Ok(summary)
}
