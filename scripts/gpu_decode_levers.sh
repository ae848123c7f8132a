#!/usr/bin/env bash
# The batch-1 decode levers prepared in the tenth session (issue #4, runbook orders 1 and 1b), on one GPU, each an
# A/B inside one process (alternating points; bytes checked equal) or a correctness check first. Usage on the device:
#   STEPS="check_ssm check_lnn entropy inductor_pdl latent" bash scripts/gpu_decode_levers.sh
#   STEPS="tests unroll" BUDGET=60 ...; STEPS=bench BUDGET=100 ...   (thirteenth session)
# Steps (each under its own timeout, so a hung step cannot eat the call; results under $OUT, packed into
# $OUT/decode_levers.tgz at the end):
#   tests         the CUDA tests of the decode runner and the training step graphs (entropy branch, lagged
#                 overlap, stage-A graph, graphs vs eager), before anything is timed
#   check_ssm     selfcheck of the fused entropy step with PDL (ssm_step, ssm_generate)
#   check_ssd     selfcheck of the entropy model's forward-only Mamba-2 scan kernel (ssd_triton.py, twelfth session)
#   ssd_split     that scan alone at the entropy model's heads, seq 8192 x 8 and 1024 x 64: the sequential kernel
#                 (split 0) against the chunk-parallel form (split 1), A B A B, outputs checked equal (default: auto)
#   check_lnn     selfcheck of the IntegralLNN step (lnn_step, lnn_generate)
#   entropy       the fused entropy step's own PDL A/B (--sweep_ssm --grid pdl=0,1,0,1), then the default byte graph
#                 (fused entropy step "auto": on) and the same with it off (two processes, --grid pdl=1,1 each)
#   inductor_pdl  the default byte graph with inductor's PDL on (--inductor_pdl on; unsafe, session 56: timing only)
#   latent        the fused latent step's launch-config sweep (--sweep_latent, default grid)
#   digest        the default byte graph and the same with inductor's PDL on (--inductor_pdl on), four processes
#                 alternating (A B A B): timings, and each process's sha256 of its 1,024 bytes (seeded sampling, same
#                 weights). Equal digests do not prove it safe: it raced in session 56 (docs/results/checks-s56.md)
#   branch        the runner's entropy_branch (the entropy model on a second stream inside the byte graph) A/B in one
#                 process: --sweep_lnn --grid branch=0,1,0,1 (bytes checked equal, as every sweep point)
#   lagged        latent_shift=lagged (the latent step on a second stream, off the byte path) against the default
#                 shift, two processes (--grid pdl=1,1 each): ms per byte, bytes checked equal within each process
#   unroll        (needs a torch with CUDAGraph.begin_capture_to_if_node; the device's torch 2.11 has none: every
#                 unroll > 1 point is a UserError there, thirteenth session)
#                 bytes per graph launch (DecodeRunner's unroll: the latent stage a conditional graph node), 1 / 8 / 32
#                 alternating in one process, for the default shift (entropy branch on) and for "completed" (the
#                 quality pick; 1 / 8, crossed with its entropy branch off / on, "auto" since the thirteenth session), bytes checked equal
#   stage_a       training (issue #8): the two-stage captured step with stage A as its own graph, compiled and then
#                 captured, and eager, and as a graph with the entropy model's scan as PyTorch ops
#                 (IONLLAMA_SSD_SCAN=0: the reference; the kernel is the default), entropy patching, ionLlama-small, at the Phase-1 shape (seq 1024 x 64) and at
#                 seq 8192 x 8
#                 (STAGE_A_SHAPES, default "1024x64 8192x8")
#   entropy_chunk training (issues #8, #11): the two-stage step with the entropy model's SSD chunk 64 against 32
#                 (A B A B in one process; ionLlama-small, entropy patching, the Phase-1 shape)
#   train8k       training (issue #8): ionLlama-small (entropy and fixed patching) and the dense byte transformer at
#                 seq 8192 x 8 in one process (the issue's paired row)
#   pick          decode (issue #4): the Phase-1 quality picks (fixed 3- / 4-byte patches, 8-layer latent, "completed"
#                 shift; their runs' config.json), the runner's host_schedule off / on / off / on (one graph per byte,
#                 chosen on the host, against the split byte graphs and a flag read per byte), bytes checked equal
#   conv_gate     training: the conv-gate backward's launch configs (pass A 327 us against a ~60 us floor, fifth
#                 session): bench_conv_gate.py --sweep (pass A's bwd_wgrad 0 / 1 x tiles x warps, each point checked
#                 against the reference; ~1 min), then its fwd+bwd and compiled-IntegralLNNBlock rows with the defaults
#   kernels_graph the kernel benchmarks (issue #8's attention and scan goals) timed two ways in one run: as before
#                 (do_bench: a Python call per fwd+bwd, host-bound at small sizes) and replayed from a CUDA graph
#                 (--graph_timing: no host overhead, as in the captured training step), every method alike
#   batch32       decode at batch 32 (issue #4's second row; last measured in the fifth session, 12,336 bytes/s
#                 against the dense model's 15,885): the defaults (the fused steps are "auto": off above 16 rows) and
#                 all three fused steps forced on (their kernels tile any number of rows), each its own process
#   bench         bench_generation.py's README rows (compiled, batch 1, contexts 1K / 8K / 32K, ionLlama and dense),
#                 with the defaults, and with --unroll $UNROLL as well when UNROLL is set
# The archive is rewritten after every step, so an outer timeout keeps the steps that finished.
# Env: STEPS (default: the tenth session's five), BYTES (1024), BUDGET (150 s per sweep), STAGE_A_SHAPES,
# STAGE_A_MODES (default "graph compiled eager"; each ~1 min at 1024x64, compiled longer), UNROLL, TRAIN8K_ARMS (the
# train8k step's arms, default "ionllama ionllama:patching=fixed dense"; overrides as bench_train_throughput takes them),
# PICK_RUNS / PICK_GRID (the pick step's runs, default "phase1-patch3 phase1-dropout", and grid, "sched=0,1,0,1").
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=$OUT/decode_levers; mkdir -p "$R"
BYTES=${BYTES:-1024}; BUDGET=${BUDGET:-150}; TRAIN8K_ARMS=${TRAIN8K_ARMS:-ionllama ionllama:patching=fixed dense}
P="python3 benchmarks/profile_decode_step.py --bytes $BYTES --budget_s $BUDGET"
run() {  # name, timeout, command...
  local name=$1 t=$2; shift 2
  echo "== $name ($(date +%T)): $*" >> "$R/log.txt"
  timeout "$t" "$@" > "$R/log_$name.txt" 2>&1
  echo "   rc $? ($(date +%T))" >> "$R/log.txt"
  tar czf "$OUT/decode_levers.tgz.part" -C "$OUT" decode_levers && mv "$OUT/decode_levers.tgz.part" "$OUT/decode_levers.tgz"
}
for step in ${STEPS:-check_ssm check_lnn entropy inductor_pdl latent}; do
  case $step in
    tests) run tests 540 python3 -m pytest -vv -rfE --tb=short --durations=8 -p no:cacheprovider tests/test_decode_fast.py tests/test_step_graph.py \
             tests/test_generation_ionllama.py tests/test_kernels.py -k "not interpreter and not large" ;;
    check_ssm) run check_ssm 180 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds ssm_step,ssm_generate \
                 --json "$R/selfcheck_ssm.json" ;;
    check_ssd) run check_ssd 240 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds ssd_scan \
                 --json "$R/selfcheck_ssd.json" ;;
    ssd_split) run ssd_split 300 python3 benchmarks/bench_ssd_forward.py --scan --shapes 8192x8 1024x64 --splits 0 1 ;;
    check_lnn) run check_lnn 240 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds lnn_step,lnn_generate \
                 --json "$R/selfcheck_lnn.json" ;;
    entropy)
      run entropy_pdl $((BUDGET + 90)) $P --fused_entropy_step --sweep_ssm --grid pdl=0,1,0,1 --out "$R/entropy_pdl"
      run base $((BUDGET + 90)) $P --sweep_lnn --grid pdl=1,1 --out "$R/base"
      run entropy_off $((BUDGET + 90)) $P --fused_entropy_step off --sweep_lnn --grid pdl=1,1 --out "$R/entropy_off" ;;
    inductor_pdl) run inductor_pdl $((BUDGET + 90)) $P --inductor_pdl on --sweep_lnn --grid pdl=1,1 \
                    --out "$R/inductor_pdl" ;;
    latent) run latent $((BUDGET + 90)) $P --sweep_latent --out "$R/latent" ;;
    digest)
      for i in 1 2; do
        run digest_base$i $((BUDGET + 90)) $P --sweep_lnn --grid pdl=1 --out "$R/digest_base$i"
        run digest_ipdl$i $((BUDGET + 90)) $P --inductor_pdl on --sweep_lnn --grid pdl=1 --out "$R/digest_ipdl$i"
      done
      grep -H "sha256" "$R"/digest_*/sweep_lnn.md ;;
    branch) run branch $((BUDGET + 90)) $P --sweep_lnn --grid branch=0,1,0,1 --out "$R/branch" ;;
    lagged)
      run lagged $((BUDGET + 90)) $P --latent_shift lagged --sweep_lnn --grid pdl=1,1 --out "$R/lagged"
      run lagged_ref $((BUDGET + 90)) $P --sweep_lnn --grid pdl=1,1 --out "$R/lagged_ref" ;;
    unroll)
      run unroll $((BUDGET + 90)) $P --sweep_lnn --grid unroll=1,8,32,1,8,32 --out "$R/unroll"
      run unroll_completed $((BUDGET + 90)) $P --latent_shift completed --sweep_lnn --grid unroll=1,8,1,8 branch=0,1 \
        --out "$R/unroll_completed" ;;
    stage_a)
      T="python3 benchmarks/bench_train_throughput.py --sizes small --arms ionllama --compile --compile_mode whole --step_graph"
      for shape in ${STAGE_A_SHAPES:-1024x64 8192x8}; do
        set -- ${shape/x/ }
        for sa in ${STAGE_A_MODES:-graph compiled eager}; do
          run "stage_a_${sa}_$1" 300 $T --seq_len "$1" --batch_size "$2" --steps 20 --stage_a $sa --out "$R/stage_a_${sa}_$1.json"
        done
        # stage A as a graph with the entropy model's scan as PyTorch ops (the reference of ssd_triton.py's kernel,
        # which the rows above use by default since the thirteenth session)
        run "stage_a_ref_$1" 300 env IONLLAMA_SSD_SCAN=0 $T --seq_len "$1" --batch_size "$2" --steps 20 --stage_a graph \
          --out "$R/stage_a_ref_$1.json"
      done ;;
    entropy_chunk)  # the entropy model's SSD chunk (entropy_chunk): 64 (default) against 32, the training step
      run entropy_chunk 400 python3 benchmarks/bench_train_throughput.py --sizes small --arms ionllama \
        ionllama:entropy_chunk=32 ionllama ionllama:entropy_chunk=32 --compile --compile_mode whole --step_graph \
        --seq_len 1024 --batch_size 64 --steps 20 --out "$R/entropy_chunk.json" ;;
    train8k)  # issue #8's paired row: ionLlama-small (entropy patching, stage A compiled: the trainer's default) and
      # its fixed-patching form against the dense byte transformer, seq 8192 x 8, same script, same process
      # shellcheck disable=SC2086  # TRAIN8K_ARMS is a list of arms
      run train8k 480 python3 benchmarks/bench_train_throughput.py --sizes small --arms $TRAIN8K_ARMS \
        --compile --compile_mode whole --step_graph --seq_len 8192 --batch_size 8 --steps 20 --out "$R/train8k.json" ;;
    pick)  # decode speed of the Phase-1 quality picks (#4 asks it of `small`; these are small-sized, 35M): fixed 3- and
      # 4-byte patches, an 8-layer latent, the "completed" shift, built from their runs' config.json (random weights)
      for run in ${PICK_RUNS:-phase1-patch3 phase1-dropout}; do
        run "pick_${run#phase1-}" $((BUDGET + 90)) $P --model_config "docs/results/$run/ionllama_fixed/config.json" \
          --sweep_lnn --grid "${PICK_GRID:-sched=0,1,0,1}" --out "$R/pick_${run#phase1-}"
      done ;;
    conv_gate) run conv_gate 540 python3 benchmarks/bench_conv_gate.py --sweep --out "$R/conv_gate.json" ;;
    kernels_graph)
      run attention 420 python3 benchmarks/bench_attention.py --out "$R/attention.json" --flex-sizes 4096,16384,65536 \
        --rep 50 --graph_timing
      run scan 240 python3 benchmarks/bench_scan.py --out "$R/scan.json" --dtypes bf16 --graph_timing ;;
    batch32)
      G32="python3 benchmarks/bench_generation.py --models ionllama dense --contexts 1024 --batch 32 --budget_s 200"
      run batch32_auto 300 $G32 --out "$R/batch32_auto"
      run batch32_fused 300 $G32 --fused_local_step on --fused_entropy_step on --fused_latent_step on \
        --out "$R/batch32_fused" ;;
    bench)  # the defaults (inductor's PDL off in the compile presets since session 56); UNROLL=K adds a row set
      # the bench wants 100 s left per compiled session and per measurement after its checks: 330 s at least
      G="python3 benchmarks/bench_generation.py --compile --compiled_only --models ionllama dense --contexts 1024 8192 32768"
      BB=$((3 * BUDGET > 330 ? 3 * BUDGET : 330))
      run bench $((BB + 120)) $G --budget_s $BB --out "$R/bench"
      if [ -n "${UNROLL:-}" ]; then
        run bench_unroll $((BB + 120)) $G --budget_s $BB --unroll "$UNROLL" --out "$R/bench_unroll"
      fi ;;
    *) echo "unknown step '$step'; steps: tests check_ssm check_ssd ssd_split check_lnn entropy inductor_pdl latent digest branch lagged unroll stage_a entropy_chunk train8k pick conv_gate kernels_graph batch32 bench" >&2; exit 2 ;;
  esac
done
grep -h "^PASS\|^FAIL" "$R"/log_check_*.txt 2>/dev/null | cut -c1-160
for f in "$R"/*/sweep_*.md; do [ -f "$f" ] && { echo "$f"; grep "^| \(point\|default\|[0-9]\)" "$f" | cut -c1-160; }; done
tar czf "$OUT/decode_levers.tgz" -C "$OUT" decode_levers && rm -rf "$R"
