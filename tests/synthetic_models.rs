//! Loaders and architectures on synthetic tiny models: GGUF of every tensor type and
//! Hugging Face directories (F32/F16/BF16, sharded) for llama, qwen2 and qwen3 (gemma3 from
//! GGUF only, with a sliding window shorter than the tokens), checked
//! against a naive f64 reference forward, through the CPU backend plugin.

use coordgen::engine::{GenerateParams, Session};
use coordgen_model::quant::GgmlType;
use coordgen_tests::*;

/// With 15-bit activations every quantized type matches the reference on its stored
/// weights to 2e-4; with the default 8-bit ones, to 2e-2 (the activations' rounding).
#[test]
fn every_arch_and_tensor_type_matches_reference() {
    for (bits, tol) in [(15, 2e-4), (8, 2e-2)] {
        every_arch_and_type(bits, tol);
    }
}

fn every_arch_and_type(bits: u32, tol: f64) {
    let dir = temp_dir("synthetic-gguf");
    let mut b = cpu_backend_with(2, &format!("activation_bits = {bits}"));
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3] {
        let spec = Spec::tiny(arch);
        let w = random_weights(&spec, 1);
        for ty in GgmlType::ALL {
            let path = dir.join(format!("{}-{}.gguf", arch.name(), ty.name()));
            write_gguf(&spec, &w, ty, &path);
            let (ours, nv) = backend_logits(&mut b, &path, &TOKENS);
            assert_eq!(nv, spec.n_vocab);
            let reference = reference_logits(&spec, &as_stored(&w, ty), &TOKENS);
            assert_close(&format!("{} {} {bits}-bit", arch.name(), ty.name()), &ours, &reference, tol);
        }
    }
}

#[test]
fn safetensors_directories_match_reference_and_gguf() {
    let dir = temp_dir("synthetic-hf");
    let mut b = cpu_backend(2);
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let spec = Spec::tiny(arch);
        let w = random_weights(&spec, 2);
        for (dtype, shards) in [(safetensors::Dtype::F32, 1), (safetensors::Dtype::F16, 3), (safetensors::Dtype::BF16, 1)] {
            let d = dir.join(format!("{}-{dtype:?}-{shards}", arch.name()));
            write_hf_dir(&spec, &w, dtype, shards, &d);
            let (ours, _) = backend_logits(&mut b, &d, &TOKENS);
            let reference = reference_logits(&spec, &round_to(&w, dtype), &TOKENS);
            assert_close(&format!("{} {dtype:?} x{shards}", arch.name()), &ours, &reference, 2e-4);
        }
        // The same F32 weights as GGUF (llama Q/K permuted by the writer) give the same logits.
        let g = dir.join(format!("{}.gguf", arch.name()));
        write_gguf(&spec, &w, GgmlType::F32, &g);
        let (from_gguf, _) = backend_logits(&mut b, &g, &TOKENS);
        let (from_dir, _) = backend_logits(&mut b, &dir.join(format!("{}-F32-1", arch.name())), &TOKENS);
        for (a, c) in from_gguf.iter().zip(&from_dir) {
            for (x, y) in a.iter().zip(c) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{}: gguf {x} vs safetensors {y}", arch.name());
            }
        }
    }
}

#[test]
fn session_generates_and_chat_template_renders_on_synthetic_models() {
    let dir = temp_dir("synthetic-session");
    let spec = Spec::tiny(Arch::Qwen2);
    let w = random_weights(&spec, 3);
    let path = dir.join("m.gguf");
    write_gguf(&spec, &w, GgmlType::Q8_0, &path);
    let mut s = Session::open(cpu_backend(1), &path, 128).unwrap();
    let rendered = s.render_chat(&[coordgen::chat::Message::new("user", "hi")], true).unwrap();
    assert_eq!(rendered, "<user>hi\n<assistant>");
    let prompt = s.tok().encode("hello world", true).unwrap();
    assert_eq!(prompt.len(), 11, "byte-level vocabulary: one token per byte");
    assert_eq!(s.tok().decode(&prompt).unwrap(), "hello world");
    let p = GenerateParams { max_tokens: 12, stop_at_eos: false, ..Default::default() };
    let g1 = s.generate(&prompt, &p, &mut |_| {}).unwrap();
    assert_eq!(g1.tokens.len(), 12);
    // Greedy decoding equals the reference model's argmax continuation, token by token.
    let wq = as_stored(&w, GgmlType::Q8_0);
    let mut seq = prompt.clone();
    for &t in &g1.tokens {
        let logits = reference_logits(&spec, &wq, &seq);
        let last = logits.last().unwrap();
        let best = (0..last.len()).max_by(|&a, &b| last[a].partial_cmp(&last[b]).unwrap().then(b.cmp(&a))).unwrap();
        assert_eq!(t as usize, best, "greedy token differs from the reference argmax");
        seq.push(t);
    }
    // A second run reuses the cached prompt and gives the same tokens.
    let g2 = s.generate(&prompt, &p, &mut |_| {}).unwrap();
    assert_eq!(g1.tokens, g2.tokens);
    assert_eq!(g2.timings.prefill_tokens, 1, "only the last prompt token is recomputed");
}

