# session 61 call 2, reused in session 62 call 2 (#11): mamba's per-arm sweep at 75 s, one GPU; VARIANTS picks the cells
set -x
export BENCH_COMMIT=$(cat .data/commit)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt
GPU0=mamba T=${T:-585} BUDGET=75 OVERHEAD=110 RES=docs/results/phase1-sweep \
  EXTRA="--stage sweep --step_graph --sweep_variants ${VARIANTS:-base,lr0.5x,lr2x}" bash scripts/gpu_phase1_parallel.sh
