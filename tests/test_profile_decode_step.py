"""benchmarks/profile_decode_step.py: the per-kernel decode profile (its CPU mode: eager, tiny, CPU ops' self
times) and the launch-config sweep's grid checks. The GPU paths (CUPTI kernels in graph replays, the sweep's
re-captures) run only on a GPU machine."""
import importlib.util
import json
import pathlib

import pytest

from ionllama.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("profile_decode_step", REPO / "benchmarks" / "profile_decode_step.py")
pds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pds)


def test_cpu_profile_rows_add_up(tmp_path):
    from ionllama.kernels.pdl import set_pdl
    try:
        pds.main(["--device", "cpu", "--size", "tiny", "--bytes", "8", "--context", "32", "--out", str(tmp_path),
                  "--pdl", "off"])
        assert set_pdl(True) is False  # --pdl off reached the launch switch (restored here)
    finally:
        set_pdl(True)
    res = json.loads((tmp_path / "profile_decode_step.json").read_text())
    assert res["env"]["flags"]["pdl"] == "off"
    rows, summ, fams = res["rows"], res["summary"], res["families"]
    assert summ["bytes"] == 8 and len(rows) > 10
    # per-byte totals: the rows and the families add up to the summary, each row is calls x mean
    assert sum(r["us_per_byte"] for r in rows) == pytest.approx(summ["kernel_us_per_byte"], rel=1e-9)
    assert sum(f["us_per_byte"] for f in fams) == pytest.approx(summ["kernel_us_per_byte"], rel=1e-9)
    assert sum(r["calls_per_byte"] for r in rows) == pytest.approx(summ["kernels_per_byte"], rel=1e-9)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    for r in rows:
        assert r["us_per_byte"] == pytest.approx(r["calls_per_byte"] * r["mean_us"], rel=1e-9)
    assert [r["us_per_byte"] for r in rows] == sorted((r["us_per_byte"] for r in rows), reverse=True)
    # self times of ops on the host thread: inside the profiled wall time, not more
    assert 0 < summ["kernel_us_per_byte"] <= summ["wall_us_per_byte_profiled"]
    assert summ["gap_us_per_byte"] == pytest.approx(summ["wall_us_per_byte_profiled"] - summ["kernel_us_per_byte"])
    # the step's GEMVs: every byte runs several (entropy model, local encoder and decoder layers, head)
    by_name = {r["name"]: r for r in rows}
    mm = [by_name[n] for n in ("aten::mm", "aten::addmm") if n in by_name]
    assert mm and sum(r["calls_per_byte"] for r in mm) >= 4
    assert all(r["family"] == "aten matmul op" for r in mm)
    # self times, not totals: aten::linear (which dispatches to mm / addmm) costs less than its matmuls
    assert by_name["aten::linear"]["us_per_byte"] < sum(r["us_per_byte"] for r in mm)
    assert 0 < summ["patches_per_byte"] < 1
    env = res["env"]
    assert env["torch"] and env["size"] == "tiny" and env["graphs"] is False and env["compile"] is False
    assert env["fused"] == {"fused_local_step": False, "fused_entropy_step": False, "fused_latent_step": False}
    md = (tmp_path / "profile_decode_step.md").read_text()
    assert md.startswith("command: `python3 benchmarks/profile_decode_step.py --device cpu --size tiny --bytes 8")
    assert "| CPU op | family | calls/byte | mean µs | µs/byte | share |" in md
    assert f"`{rows[0]['name']}`" in md


def test_kernel_families():
    assert pds.family("_lnn_ffn_down") == pds.family("_ssm_in_scan") == "ours: fused Triton"
    assert pds.family("_byte_head") == pds.family("_embed_step") == "ours: fused Triton"
    assert pds.family("triton_poi_fused_add_mul_0") == "inductor Triton"
    assert pds.family("void gemv2T_kernel_val<int, int, __nv_bfloat16, 128, 16, 4, 4, false>") == "cuBLAS GEMV/GEMM"
    assert pds.family("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<long>>") \
        == "aten native kernel"
    assert pds.family("Memcpy DtoH (Device -> Pinned)") == "memcpy/memset"