#[test]
fn streaming_stop_strings_and_seeded_sampling() {
    let dir = temp_dir("synthetic-stop");
    let spec = Spec::tiny(Arch::Llama);
    let path = dir.join("m.gguf");
    write_gguf(&spec, &random_weights(&spec, 5), GgmlType::Q4K, &path);
    let mut s = Session::open(cpu_backend(1), &path, 256).unwrap();
    let prompt = s.tok().encode("abc", true).unwrap();
    let greedy = GenerateParams { max_tokens: 24, stop_at_eos: false, ..Default::default() };
    let mut streamed = String::new();
    let full = s.generate(&prompt, &greedy, &mut |p| streamed.push_str(p)).unwrap();
    assert_eq!(streamed, full.text, "streamed pieces add up to the text");
    assert_eq!(full.finish_reason, "length");
    // Stop at a string taken from the middle of the greedy output: the text ends right
    // before it and nothing after it was streamed.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let stopped = s.generate(&prompt, &GenerateParams { stop: vec![stop.clone()], ..greedy.clone() }, &mut |p| streamed.push_str(p)).unwrap();
    assert_eq!(stopped.finish_reason, "stop");
    assert_eq!(stopped.text, full.text[..cut]);
    assert_eq!(streamed, stopped.text);
    // Sampling: the same seed repeats, another seed differs.
    let mut sample = |seed| {
        let p = GenerateParams { sampling: coordgen::sampling::SamplingParams { temperature: 1.5, seed, ..Default::default() }, ..greedy.clone() };
        s.generate(&prompt, &p, &mut |_| {}).unwrap().tokens
    };
    let (a, b, c) = (sample(1), sample(1), sample(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// One forward over several slots gives every slot's rows bit-identical to the same batch
/// run alone (a plain decode, a causal chunk, a token tree with a mask), appends the same
/// KV entries, and a bad batch among them fails the call with no slot changed. Checked
/// through the plugin (interface version 4) on Q4_K and F16 weights.
#[test]
fn forward_over_several_slots_equals_separate_forwards() {
    use coordgen::plugins::Forward;
    let dir = temp_dir("synthetic-slots");
    let spec = Spec::tiny(Arch::Qwen2);
    let w = random_weights(&spec, 5);
    for ty in [GgmlType::Q4K, GgmlType::F16] {
        let path = dir.join(format!("m-{}.gguf", ty.name()));
        write_gguf(&spec, &w, ty, &path);
        let mut b = cpu_backend(2);
        let m = b.load_model(&path).unwrap();
        // Three prefixes of different lengths, each in a slot and in a twin slot.
        let prefixes: [&[u32]; 3] = [&TOKENS[..2], &TOKENS[..5], &TOKENS[..7]];
        let mut slots = Vec::new();
        for p in prefixes {
            let pair: Vec<u32> = (0..2).map(|_| b.create_slot(m.handle, 32).unwrap()).collect();
            let pos: Vec<u32> = (0..p.len() as u32).collect();
            for &s in &pair {
                b.forward(&Forward { slot: s, tokens: p, positions: &pos, mask: &[], logit_rows: &[] }).unwrap();
            }
            slots.push(pair);
        }
        let tree_mask = [1u8, 0, 0, 1, 1, 0, 1, 0, 1];
        let (t0, t1, t2): (Vec<u32>, Vec<u32>, Vec<u32>) = (vec![99], vec![3, 45, 310, 17], vec![256, 0, 1]);
        let (p0, p1, p2): (Vec<u32>, Vec<u32>, Vec<u32>) = (vec![2], (5..9).collect(), vec![7, 8, 8]);
        let batches = |k: usize| {
            vec![
                Forward { slot: slots[0][k], tokens: &t0, positions: &p0, mask: &[], logit_rows: &[0] },
                Forward { slot: slots[1][k], tokens: &t1, positions: &p1, mask: &[], logit_rows: &[0, 1, 2, 3] },
                Forward { slot: slots[2][k], tokens: &t2, positions: &p2, mask: &tree_mask, logit_rows: &[2, 0] },
            ]
        };
        let alone: Vec<Vec<f32>> = batches(1).iter().map(|f| b.forward(f).unwrap()).collect();
        let merged = b.forward_slots(&batches(0)).unwrap();
        assert_eq!(merged.len(), 3);
        for (i, (a, m)) in alone.iter().zip(&merged).enumerate() {
            assert_eq!(a.len(), m.len(), "{}: batch {i} rows", ty.name());
            assert!(a.iter().zip(m).all(|(x, y)| x.to_bits() == y.to_bits()), "{}: batch {i} differs when merged", ty.name());
        }
        // The KV entries written are the same: the next decode agrees bit for bit too.
        for (pair, f) in slots.iter().zip(batches(0)) {
            let n = b.slot_len(pair[0]).unwrap();
            assert_eq!(n, b.slot_len(pair[1]).unwrap());
            let pos = [f.positions[f.positions.len() - 1] + 1];
            let next: Vec<Vec<f32>> = pair.iter().map(|&s| b.forward(&Forward { slot: s, tokens: &[5], positions: &pos, mask: &[], logit_rows: &[0] }).unwrap()).collect();
            assert!(next[0].iter().zip(&next[1]).all(|(x, y)| x.to_bits() == y.to_bits()), "{}: decode after a merged forward", ty.name());
        }
        // A slot twice, an unknown slot, and a batch past its slot's context: errors, and no
        // slot of the call grows.
        let lens = |b: &Box<dyn coordgen::plugins::Backend>| slots.iter().map(|p| b.slot_len(p[0]).unwrap()).collect::<Vec<_>>();
        let before = lens(&b);
        let twice = [
            Forward { slot: slots[0][0], tokens: &[1], positions: &[20], mask: &[], logit_rows: &[0] },
            Forward { slot: slots[0][0], tokens: &[1], positions: &[20], mask: &[], logit_rows: &[0] },
        ];
        let e = b.forward_slots(&twice).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        let unknown = [Forward { slot: slots[0][0], tokens: &[1], positions: &[20], mask: &[], logit_rows: &[0] }, Forward { slot: 999, tokens: &[1], positions: &[0], mask: &[], logit_rows: &[] }];
        let e = b.forward_slots(&unknown).unwrap_err().to_string();
        assert!(e.contains("no KV slot 999"), "{e}");
        let long: Vec<u32> = vec![1; 40];
        let long_pos: Vec<u32> = (0..40).collect();
        let overflow = [
            Forward { slot: slots[0][0], tokens: &[1], positions: &[20], mask: &[], logit_rows: &[0] },
            Forward { slot: slots[1][0], tokens: &long, positions: &long_pos, mask: &[], logit_rows: &[] },
        ];
        assert!(b.forward_slots(&overflow).is_err());
        assert_eq!(lens(&b), before, "{}: a failed merged forward changed a slot", ty.name());
    }
}

/// Sessions sharing one backend through the batcher, decoding at once on threads, produce
/// exactly what each produces alone, and their forwards were merged.
#[test]
fn batched_sessions_decode_as_they_do_alone() {
    use coordgen::batching::Batcher;
    let dir = temp_dir("synthetic-batcher");
    let spec = Spec::tiny(Arch::Llama);
    let w = random_weights(&spec, 6);
    let path = dir.join("m.gguf");
    write_gguf(&spec, &w, GgmlType::Q8_0, &path);
    let solo = Session::open(cpu_backend(2), &path, 128).unwrap();
    let (model, tok) = (solo.model().clone(), solo.shared_tok());
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| tok.encode(&format!("prompt number {i} says"), true).unwrap()).collect();
    let p = GenerateParams { max_tokens: 24, stop_at_eos: false, ..Default::default() };
    let mut solo = solo;
    let expected: Vec<Vec<u32>> = prompts.iter().map(|pr| solo.generate(pr, &p, &mut |_| {}).unwrap().tokens).collect();
    drop(solo);
    let mut backend = cpu_backend(2);
    let m = backend.load_model(&path).unwrap();
    assert_eq!(m.n_vocab, model.n_vocab);
    let batcher = Batcher::new(backend);
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|pr| {
            let mut s = Session::attach(batcher.backend(), m.clone(), tok.clone(), &path, 128).unwrap();
            let (batcher, p) = (batcher.clone(), p.clone());
            std::thread::spawn(move || {
                let _active = batcher.active();
                s.generate(&pr, &p, &mut |_| {}).unwrap().tokens
            })
        })
        .collect();
    let got: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got, expected, "batched decoding changed tokens");
    let st = batcher.stats();
    assert!(st.forwards > st.calls, "no forwards were merged: {st:?}");
}

/// Gemma 3's sliding window (4 keys here, shorter than every check's sequence) holds over
/// the cache as well as inside a batch: the logits of a position are bit-identical alone,
/// in chunks and inside a token tree deeper than the window, with either KV cache type; and
/// the safetensors route names its limit instead of misreading gemma's norms.
#[test]
fn gemma3_sliding_window_is_batch_invariant() {
    let dir = temp_dir("synthetic-gemma3");
    let spec = Spec::tiny(Arch::Gemma3);
    let w = random_weights(&spec, 5);
    let path = dir.join("gemma3.gguf");
    write_gguf(&spec, &w, GgmlType::Q8_0, &path);
    for kv in ["f32", "f16"] {
        let mut s = Session::open(cpu_backend_with(2, &format!("kv_type = \"{kv}\"")), &path, 256).unwrap();
        check_batch_invariance(&mut s, &format!("synthetic gemma3 ({kv} KV)"));
    }
    let hf = dir.join("gemma3-hf");
    write_hf_dir(&Spec::tiny(Arch::Qwen2), &random_weights(&Spec::tiny(Arch::Qwen2), 5), safetensors::Dtype::F32, 1, &hf);
    let cfg = hf.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["model_type"] = "gemma3".into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let err = Session::open(cpu_backend(1), &hf, 64).err().expect("gemma3 safetensors is refused").to_string();
    assert!(err.contains("gemma3 from a safetensors directory"), "{err}");
}