def test_cuda_aggregation_counts_device_events_only():
    """The CUDA branch (no GPU needed): kernel durations from the device events; the host's events are left out."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(name, us, dev=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=dev, self_cpu_time_total=1e6,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [ev("_lnn_in_gate", 3.0), ev("_lnn_in_gate", 5.0), ev("triton_poi_fused_0", 2.0),
              ev("cudaGraphLaunch", 50.0, DeviceType.CPU), ev("aten::mm", 40.0, DeviceType.CPU)]
    rows, fams = pds.aggregate(events, 2, "cuda")
    assert [(r["name"], r["calls_per_byte"], r["mean_us"], r["us_per_byte"]) for r in rows] == [
        ("_lnn_in_gate", 1.0, 4.0, 4.0), ("triton_poi_fused_0", 0.5, 2.0, 1.0)]
    assert rows[0]["share"] == pytest.approx(0.8)
    assert {f["family"]: f["us_per_byte"] for f in fams} == {"ours: fused Triton": 4.0, "inductor Triton": 1.0}


def test_sweep_grid_checks(capsys):
    pytest.importorskip("triton")
    for kind in pds.SWEEPS:  # the default grids are valid points of each configuration
        config = importlib.import_module(pds.SWEEPS[kind]["module"])._CONFIG
        points = pds.parse_grid(kind, None)
        assert 1 < len(points) <= pds.MAX_POINTS and all(set(p) <= set(config) for p in points)
    points = pds.parse_grid("lnn", ["block_n=16,32", "num_warps=4"])
    assert points == [dict(in_block_n=b, out_block_n=b, up_block_n=b, down_block_n=b, num_warps=4) for b in (16, 32)]
    with pytest.raises(UserError, match="unknown lnn config key 'bogus'"):
        pds.parse_grid("lnn", ["bogus=16"])
    with pytest.raises(UserError, match="power of two"):
        pds.parse_grid("ssm", ["scan_block_c=24"])
    with pytest.raises(UserError, match="KEY=V1,V2"):
        pds.parse_grid("latent", ["num_warps"])
    with pytest.raises(UserError, match="25 points, at most 24"):
        pds.parse_grid("lnn", ["block_n=16,32,64,128,256", "num_warps=1,2,4,8,16"])
    # the on / off switch pdl: 0 and 1 only, repeats kept in order (A B A B)
    assert pds.parse_grid("lnn", ["pdl=0,1,0,1"]) == [{"pdl": v} for v in (0, 1, 0, 1)]
    assert pds.parse_grid("latent", ["pdl=1"]) == [{"pdl": 1}]
    with pytest.raises(UserError, match="must be 0 or 1"):
        pds.parse_grid("lnn", ["pdl=2"])
    # the runner's entropy_branch switch, alone or crossed with pdl
    assert pds.parse_grid("lnn", ["branch=0,1", "pdl=1"]) == [{"branch": 0, "pdl": 1}, {"branch": 1, "pdl": 1}]
    with pytest.raises(UserError, match="must be 0 or 1"):
        pds.parse_grid("ssm", ["branch=3"])
    # the runner's unroll (bytes per graph launch): powers of two, crossed with the switches
    assert pds.parse_grid("lnn", ["unroll=1,8", "branch=1"]) == [{"unroll": 1, "branch": 1}, {"unroll": 8, "branch": 1}]
    with pytest.raises(UserError, match="not a power of two"):
        pds.parse_grid("lnn", ["unroll=6"])
    with pytest.raises(UserError, match="unknown lnn config key 'persistent'"):  # the removed one-launch kernel
        pds.parse_grid("lnn", ["persistent=1"])
    # the CLI: one line, exit 2, before any model is built
    with pytest.raises(SystemExit) as e:
        pds.main(["--device", "cpu", "--sweep_lnn", "--grid", "bogus=16"])
    assert e.value.code == 2 and "error: unknown lnn config key 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pds.main(["--device", "cpu", "--grid", "num_warps=4"])
    assert "--grid needs a sweep" in capsys.readouterr().err


def test_sweep_refuses_a_step_the_decoder_does_not_use(tmp_path):
    """On CPU without TRITON_INTERPRET the fused local step is off ('auto'): sweeping it would time nothing."""
    pytest.importorskip("triton")
    with pytest.raises(UserError, match="pass --fused_local_step on"):
        pds.main.__wrapped__(["--device", "cpu", "--sweep_lnn", "--grid", "num_warps=4", "--bytes", "8",
                              "--context", "32", "--out", str(tmp_path)])


def test_recaptures_start_the_decoder_again_before_the_profile(tmp_path, monkeypatch):
    calls = []
    real_start = pds.start

    def counting_start(s, *a, **kw):
        calls.append(1)
        return real_start(s, *a, **kw)
    monkeypatch.setattr(pds, "start", counting_start)
    pds.main(["--device", "cpu", "--size", "tiny", "--bytes", "8", "--context", "32", "--out", str(tmp_path),
              "--recaptures", "2"])
    res = json.loads((tmp_path / "profile_decode_step.json").read_text())
    assert len(calls) == 3 and res["summary"]["recaptures"] == 2 and res["summary"]["bytes"] == 8
    calls.clear()
    pds.main(["--device", "cpu", "--size", "tiny", "--bytes", "8", "--context", "32", "--out", str(tmp_path),
              "--resets", "2"])
    res = json.loads((tmp_path / "profile_decode_step.json").read_text())
    reset_ms = res["summary"]["reset_ms_per_byte"]  # each a timed span after its own prefill + reset
    assert len(calls) == 3 and len(reset_ms) == 2 and all(ms > 0 for ms in reset_ms)
    with pytest.raises(SystemExit) as e:
        pds.main(["--device", "cpu", "--recaptures", "-1", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_graph_dot_summary_counts_node_types_edges_and_edge_data():
    """--dump_graphs' summary of a captured graph's DOT (cudaGraphDebugDotPrint): node types by keyword, edges, and
    the edges' own data with ids masked, so a later capture's programmatic edges can be told from the first's."""
    dot = '''digraph dot {
"graph_1_node_0"[style="solid" shape="record" label="{KERNEL|{ID|0}|_lnn_in_gate}"];
"graph_1_node_1"[style="solid" shape="record" label="{KERNEL|{ID|1}|_lnn_out_mix}"];
"graph_1_node_2"[label="{MEMSET|{ID|2}}"];
"graph_1_node_3"[label="{EVENT_RECORD|{ID|3}}"];
"graph_1_node_0" -> "graph_1_node_1" [label="type=programmatic port=0x12"];
"graph_1_node_1" -> "graph_1_node_2";
"graph_1_node_2" -> "graph_1_node_3" [label="type=programmatic port=7"];
}'''
    summ = pds.summarize_dot(dot)
    assert summ == {"node_types": {"KERNEL": 2, "MEMSET": 1, "EVENT_RECORD": 1}, "edges": 3,
                    "edge_attrs": {'label="type=programmatic port=#"': 2}}
    assert pds._DOT_IDS.sub("#", dot) == pds._DOT_IDS.sub("#", dot.replace("0x12", "0x9f").replace("node_3", "node_8"))