/// With a long context, gemma3's sliding-window layers keep rings of window + 512 entries
/// instead of the whole context (less KV memory), and give bit-identical logits to the
/// linear cache of a shorter slot: through 1400 tokens (rings wrapped twice), a rolled-back
/// draft, and a prompt that shares a prefix too old for the rings (refused by the backend,
/// so the session recomputes from the start and still answers the same).
#[test]
fn gemma3_window_rings_match_linear_caches() {
    let dir = temp_dir("synthetic-gemma3-ring");
    let spec = Spec::tiny(Arch::Gemma3);
    let path = dir.join("gemma3.gguf");
    write_gguf(&spec, &random_weights(&spec, 7), GgmlType::Q8_0, &path);
    let toks: Vec<u32> = (0..1400u32).map(|i| (i * 37 + i / 5) % 300).collect();
    let kv_bytes = |s: &Session| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&s.backend().stats_json()).unwrap();
        v["kv_bytes_reserved"].as_u64().unwrap()
    };
    // 1032 = 2 x (4 + 512): the 1024-entry slot stays linear, the 4096 one gets rings.
    let mut linear = Session::open(cpu_backend(2), &path, 1024).unwrap();
    let mut ring = Session::open(cpu_backend(2), &path, 4096).unwrap();
    // Layer 0 windowed (2 x 516 rows), layer 1 global (4096 rows), against 2 x 4096.
    assert_eq!(kv_bytes(&ring) * 2 * 1024, kv_bytes(&linear) * (1032 + 4096), "ring slot size");
    let nv = spec.n_vocab;
    let logits_at = |s: &mut Session, seq: &[u32]| -> Vec<u32> {
        s.reset().unwrap();
        let mut last = Vec::new();
        for c in seq.chunks(128) {
            last = s.append(c, &[c.len() as u32 - 1]).unwrap();
        }
        last.iter().map(|x| x.to_bits()).collect()
    };
    // Where both fit (the linear slot holds 1024): 600 and 1000 tokens (the rings of 516
    // wrapped once).
    for n in [600usize, 1000] {
        assert_eq!(logits_at(&mut ring, &toks[..n]), logits_at(&mut linear, &toks[..n]), "{n} tokens");
    }
    // Past 1032 entries the ring has wrapped: a draft of 8 rolled back and decoded again
    // gives the same logits as decoding straight on.
    logits_at(&mut ring, &toks[..1300]);
    let pos = |a: usize, b: usize| (a as u32..b as u32).collect::<Vec<u32>>();
    let straight = ring.forward(&toks[1300..1308], &pos(1300, 1308), &[], &[7]).unwrap();
    ring.truncate(1300).unwrap();
    let draft: Vec<u32> = toks[1300..1308].iter().map(|t| (t + 11) % 300).collect();
    ring.forward(&draft, &pos(1300, 1308), &[], &[]).unwrap();
    ring.truncate(1300).unwrap();
    let again = ring.forward(&toks[1300..1308], &pos(1300, 1308), &[], &[7]).unwrap();
    assert_eq!(bits(&straight[..nv]), bits(&again[..nv]), "after a rolled-back draft");
    // A tree of two siblings at 1032 and a child of the second; keeping the second and its
    // child moves them down one entry. 1032 is a multiple of the ring (516), so the window
    // of 1033 runs across the ring's end into the entries' second copies.
    ring.truncate(1032).unwrap();
    let (t0, t1, t2) = (toks[1032], toks[1033], toks[1034]);
    let straight = ring.forward(&[t0, t1, t2], &[1032, 1033, 1034], &[], &[2]).unwrap();
    ring.truncate(1032).unwrap();
    let mask = [1u8, 0, 0, 0, 1, 0, 0, 1, 1];
    ring.forward(&[(t0 + 3) % 300, t0, t1], &[1032, 1032, 1033], &mask, &[]).unwrap();
    ring.keep_entries(1032, &[1, 2]).unwrap();
    let after_tree = ring.forward(&[t2], &[1034], &[], &[0]).unwrap();
    assert_eq!(bits(&after_tree), bits(&straight), "after compacting a tree across the ring's end");
    // Rolling back past what the rings hold is refused, and prefill recomputes instead.
    ring.truncate(1035).unwrap();
    ring.append(&toks[1035..1400], &[]).unwrap();
    let err = ring.truncate(200).unwrap_err().to_string();
    assert!(err.contains("sliding-window"), "{err}");
    let (reused, computed) = ring.prefill(&[&toks[..200], &[5, 6, 7]].concat()).unwrap();
    let fresh = {
        let mut s = Session::open(cpu_backend(2), &path, 4096).unwrap();
        s.prefill(&[&toks[..200], &[5, 6, 7]].concat()).unwrap().0
    };
    assert_eq!(computed, 203, "the whole prompt is recomputed");
    assert_eq!(bits(&reused), bits(&fresh));
}

/// Llama 3.1's RoPE scaling (all three bands: kept, interpolated and divided frequencies,
/// with a 16-token original context so the 9 test positions reach them) from a GGUF file's
/// `rope_freqs` divisors and from a Hugging Face `rope_scaling` config, against the f64
/// reference that applies Hugging Face's rule; the scaling changes the logits, so the
/// check would catch it being ignored.
#[test]
fn llama3_rope_scaling_matches_reference() {
    let dir = temp_dir("synthetic-llama3");
    let mut b = cpu_backend_with(2, "activation_bits = 15");
    let spec = Spec { llama3_rope: Some([4.0, 1.0, 2.0, 16.0]), ..Spec::tiny(Arch::Llama) };
    let w = random_weights(&spec, 9);
    let reference = reference_logits(&spec, &w, &TOKENS);
    let unscaled = reference_logits(&Spec { llama3_rope: None, ..spec.clone() }, &w, &TOKENS);
    let moved = reference.iter().flatten().zip(unscaled.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(moved > 1e-2, "the scaling barely changes the logits ({moved:.1e}): the check would not see it");
    let g = dir.join("llama3.gguf");
    write_gguf(&spec, &w, GgmlType::F32, &g);
    let (ours, _) = backend_logits(&mut b, &g, &TOKENS);
    assert_close("llama3 rope, gguf", &ours, &reference, 2e-4);
    let hf = dir.join("llama3-hf");
    write_hf_dir(&spec, &w, safetensors::Dtype::F32, 1, &hf);
    let (ours, _) = backend_logits(&mut b, &hf, &TOKENS);
    assert_close("llama3 rope, safetensors", &ours, &reference, 2e-4);
}

/// A backend that runs only fixed widths (the CPU backend's `widths` option, as an NPU's
/// static graphs would) is padded to them by the host: every forward, chunk and tree gives
/// the logits the backend gives at any width, bit for bit, and the slot never keeps a pad.
#[test]
fn fixed_width_backend_is_padded_bit_identically() {
    use coordgen::plugins::Forward;
    let dir = temp_dir("synthetic-widths");
    let spec = Spec::tiny(Arch::Llama);
    let path = dir.join("llama.gguf");
    write_gguf(&spec, &random_weights(&spec, 11), GgmlType::Q8_0, &path);

    // The plugin itself refuses unlisted widths (the host never sends one: see below).
    let lib = plugin_dir().join("libcoordgen_backend_cpu.so");
    let mut raw = coordgen_interface::load_backend_library(&lib, r#"{"threads": 1, "widths": [1, 5, 20]}"#).unwrap();
    let caps = raw.capabilities().unwrap();
    assert_eq!(caps.widths.as_slice(), &[1, 5, 20]);
    let m = raw.load_model(&coordgen_interface::LoadRequest { path: path.display().to_string().into(), options_json: Default::default() }).unwrap();
    let slot = raw.create_slot(m.handle, 64).unwrap();
    let batch = coordgen_interface::ForwardBatch { slot, tokens: vec![1, 2, 3].into(), positions: vec![0, 1, 2].into(), mask: Default::default(), logit_rows: vec![2].into() };
    let err = raw.forward(&batch).into_result().unwrap_err().to_string();
    assert!(err.contains("runs only the widths [1, 5, 20]"), "{err}");
    let err = coordgen_interface::load_backend_library(&lib, r#"{"widths": [0, 4]}"#).err().expect("a zero width is refused");
    assert!(err.contains("widths must list widths from 1"), "{err}");

    let mut fixed = Session::open(cpu_backend_with(2, "widths = [1, 5, 20]"), &path, 256).unwrap();
    let caps = fixed.backend().capabilities();
    assert!(caps.widths.is_empty() && caps.max_width == 20, "the host sees a backend of any width up to 20: {caps:?}");
    // Widths 3, 8, 16 and 33 (split into 20 + 13) are padded; the tree of 16 nodes gets a
    // widened mask.
    check_batch_invariance(&mut fixed, "fixed widths [1, 5, 20]");

    let mut any = Session::open(cpu_backend(2), &path, 256).unwrap();
    let toks: Vec<u32> = (0..47u32).map(|i| (i * 37 + 11) % spec.n_vocab as u32).collect();
    let rows: Vec<u32> = vec![46, 0, 19, 20, 33];
    fixed.truncate(0).unwrap();
    let a = fixed.append(&toks, &rows).unwrap();
    let b = any.append(&toks, &rows).unwrap();
    assert_eq!(bits(&a), bits(&b), "a 47-token causal batch in three padded pieces, rows out of order");
    assert_eq!(fixed.backend().slot_len(fixed.slot()).unwrap(), 47, "no pad entry stays in the slot");

    // A tree wider than the widest graph cannot be split: refused, the slot unchanged.
    let w = 21;
    let mask: Vec<u8> = (0..w * w).map(|k| u8::from(k % w <= k / w)).collect();
    let pos: Vec<u32> = (47..47 + w as u32).collect();
    let err = fixed.forward(&toks[..w], &pos, &mask, &[0]).unwrap_err().to_string();
    assert!(err.contains("wider than this backend's widest graph (20)"), "{err}");
    assert_eq!(fixed.backend().slot_len(fixed.slot()).unwrap(), 47);
    assert_eq!(fixed.cached().len(), 47);

    // Merged forwards of several slots (the server's batching) go one slot at a time.
    let mut b = cpu_backend_with(2, "widths = [1, 5, 20]");
    let m = b.load_model(&path).unwrap();
    let (s1, s2) = (b.create_slot(m.handle, 64).unwrap(), b.create_slot(m.handle, 64).unwrap());
    let outs = b
        .forward_slots(&[
            Forward { slot: s1, tokens: &toks[..3], positions: &[0, 1, 2], mask: &[], logit_rows: &[2] },
            Forward { slot: s2, tokens: &toks[..7], positions: &[0, 1, 2, 3, 4, 5, 6], mask: &[], logit_rows: &[6] },
        ])
        .unwrap();
    any.truncate(0).unwrap();
    let alone = any.append(&toks[..7], &[2, 6]).unwrap();
    let nv = spec.n_vocab;
    assert_eq!(bits(&outs[0]), bits(&alone[..nv]));
    assert_eq!(bits(&outs[1]), bits(&alone[nv..]));
    assert_eq!((b.slot_len(s1).unwrap(), b.slot_len(s2).unwrap()), (3, 7));
}