def test_dump_graphs_off_cuda_and_recaptures_in_a_sweep_are_refused(tmp_path, capsys):
    for argv, says in ((["--dump_graphs"], "--dump_graphs"), (["--sweep_lnn", "--recaptures", "1"], "--recaptures"),
                       (["--sweep_lnn", "--resets", "1"], "--resets")):
        with pytest.raises(SystemExit) as e:
            pds.main(["--device", "cpu", "--out", str(tmp_path)] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0]


def test_inductor_pdl_flag_edits_every_compile_preset_and_restores_it(monkeypatch):
    from ionllama.generation import runner
    monkeypatch.setattr(runner, "COMPILE_PRESETS", {k: dict(v) for k, v in runner.COMPILE_PRESETS.items()})
    monkeypatch.setattr(runner, "_PDL", {"triton.enable_pdl": True})  # as on a torch whose inductor has it
    pds.set_inductor_pdl(True)
    assert all(o["triton.enable_pdl"] is True for o in runner.COMPILE_PRESETS.values())
    pds.set_inductor_pdl(False)
    assert all(o["triton.enable_pdl"] is False for o in runner.COMPILE_PRESETS.values())
    assert runner.compile_options(True) == {"triton.enable_pdl": False}
    assert runner.COMPILE_PRESETS["max-autotune"]["max_autotune"]
    monkeypatch.setattr(runner, "_PDL", {})  # a torch whose inductor lacks it: nothing to set
    presets = {k: dict(v) for k, v in runner.COMPILE_PRESETS.items()}
    pds.set_inductor_pdl(True)
    assert runner.COMPILE_PRESETS == presets
